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

The connection: the MQTT session of ``mqtt/session.py`` (paho-mqtt 2.x, MQTT v5,
TCP_NODELAY, optional TLS and credentials, backoff with jitter). A retained ``status`` message
says ``online`` after every connect; the last will says ``offline``. A CONNACK
with a failure reason code (bad credentials, not authorised) is a failed
attempt, never "connected". A broker silent for 1.5x the keepalive (a half-open
connection: the broker hangs, or a NAT forgot us) is taken as lost, counted in
``keepalive_timeouts``.
Each connection uses a fresh paho client, and what was in flight on a lost
connection is replayed from the outbox on the next one (duplicates carry the
same idempotency key), so nothing depends on paho's in-memory queue.

Telemetry snapshots (``telemetry.qos = 0``, the default) skip the outbox while the link
is connected and has none stored: published at QoS 0 at the loop's next turn, without
waking the link (docs/config.md).

Draining order: urgent first, then batch, then telemetry, with at most
``link.inflight_window`` unacknowledged publishes. Batch-class rows (one hard
case each) are sent together as one ``batch`` message when enough have
gathered or the oldest has waited long enough.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import Settings
from edge_agent.delivery.inflight import Book
from edge_agent.delivery.outbox import Cls, Message, Outbox
from edge_agent.delivery.submissions import Payload, Submissions
from edge_agent.errors import OutboxError
from edge_agent.mqtt.properties import publish_properties
from edge_agent.mqtt.session import Session, Waker, disconnect_quietly, on_disconnect, pump
from edge_agent.wire.messages import (
    DECODE_ERRORS,
    IDEMPOTENCY_PROPERTY,
    Topics,
    batch_payload,
    decode_verdicts,
    status_payload,
)

log = logging.getLogger(__name__)

#: PUBACK reason code "No matching subscribers": the broker took the message and gave it to nobody.
NO_MATCHING_SUBSCRIBERS = 0x10
#: Longest sleep of the link loop (bounds how late keepalive checks and retries run).
LOOP_MAX_S = 0.5


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
        self._telemetry_qos = settings.telemetry.qos
        self.outbox = outbox
        self.device = device_id
        self.model = model
        self.topics = Topics(settings.mqtt.topic_prefix)
        self._snapshot_topic = self.topics.telemetry(device_id)
        self.on_verdict = on_verdict
        self.on_stored = on_stored
        self.on_command = on_command
        self._status_due = False
        self.counters: Counter[str] = Counter()
        self.connected = threading.Event()
        self._session = Session(settings, f"edge-agent-{device_id}", self.counters)
        self._queue = Submissions(
            settings.link.submit_queue, settings.link.max_payload_bytes, self.counters
        )
        self._stop = threading.Event()
        self._flush_batches = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-link", daemon=True)
        self._client: mqtt.Client | None = None
        self._book = Book()
        self._confirm = settings.link.confirm == "verdict"
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
        self._waker = Waker()
        self._status_payload = status_payload(device_id, "online", model)
        self._will_payload = status_payload(device_id, "offline", model)

    # -- public API (any thread) ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def last_error(self) -> str:
        """Why the last connection attempt failed ("" while connected)."""
        return self._session.last_error

    def submit(self, cls: Cls, key: str, topic: str, payload: Payload) -> bool:
        """Hand a message to the link thread without blocking; False if the queue is full,
        or if its body is over ``link.max_payload_bytes`` (a body made on the link thread
        is refused there, counted the same: ``submissions.py``)."""
        if not self._queue.put(cls, key, topic, payload):
            return False
        if topic != self._snapshot_topic:
            # A telemetry snapshot waits for the loop's next turn (at most LOOP_MAX_S): waking
            # the link for each one handed the interpreter to and fro with the scoring thread.
            self._waker.wake()
        return True

    def flush_batches(self) -> None:
        """Send waiting batch cases now instead of waiting for a full batch."""
        self._flush_batches.set()
        self._dirty = True
        self._waker.wake()

    def idle(self) -> bool:
        """True when nothing is queued, stored or in flight."""
        d = self.outbox.depth()
        return (
            not self._queue
            and not self._book.inflight
            and d["urgent"] == 0
            and d["batch"] == 0
            and d["telemetry"] == 0
        )

    @property
    def healthy(self) -> bool:
        """The link thread is alive and its loop turned recently."""
        return self._thread.is_alive() and time.monotonic() - self._last_loop < 5.0

    def inflight(self) -> int:
        return len(self._book.inflight)

    def stop(self, timeout: float = 5.0) -> None:
        """Store what was submitted, say offline, disconnect, and end the thread."""
        self._stop.set()
        self._waker.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        # Closed here, not by the thread: other threads may still call submit(), and a closed
        # descriptor number can be reused by any file this process opens next.
        if not self._thread.is_alive():
            self._waker.close()

    # -- the link thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._last_loop = time.monotonic()
                self._store_submissions()
                client = self._client
                if client is None:
                    wait = self._session.due_in()
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
        due = [self._recheck_at, *self._book.next_due()]
        return max(0.0, min(LOOP_MAX_S, *(t - now for t in due)))

    def _wait(self, client: mqtt.Client | None, timeout: float) -> None:
        """Sleep until the socket, a submission or the timeout wakes us; run paho's I/O."""
        why, came_in = pump(client, self._waker, timeout, lambda: self._client is client)
        if client is None or self._client is not client:
            return
        if why:
            self._lost(why)
            return
        if came_in:
            self._last_in = time.monotonic()
        silent = time.monotonic() - self._last_in
        if self.connected.is_set() and silent > self._silence_limit_s:
            self.counters["keepalive_timeouts"] += 1
            self._lost(f"no packet from the broker for {silent:.1f} s (half-open connection)")

    def _store_submissions(self) -> None:
        items = self._send_telemetry(self._queue.take())
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

    def _send_telemetry(
        self, items: list[tuple[Cls, str, str, bytes]]
    ) -> list[tuple[Cls, str, str, bytes]]:
        """``telemetry.qos = 0``: while connected with no telemetry stored, snapshots (the
        telemetry topic's messages; not alerts or model events, which share their class) are
        published at once at QoS 0 instead of stored, published and deleted. A snapshot's
        counters are totals, so the next one says what a lost one said; and the outbox's
        insert, query, PUBACK and delete each handed the interpreter to and fro with the
        scoring thread (``edge-agent bench``, telemetry on/off). What cannot be sent now (no
        connection, a backlog to keep in order, paho refusing it) is stored; the rest returned."""
        client = self._client
        if (
            self._telemetry_qos != 0
            or client is None
            or not self.connected.is_set()
            or self.outbox.depth()["telemetry"]
        ):
            return items
        keep = []
        for item in items:
            _, key, topic, payload = item
            if topic != self._snapshot_topic:  # alerts and model events: stored, QoS 1
                keep.append(item)
                continue
            props = publish_properties(
                [(IDEMPOTENCY_PROPERTY, key)], max(1, int(self.settings.outbox.telemetry_ttl_s))
            )
            if client.publish(topic, payload, qos=0, properties=props).rc == mqtt.MQTT_ERR_SUCCESS:
                self.counters["published_telemetry"] += 1
            else:
                keep.append(item)
        return keep

    def _setup(self, client: mqtt.Client) -> None:
        client.will_set(self.topics.status(self.device), self._will_payload, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = on_disconnect(lambda: self._client, self._stop, self._lost)
        client.on_publish = self._on_publish
        client.on_message = self._on_message

    def _connect(self) -> None:
        self._client = self._session.open(self._setup)

    def _lost(self, why: str) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        client, self._client = self._client, None
        if client is not None:
            disconnect_quietly(client)
        # In flight: still in the outbox, replayed on the next connection. What the broker took
        # on this connection but the cloud has not answered: if the broker died, it died with
        # them; sent again as soon as there is a connection.
        replayed = self._book.lost()
        if replayed:
            self.counters["inflight_replayed"] += replayed
        self._dirty = True
        if was_connected:
            self.counters["disconnects"] += 1
            # The backoff starts again only after a connection that lasted a keepalive: a
            # broker that accepts and then drops us at once (mosquitto 2.0 does so after
            # refusing a publish by ACL) must not cause a tight reconnect loop.
            if time.monotonic() - self._connected_at >= self.settings.mqtt.keepalive_s:
                self._session.reset_backoff()
        self._session.failed(why)

    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        if rc.is_failure:
            self.counters["connect_refused"] += 1
            log.error("broker refused the connection: %s", rc)
            self._lost(f"CONNACK refused: {rc}")
            return
        self._session.connected(client)
        self._book.connected()
        self._connected_at = self._last_in = time.monotonic()
        client.publish(self.topics.status(self.device), self._status_payload, qos=1, retain=True)
        client.subscribe(self.topics.verdict(self.device), qos=1)
        if self.on_command is not None:
            client.subscribe(
                [(self.topics.model_cmd(self.device), 1), (self.topics.model_chunk(self.device), 1)]
            )
        self.connected.set()
        self._dirty = True
        log.info("connected to %s:%d", self.settings.mqtt.host, self.settings.mqtt.port)

    def _on_publish(
        self, client: mqtt.Client, _ud: Any, mid: int, rc: ReasonCode, _props: Any
    ) -> None:
        if client is not self._client:
            return
        entry = self._book.acknowledged(mid)
        if entry is None:
            return  # status messages, or a message of a lost connection
        name = entry.cls.name.lower()
        lk = self.settings.link
        if rc.is_failure:
            self.counters[f"nacked_{name}"] += len(entry.ids)
            log.error("broker refused %d %s message(s): %s", len(entry.ids), name, rc)
            self._book.hold(entry.ids, lk.retry_refused_s)
            return
        hard = entry.cls is not Cls.TELEMETRY
        if rc.value == NO_MATCHING_SUBSCRIBERS and hard:
            # No cloud worker is subscribed (yet): the broker would drop a hard case. Keep it.
            self.counters[f"no_subscribers_{name}"] += len(entry.ids)
            if self.counters[f"no_subscribers_{name}"] == len(entry.ids):
                log.warning("no cloud worker subscribed to %s messages; holding them", name)
            self._book.hold(entry.ids, lk.retry_no_subscribers_s)
            return
        if hard and self._confirm:
            # The broker has it; the verdict (or a resend after the timeout) settles it.
            self.counters[f"published_{name}"] += len(entry.ids)
            self._book.await_verdict(entry.ids, lk.confirm_timeout_s)
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
            self._book.hold(entry.ids, lk.retry_refused_s)
            return
        self.counters[f"published_{entry.cls.name.lower()}"] += len(entry.ids)
        self._dirty = True

    def _on_message(self, _client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if msg.topic != self.topics.verdict(self.device):
            self.counters["command_messages"] += 1
            if self.on_command is not None:
                self.on_command(msg.topic, payload)
            return
        self.counters["verdict_messages"] += 1
        if self._confirm:
            self._settle(_verdict_keys(payload))
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
        # A verdict that overtook the broker's PUBACK: nothing to wait for after it.
        for cls in self._book.settled(rows):
            self.counters[f"published_{cls.name.lower()}"] += 1
        self.counters["confirmed"] += len(rows)

    def set_model(self, model: str) -> None:
        """The model that serves changed: say so in the retained status (and the last will)."""
        self.model = model
        self._status_payload = status_payload(self.device, "online", model)
        self._will_payload = status_payload(self.device, "offline", model)
        self._status_due = True
        self._waker.wake()

    def _drain(self) -> None:
        if self._status_due and self._client is not None:
            self._status_due = False
            self._client.publish(
                self.topics.status(self.device), self._status_payload, qos=1, retain=True
            )
        window = self.settings.link.inflight_window
        now = time.monotonic()
        released, unconfirmed = self._book.release_due()
        if released:
            self.counters["unconfirmed_resent"] += unconfirmed
            self._dirty = True
        if now >= self._recheck_at:
            self._recheck_at = float("inf")
            self._dirty = True
        if not self._dirty:
            return
        self._dirty = False
        busy = self._book.busy()
        for cls in Cls:
            room = window - len(self._book.inflight)
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
        urgent = message.cls is Cls.URGENT
        props = publish_properties(
            [(IDEMPOTENCY_PROPERTY, message.key)],
            max(1, int(message.remaining_ttl_s)),
            self.topics.verdict(self.device) if urgent else None,
            message.key.encode() if urgent else None,
        )
        self._send(message.topic, message.payload, props, [message.id], message.cls)

    def _publish_batch(self, cases: list[Message]) -> None:
        body = batch_payload(self.device, [c.payload for c in cases])
        props = publish_properties(
            [(IDEMPOTENCY_PROPERTY, f"{cases[0].key}+{len(cases)}")],
            max(1, int(min(c.remaining_ttl_s for c in cases))),
        )
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
        self._book.sent(info.mid, ids, cls)

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


def _verdict_keys(payload: bytes) -> list[str]:
    """Keys a verdict message answers; [] for anything else (the reconciler counts those)."""
    try:
        return [v.key for v in decode_verdicts(payload)]
    except DECODE_ERRORS:
        return []
