"""The MQTT link: one connection to the broker, owned by one thread.

The link thread is the only code that touches paho-mqtt and the only writer
of the outbox. Producers (the scoring loop) hand it messages through a
bounded queue with ``submit``, which never blocks; the link thread stores
each batch of submissions in the outbox in one transaction (one fsync) and
only then publishes. A PUBACK with a failure reason code keeps the message,
is counted, and the message is retried after a pause. With a success code,
telemetry is deleted; a hard case is deleted when the cloud's verdict for its
idempotency key arrives on the device's verdict topic (``link.confirm =
"verdict"``, the default). It is sent again if none came within
``link.confirm_timeout_s``, and at once on the next connection when the
connection the broker acknowledged it on is lost: a broker that acknowledged
a hard case and then died (without persistence it forgets what it had not
yet delivered) cannot lose it. ``link.confirm = "puback"`` deletes hard cases at the PUBACK instead,
for a cloud tier that does not answer (e.g. a batch service that only stores).

The connection: paho-mqtt 2.x with callback API version 2 and MQTT v5,
TCP_NODELAY, optional TLS (CA, client certificate and key) and user name with
a password read from a file at connect time. A retained ``status`` message
says ``online`` after every connect; the last will says ``offline``. A CONNACK
with a failure reason code (bad credentials, not authorised) is a failed
attempt, never "connected". A broker silent for 1.5x the keepalive (a half-open
connection: the broker hangs, or a NAT forgot us) is taken as lost, counted in
``keepalive_timeouts``. Reconnects back off exponentially with jitter.
Each connection uses a fresh paho client, and what was in flight on a lost
connection is replayed from the outbox on the next one (duplicates carry the
same idempotency key), so nothing depends on paho's in-memory queue.

Draining order: urgent first, then batch, then telemetry, with at most
``link.inflight_window`` unacknowledged publishes. Batch-class rows (one hard
case each) are sent together as one ``batch`` message when enough have
gathered or the oldest has waited long enough.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import LinkSettings, Settings, read_secret
from edge_agent.delivery.outbox import Cls, Message, Outbox
from edge_agent.errors import ConfigError, OutboxError
from edge_agent.wire.messages import IDEMPOTENCY_PROPERTY, SCHEMA_VERSION, Status, Topics, encoder

log = logging.getLogger(__name__)

#: PUBACK reason code "No matching subscribers": the broker took the message and gave it to nobody.
NO_MATCHING_SUBSCRIBERS = 0x10
#: Longest sleep of the link loop (bounds how late keepalive checks and retries run).
LOOP_MAX_S = 0.5


def new_client(settings: Settings, client_id: str) -> mqtt.Client:
    """A paho client (v2 callbacks, MQTT v5) with TLS and credentials from ``settings``."""
    m = settings.mqtt
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if m.tls_ca or m.tls_cert:
        try:
            client.tls_set(
                ca_certs=m.tls_ca or None,
                certfile=m.tls_cert or None,
                keyfile=m.tls_key or None,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"mqtt TLS files cannot be used: {exc}") from exc
    if m.username:
        password = read_secret(m.password_file) if m.password_file else None
        client.username_pw_set(m.username, password)
    return client


def backoff_s(link: LinkSettings, attempt: int) -> float:
    """Seconds before reconnect attempt ``attempt + 1``: exponential from ``reconnect_min_s`` up
    to ``reconnect_max_s``, with full jitter, so that devices or workers cut off together do
    not all come back in the same instant."""
    ceiling = min(link.reconnect_max_s, link.reconnect_min_s * (2 ** min(attempt, 20)))
    return random.uniform(link.reconnect_min_s, max(link.reconnect_min_s, ceiling))  # noqa: S311


def set_nodelay(client: mqtt.Client) -> None:
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _KeyOnly(msgspec.Struct):
    key: str


class _VerdictKeys(msgspec.Struct):
    """The idempotency keys a verdict message answers (one verdict or a batch of them)."""

    key: str | None = None
    verdicts: list[_KeyOnly] | None = None


_keys_decoder = msgspec.json.Decoder(_VerdictKeys)


def verdict_keys(payload: bytes) -> list[str]:
    """Keys of a verdict message; [] for anything else (the reconciler counts malformed ones)."""
    try:
        got = _keys_decoder.decode(payload)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return []
    keys = [v.key for v in got.verdicts or []]
    if got.key is not None:
        keys.append(got.key)
    return keys


@dataclass(slots=True)
class _Inflight:
    ids: list[int]
    cls: Cls
    sent_ns: int


class Link:
    """Owns the broker connection and the outbox; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        outbox: Outbox,
        device_id: str,
        *,
        model: str = "",
        on_verdict: Callable[[bytes], None] | None = None,
        on_stored: Callable[[str, str], None] | None = None,
        on_command: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.device = device_id
        self.model = model
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.on_verdict = on_verdict
        self.on_stored = on_stored
        self.on_command = on_command
        self._status_due = False
        self.counters: Counter[str] = Counter()
        self.connected = threading.Event()
        self.last_error = ""
        self._queue: queue.Queue[tuple[Cls, str, str, bytes]] = queue.Queue(
            settings.link.submit_queue
        )
        self._stop = threading.Event()
        self._flush_batches = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-link", daemon=True)
        self._client: mqtt.Client | None = None
        self._inflight: dict[int, _Inflight] = {}
        self._held: dict[int, float] = {}  # row id -> monotonic time it may be retried
        # Hard cases the broker took, awaiting the verdict: row id -> the connection it took
        # them on (a broker that dropped that connection may have died holding them).
        self._awaiting: dict[int, int] = {}
        self._generation = 0
        self._confirm = settings.link.confirm == "verdict"
        self._attempt = 0
        self._next_attempt = 0.0
        self._connected_at = 0.0
        self._dirty = True
        self._recheck_at = float("inf")
        self._last_loop = time.monotonic()
        self._last_in = time.monotonic()  # last time bytes came from the broker
        # paho pings when the broker has been silent for a keepalive, and drops the connection
        # only a keepalive after an unanswered ping (up to 2x keepalive after the broker went
        # away). A healthy broker is never silent longer than keepalive + one loop turn + the
        # ping's round trip, so silence past 1.5x keepalive (less one loop turn, the check's
        # own lateness) means a half-open connection.
        self._silence_limit_s = 1.5 * settings.mqtt.keepalive_s - LOOP_MAX_S
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pipe_closed = False
        self._status_payload = encoder.encode(
            Status(v=SCHEMA_VERSION, device=device_id, state="online", model=model)
        )
        self._will_payload = encoder.encode(
            Status(v=SCHEMA_VERSION, device=device_id, state="offline", model=model)
        )

    # -- public API (any thread) ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, cls: Cls, key: str, topic: str, payload: bytes) -> bool:
        """Hand a message to the link thread without blocking; False if the queue is full."""
        if len(payload) > self.settings.link.max_payload_bytes:
            self.counters[f"refused_too_large_{cls.name.lower()}"] += 1
            log.error("message %s of %d bytes is over link.max_payload_bytes", key, len(payload))
            return False
        try:
            self._queue.put_nowait((cls, key, topic, payload))
        except queue.Full:
            full = True
        else:
            full = False
        if full:
            self.counters[f"refused_queue_full_{cls.name.lower()}"] += 1
            log.error("link queue full: %s message %s refused", cls.name.lower(), key)
            return False
        self._wake()
        return True

    def _wake(self) -> None:
        if self._pipe_closed:
            return
        # A full pipe means the link thread is already due to wake.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def flush_batches(self) -> None:
        """Send waiting batch cases now instead of waiting for a full batch."""
        self._flush_batches.set()
        self._dirty = True
        self._wake()

    def idle(self) -> bool:
        """True when nothing is queued, stored or in flight."""
        d = self.outbox.depth()
        return (
            self._queue.empty()
            and not self._inflight
            and d["urgent"] == 0
            and d["batch"] == 0
            and d["telemetry"] == 0
        )

    @property
    def healthy(self) -> bool:
        """The link thread is alive and its loop turned recently."""
        return self._thread.is_alive() and time.monotonic() - self._last_loop < 5.0

    def inflight(self) -> int:
        return len(self._inflight)

    def stop(self, timeout: float = 5.0) -> None:
        """Store what was submitted, say offline, disconnect, and end the thread."""
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        # Closed here, not by the thread: other threads may still call submit(), and a closed
        # descriptor number can be reused by any file this process opens next.
        if not self._thread.is_alive() and not self._pipe_closed:
            self._pipe_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- the link thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._last_loop = time.monotonic()
                self._store_submissions()
                client = self._client
                if client is None:
                    wait = self._next_attempt - time.monotonic()
                    if wait <= 0:
                        self._connect()
                    else:
                        self._wait(None, min(wait, 0.5))
                    continue
                if self.connected.is_set():
                    self._drain()
                self._wait(client, self._timeout())
        finally:
            self._store_submissions()
            self._shutdown()

    def _timeout(self) -> float:
        """How long the loop may sleep: until the next retry or batch is due, at most
        ``LOOP_MAX_S``."""
        now = time.monotonic()
        due = [self._recheck_at, *list(self._held.values())[:1000]]
        return max(0.0, min(LOOP_MAX_S, *(t - now for t in due)))

    def _wait(self, client: mqtt.Client | None, timeout: float) -> None:
        """Sleep until the socket, a submission or the timeout wakes us; run paho's I/O."""
        sock = client.socket() if client is not None else None
        if client is not None and sock is None:
            # paho closed the socket itself (e.g. the broker dropped us during the TLS or MQTT
            # handshake, as with a refused client certificate): nothing would ever wake us.
            self._lost("the connection was closed")
            return
        rlist: list[Any] = [self._wake_r]
        wlist: list[Any] = []
        if client is not None and sock is not None:
            rlist.append(sock)
            if client.want_write():
                wlist.append(sock)
        try:
            readable, writable, _ = select.select(rlist, wlist, [], timeout)
        except (OSError, ValueError) as exc:  # the socket was closed under us
            if client is not None:
                self._lost(f"socket error: {exc}")
            return
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        if client is None or sock is None:
            return
        for ready, step in ((readable, client.loop_read), (writable, client.loop_write)):
            if sock in ready and self._client is client:
                rc = step()
                if rc != mqtt.MQTT_ERR_SUCCESS and self._client is client:
                    self._lost(f"network: {mqtt.error_string(rc)}")
                    return
                if step == client.loop_read:
                    self._last_in = time.monotonic()
        if self._client is client:
            rc = client.loop_misc()  # keepalive pings and their timeouts
            if rc != mqtt.MQTT_ERR_SUCCESS and self._client is client:
                self._lost(f"network: {mqtt.error_string(rc)}")
                return
        silent = time.monotonic() - self._last_in
        if self._client is client and self.connected.is_set() and silent > self._silence_limit_s:
            self.counters["keepalive_timeouts"] += 1
            self._lost(f"no packet from the broker for {silent:.1f} s (half-open connection)")

    def _store_submissions(self) -> None:
        items: list[tuple[Cls, str, str, bytes]] = []
        try:
            while len(items) < 1000:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if not items:
            return
        results = self.outbox.put_many(items)
        for (cls, key, _, _), result in zip(items, results, strict=True):
            if isinstance(result, OutboxError):
                self.counters[f"store_failed_{cls.name.lower()}"] += 1
                if cls is not Cls.TELEMETRY:
                    log.error("hard case %s not accepted: %s", key, result)
                continue
            if self.on_stored is not None:
                self.on_stored(cls.name.lower(), key)
        self._dirty = True

    def _connect(self) -> None:
        m = self.settings.mqtt
        client = new_client(self.settings, f"edge-agent-{self.device}")
        client.will_set(self.topics.status(self.device), self._will_payload, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self.counters["connect_attempts"] += 1
        try:
            client.connect(m.host, m.port, keepalive=m.keepalive_s, clean_start=True)
        except (OSError, ValueError) as exc:
            self._failed_attempt(f"cannot reach {m.host}:{m.port}: {exc}")
            return
        self._client = client

    def _failed_attempt(self, why: str) -> None:
        delay = backoff_s(self.settings.link, self._attempt)
        self._attempt += 1
        self._next_attempt = time.monotonic() + delay
        if why != self.last_error or self._attempt % 10 == 1:
            log.warning("broker connection failed (%s); retry in %.1f s", why, delay)
        self.last_error = why

    def _lost(self, why: str) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except (OSError, ValueError) as exc:
                log.debug("closing a lost connection: %s", exc)
        if self._inflight:
            self.counters["inflight_replayed"] += sum(len(f.ids) for f in self._inflight.values())
        self._inflight.clear()  # still in the outbox: replayed on the next connection
        # What the broker took on this connection but the cloud has not answered: if the broker
        # died, it died with them. Sent again as soon as there is a connection.
        now = time.monotonic()
        for row, generation in self._awaiting.items():
            if generation == self._generation:
                self._held[row] = now
        self._dirty = True
        if was_connected:
            self.counters["disconnects"] += 1
            # The backoff starts again only after a connection that lasted a keepalive: a
            # broker that accepts and then drops us at once (mosquitto 2.0 does so after
            # refusing a publish by ACL) must not cause a tight reconnect loop.
            if time.monotonic() - self._connected_at >= self.settings.mqtt.keepalive_s:
                self._attempt = 0
        self._failed_attempt(why)

    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        if rc.is_failure:
            self.counters["connect_refused"] += 1
            log.error("broker refused the connection: %s", rc)
            self._lost(f"CONNACK refused: {rc}")
            return
        set_nodelay(client)
        self._generation += 1
        self._connected_at = self._last_in = time.monotonic()
        self.last_error = ""
        self.counters["connects"] += 1
        client.publish(self.topics.status(self.device), self._status_payload, qos=1, retain=True)
        client.subscribe(self.topics.verdict(self.device), qos=1)
        if self.on_command is not None:
            client.subscribe(
                [(self.topics.model_cmd(self.device), 1), (self.topics.model_chunk(self.device), 1)]
            )
        self.connected.set()
        self._dirty = True
        log.info("connected to %s:%d", self.settings.mqtt.host, self.settings.mqtt.port)

    def _on_disconnect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        if client is self._client and not self._stop.is_set():
            self._lost(f"disconnected: {rc}")

    def _on_publish(
        self, client: mqtt.Client, _ud: Any, mid: int, rc: ReasonCode, _props: Any
    ) -> None:
        if client is not self._client:
            return
        entry = self._inflight.pop(mid, None)
        if entry is None:
            return  # status messages, or a message of a lost connection
        name = entry.cls.name.lower()
        lk = self.settings.link
        if rc.is_failure:
            self.counters[f"nacked_{name}"] += len(entry.ids)
            log.error("broker refused %d %s message(s): %s", len(entry.ids), name, rc)
            self._hold(entry.ids, lk.retry_refused_s)
            return
        hard = entry.cls is not Cls.TELEMETRY
        if rc.value == NO_MATCHING_SUBSCRIBERS and hard:
            # No cloud worker is subscribed (yet): the broker would drop a hard case. Keep it.
            self.counters[f"no_subscribers_{name}"] += len(entry.ids)
            if self.counters[f"no_subscribers_{name}"] == len(entry.ids):
                log.warning("no cloud worker subscribed to %s messages; holding them", name)
            self._hold(entry.ids, lk.retry_no_subscribers_s)
            return
        if hard and self._confirm:
            # The broker has it; the verdict (or a resend after the timeout) settles it.
            self.counters[f"published_{name}"] += len(entry.ids)
            self._awaiting.update(dict.fromkeys(entry.ids, self._generation))
            self._hold(entry.ids, lk.confirm_timeout_s)
            return
        failed: OutboxError | None = None
        try:
            self.outbox.ack(entry.ids)
        except OutboxError as exc:
            failed = exc
        if failed is not None:
            # Delivered, but the outbox cannot forget it (read-only, disk full): it stays
            # stored and is sent again later with the same idempotency key.
            self.counters["ack_failed"] += len(entry.ids)
            log.error(
                "cannot record the acknowledgement of %d message(s): %s", len(entry.ids), failed
            )
            self._hold(entry.ids, lk.retry_refused_s)
            return
        self.counters[f"published_{entry.cls.name.lower()}"] += len(entry.ids)
        self._dirty = True

    def _hold(self, ids: list[int], pause_s: float) -> None:
        retry_at = time.monotonic() + pause_s
        for row in ids:
            self._held[row] = retry_at

    def _on_message(self, _client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if msg.topic != self.topics.verdict(self.device):
            self.counters["command_messages"] += 1
            if self.on_command is not None:
                self.on_command(msg.topic, payload)
            return
        self.counters["verdict_messages"] += 1
        if self._confirm:
            self._settle(verdict_keys(payload))
        if self.on_verdict is not None:
            self.on_verdict(payload)

    def _settle(self, keys: list[str]) -> None:
        """The cloud answered these hard cases: forget them."""
        if not keys:
            return
        failed: OutboxError | None = None
        rows: list[int] = []
        try:
            rows = self.outbox.confirm(keys)
        except OutboxError as exc:
            failed = exc
        if failed is not None:
            # Kept, and sent again after the timeout: the cloud answers a duplicate again.
            self.counters["confirm_failed"] += len(keys)
            log.error("cannot record %d verdict(s) in the outbox: %s", len(keys), failed)
            return
        for row in rows:
            if self._awaiting.pop(row, None) is not None:
                self._held.pop(row, None)
                continue
            # The verdict overtook the broker's PUBACK: nothing to wait for after it.
            for entry in self._inflight.values():
                if row in entry.ids:
                    entry.ids.remove(row)
                    self.counters[f"published_{entry.cls.name.lower()}"] += 1
                    break
        self.counters["confirmed"] += len(rows)

    def set_model(self, model: str) -> None:
        """The model that serves changed: say so in the retained status (and the last will)."""
        self.model = model
        self._status_payload = encoder.encode(
            Status(v=SCHEMA_VERSION, device=self.device, state="online", model=model)
        )
        self._will_payload = encoder.encode(
            Status(v=SCHEMA_VERSION, device=self.device, state="offline", model=model)
        )
        self._status_due = True
        self._wake()

    def _drain(self) -> None:
        if self._status_due and self._client is not None:
            self._status_due = False
            self._client.publish(
                self.topics.status(self.device), self._status_payload, qos=1, retain=True
            )
        window = self.settings.link.inflight_window
        now = time.monotonic()
        if self._held and min(self._held.values()) <= now:
            due = [k for k, t in self._held.items() if t <= now]
            for row in due:
                del self._held[row]
                if self._awaiting.pop(row, None) is not None:
                    self.counters["unconfirmed_resent"] += 1
            self._dirty = True
        if now >= self._recheck_at:
            self._recheck_at = float("inf")
            self._dirty = True
        if not self._dirty:
            return
        self._dirty = False
        busy = {row for f in self._inflight.values() for row in f.ids} | set(self._held)
        for cls in Cls:
            room = window - len(self._inflight)
            if room <= 0:
                self._dirty = True
                return
            failed: OutboxError | None = None
            messages: list[Message] = []
            try:
                if cls is Cls.BATCH:
                    self._drain_batches(room, busy)
                else:
                    messages = self.outbox.pending(cls, room, busy)
            except OutboxError as exc:
                failed = exc
            if failed is not None:
                self.counters["outbox_read_failed"] += 1
                log.error("cannot read the outbox: %s", failed)
                self._recheck_at = time.monotonic() + self.settings.link.retry_refused_s
                return
            for message in messages:
                self._publish_one(message)

    def _drain_batches(self, room: int, busy: set[int]) -> None:
        lk = self.settings.link
        for _ in range(room):
            cases = self.outbox.pending(Cls.BATCH, lk.batch_max_cases, busy)
            if not cases:
                return
            ttl = self.settings.outbox.batch_ttl_s
            oldest_age = ttl - cases[0].remaining_ttl_s
            if (
                len(cases) < lk.batch_max_cases
                and oldest_age < lk.batch_max_wait_s
                and not self._flush_batches.is_set()
                and not self._stop.is_set()
            ):
                # The batch is still filling: look again when its oldest case is due.
                due = time.monotonic() + lk.batch_max_wait_s - oldest_age
                self._recheck_at = min(self._recheck_at, due)
                return
            self._publish_batch(cases)
            busy.update(c.id for c in cases)

    def _publish_one(self, message: Message) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [(IDEMPOTENCY_PROPERTY, message.key)]
        props.MessageExpiryInterval = max(1, int(message.remaining_ttl_s))
        if message.cls is Cls.URGENT:
            props.ResponseTopic = self.topics.verdict(self.device)
            props.CorrelationData = message.key.encode()
        self._send(message.topic, message.payload, props, [message.id], message.cls)

    def _publish_batch(self, cases: list[Message]) -> None:
        body = (
            b'{"v":%d,"device":"%s","cases":[' % (SCHEMA_VERSION, self.device.encode())
            + b",".join(c.payload for c in cases)
            + b"]}"
        )
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [(IDEMPOTENCY_PROPERTY, f"{cases[0].key}+{len(cases)}")]
        props.MessageExpiryInterval = max(1, int(min(c.remaining_ttl_s for c in cases)))
        self._send(self.topics.batch(self.device), body, props, [c.id for c in cases], Cls.BATCH)

    def _send(
        self, topic: str, payload: bytes, props: Properties, ids: list[int], cls: Cls
    ) -> None:
        client = self._client
        if client is None:
            return
        info = client.publish(topic, payload, qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._lost(f"publish failed: {mqtt.error_string(info.rc)}")
            return
        self._inflight[info.mid] = _Inflight(ids, cls, time.monotonic_ns())

    def _shutdown(self) -> None:
        client, self._client = self._client, None
        self.connected.clear()
        if client is None:
            return
        try:
            offline = client.publish(
                self.topics.status(self.device), self._will_payload, qos=1, retain=True
            )
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not offline.is_published():
                if client.loop(timeout=0.01) != mqtt.MQTT_ERR_SUCCESS:
                    break
            client.disconnect()
        except (OSError, ValueError, RuntimeError) as exc:
            log.debug("clean disconnect failed: %s", exc)
