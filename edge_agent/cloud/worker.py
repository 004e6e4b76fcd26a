"""The cloud fallback worker behind ``edge-agent cloud``: urgent and batch tiers.

A worker holds one MQTT v5 connection and subscribes, with QoS 1, to two
*shared* subscriptions, ``$share/<cloud.group>/<prefix>/+/hard`` and
``.../+/batch``: every worker started with the same group gets a share of the
devices' hard cases and the broker does the distribution. Each message is
handled on the worker's network thread, in the order it arrived:

* **urgent** (``<prefix>/<device>/hard``, one ``HardCase``): scored at once
  with the cloud model pack; a ``Verdict`` is published (QoS 1) to the
  request's ResponseTopic with its CorrelationData copied back (no
  ResponseTopic: ``<prefix>/<device>/verdict``).
* **batch** (``<prefix>/<device>/batch``, one ``Batch``): its cases are scored
  in one model call per ``cloud.batch_max`` cases and answered with one
  ``BatchVerdicts`` message on ``<prefix>/<device>/verdict``.

The broker's PUBACK for a request is sent only after the request was handled,
so a worker that dies mid-way leaves the message unacknowledged.

What is accepted and how refusals are counted is ``intake.py``; a case seen again is
answered from the worker's memory of its answers (``intake.AnswerMemory``) or, with
``cloud.ledger_path``, from the ledger's database, which workers on one host can share
(``books.py``, ``ledger_store.py``).
A batch is refused as a whole only when its envelope is bad (size, JSON, version, device);
each case is then decoded and validated on its own, so one bad case is refused alone and
the others are answered. The ``CostLedger`` (``ledger.py``) prices what was scored; each
charge is committed to the ledger's database before the verdict it pays for is published. With
``cloud.backend = "endpoint"`` an OpenAI-compatible endpoint answers instead of the cloud
pack (``tiers.py``).

Connection handling: the MQTT session of ``mqtt/session.py`` (client id
``edge-cloud-<cloud.worker_id or host-pid>``, clean start, reconnects with backoff and full
jitter), subscriptions renewed on every connect. A CONNACK or SUBACK with a failure reason
code is logged as an error and counted, never treated as success; a refusal that no retry
can cure (bad credentials, not authorised, banned, ...) ends the worker after
``PERMANENT_REFUSAL_LIMIT`` consecutive attempts, so that the service exits with a failure
instead of idling (systemd restarts it and says why).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.cloud.books import Books
from edge_agent.cloud.endpoint import EndpointTier
from edge_agent.cloud.intake import (
    Answer,
    AnswerMemory,
    BatchCtx,
    Pending,
    Rejected,
    Throttle,
    UrgentCtx,
    chunks,
    decode_batch,
    decode_case,
    reply_topic,
    validate,
)
from edge_agent.cloud.ledger import CostLedger
from edge_agent.cloud.prompt import Prompt
from edge_agent.cloud.tiers import EndpointTiers, ack
from edge_agent.cloud.verdicts import Verdicts
from edge_agent.config import Settings
from edge_agent.errors import ConfigError, EdgeAgentError, LedgerError
from edge_agent.ingest.readings import Reading, ReadingDecoder
from edge_agent.models.pack import resolve
from edge_agent.mqtt.session import Session, disconnect_quietly, on_disconnect
from edge_agent.scoring.backends.base import BackendOptions
from edge_agent.scoring.scorer import Decision, Scorer
from edge_agent.wire.messages import SCHEMA_VERSION, HardCase, Tier, Topics, WorkerStatus, encoder

log = logging.getLogger(__name__)

#: Longest time the network thread sleeps in one paho ``loop`` call (bounds stop latency).
LOOP_TIMEOUT_S = 0.1
#: The same while endpoint requests are open: how late a finished request's verdict can be
#: picked up by the network thread (which alone touches the MQTT client).
BUSY_LOOP_TIMEOUT_S = 0.005
#: A rejection reason is logged at most once per this many seconds; the rest are counted.
REJECT_LOG_INTERVAL_S = 10.0
#: At stop: longest wait for the broker's acknowledgements of verdicts already published.
DRAIN_TIMEOUT_S = 2.0
#: Consecutive permanent refusals after which the worker gives up (exit code 1).
PERMANENT_REFUSAL_LIMIT = 5


class CloudWorker:
    """One cloud worker; see the module docstring.

    ``scorer``: an already opened Scorer (tests); by default the worker opens
    ``cloud.pack`` at ``start`` and closes it at ``stop``.
    """

    def __init__(self, settings: Settings, scorer: Scorer | None = None) -> None:
        self.settings = settings
        self.cloud = settings.cloud
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.worker_id = self.cloud.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.client_id = f"edge-cloud-{self.worker_id}"
        self.counters: Counter[str] = Counter()
        self.ledger = CostLedger.from_settings(self.cloud, settings.endpoint)
        self.memory = AnswerMemory(self.cloud.dedupe_keys)
        self.books = Books.open(self.cloud, self.worker_id, self.ledger, self.memory, self.counters)
        self.throttle = Throttle(REJECT_LOG_INTERVAL_S)
        self.connected = threading.Event()
        self.ready = threading.Event()  #: connected and both subscriptions granted
        self.failed = ""  #: why the worker gave up, if it did
        self.signalled = 0  #: the signal that stopped ``service.run_forever``, if one did
        self._session = Session(settings, self.client_id, self.counters)
        self._scorer = scorer
        self._owns_scorer = scorer is None
        self._readings: ReadingDecoder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._sub_mid: int | None = None
        self.verdicts = Verdicts(self.topics, self.worker_id, self.counters)
        self._stopped = False
        self._endpoint: EndpointTiers | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            raise RuntimeError("the worker is not started")
        return self._scorer

    @property
    def last_error(self) -> str:
        """Why the last connection attempt failed ("" while connected)."""
        return self._session.last_error

    def start(self) -> None:
        """Open the cloud pack (unless given a scorer) and start the network thread."""
        if self._thread is not None:
            raise RuntimeError("the worker was already started")
        m = self.settings.model
        if self.cloud.backend == "endpoint" and self._owns_scorer:
            pack = resolve(self.cloud.pack, m.packs_dir, m.store_dir)
            tier = EndpointTier(self.settings.endpoint, Prompt.from_pack(pack))
            self._endpoint = EndpointTiers(self.settings.endpoint, tier, self)
            self._readings = ReadingDecoder(tuple(pack.manifest.input.shape))
            log.info(
                "cloud tier: endpoint %s, model %s, prompt of %s",
                self.settings.endpoint.base_url,
                self.settings.endpoint.model,
                pack.ref,
            )
        else:
            if self._scorer is None:
                pack = resolve(self.cloud.pack, m.packs_dir, m.store_dir)
                self._scorer = Scorer.open(pack, BackendOptions.of(m))
                log.info("cloud pack %s loaded from %s", pack.ref, pack.path)
            self._readings = ReadingDecoder(self.scorer.shape)
        self._thread = threading.Thread(target=self._run, name="edge-cloud-net", daemon=True)
        self._thread.start()

    def wait_stopped(self, timeout: float) -> bool:
        """Wait until a stop was asked for (or the worker gave up); True if it was."""
        return self._stop.wait(timeout)

    def request_stop(self) -> None:
        """Ask the worker to stop (safe from a signal handler); ``stop`` finishes the job."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Leave the group, let published verdicts be acknowledged, disconnect, close the
        ledger's database."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        alive = False
        if self._thread is not None:
            self._thread.join(timeout)
            alive = self._thread.is_alive()
            if alive:
                log.error("the network thread did not end within %.1f s", timeout)
        if not alive and self._endpoint is not None:
            self._endpoint.close()
        if self.books.store is not None and not alive:
            self.books.store.close()
        if self._owns_scorer and self._scorer is not None and not alive:
            self._scorer.close()

    # -- what the endpoint mode uses (tiers.Host) ---------------------------------------

    def prune_ledger(self) -> None:
        """Forget answers older than ``cloud.answers_keep_s`` (no-op without a ledger file)."""
        self.books.prune(self.cloud.answers_keep_s)

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def current_client(self) -> mqtt.Client | None:
        return self._client

    # -- network thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                client = self._client
                if self._endpoint is not None:
                    self._endpoint.service()
                if client is None:
                    wait = self._session.due_in()
                    if wait > 0:
                        self._stop.wait(min(wait, 0.5 if self._endpoint is None else 0.05))
                    else:
                        self._connect()
                    continue
                busy = self._endpoint is not None and self._endpoint.busy
                rc = client.loop(timeout=BUSY_LOOP_TIMEOUT_S if busy else LOOP_TIMEOUT_S)
                if rc != mqtt.MQTT_ERR_SUCCESS and self._client is client:
                    self._lost(f"network: {mqtt.error_string(rc)}")
        except Exception as exc:
            log.exception("the cloud worker's network thread failed")
            self.failed = f"internal error: {exc!r}"
            self._stop.set()
        finally:
            self._shutdown()

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        return encoder.encode(
            WorkerStatus(
                v=SCHEMA_VERSION, worker=self.worker_id, group=self.cloud.group, state=state
            )
        )

    def _setup(self, client: mqtt.Client) -> None:
        client.will_set(
            self.topics.worker_status(self.worker_id), self._status("offline"), qos=1, retain=True
        )
        client.max_inflight_messages_set(self.settings.link.inflight_window)
        client.on_connect = self._on_connect
        client.on_disconnect = on_disconnect(lambda: self._client, self._stop, self._lost)
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        if self._endpoint is not None:
            # A request is acknowledged once answered (the answer comes from another thread).
            client.manual_ack_set(True)

    def _connect(self) -> None:
        try:
            self._client = self._session.open(self._setup, self.cloud.receive_maximum)
        except ConfigError as exc:
            self._give_up(f"cannot connect: {exc}")

    def _give_up(self, why: str) -> None:
        """A failure no retry will cure: stop, so that the service exits with an error."""
        self.failed = why
        log.error("giving up: %s", why)
        self._stop.set()

    def _lost(self, why: str) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.ready.clear()
        client, self._client = self._client, None
        self.verdicts.lost()
        if client is not None:
            disconnect_quietly(client)
        if was_connected:
            self.counters["disconnects"] += 1
        self._session.failed(why)

    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        if client is not self._client:
            return
        if rc.is_failure:
            self.counters["connect_refused"] += 1
            log.error("broker refused the connection of %s: %s", self.client_id, rc)
            refusals = self._session.refused(rc)
            if refusals >= PERMANENT_REFUSAL_LIMIT:
                self._give_up(f"the broker refused the connection {refusals} times: {rc}")
            self._lost(f"CONNACK refused: {rc}")
            return
        self._session.connected(client)
        self._session.reset_backoff()
        self.connected.set()
        result, mid = client.subscribe([(topic, 1) for topic in self._shared()])
        if result != mqtt.MQTT_ERR_SUCCESS:
            self._lost(f"subscribe failed: {mqtt.error_string(result)}")
            return
        self._sub_mid = mid
        log.info(
            "connected to %s:%d as %s",
            self.settings.mqtt.host,
            self.settings.mqtt.port,
            self.client_id,
        )

    def _shared(self) -> list[str]:
        return [self.topics.shared(self.cloud.group, kind) for kind in ("hard", "batch")]

    def _on_subscribe(
        self, client: mqtt.Client, _ud: Any, mid: int, codes: list[ReasonCode], _props: Any
    ) -> None:
        if client is not self._client or mid != self._sub_mid:
            return
        refused = [c for c in codes if c.is_failure]
        if refused:
            self.counters["subscribe_refused"] += 1
            self._give_up(
                f"the broker refused the shared subscriptions of group {self.cloud.group!r}:"
                f" {refused[0]}"
            )
            return
        client.publish(
            self.topics.worker_status(self.worker_id), self._status("online"), qos=1, retain=True
        )
        self.ready.set()
        log.info("serving %s and %s", *self._shared())

    def _on_publish(
        self, client: mqtt.Client, _ud: Any, mid: int, rc: ReasonCode, _props: Any
    ) -> None:
        if client is not self._client:
            return
        self.verdicts.acknowledged(mid, str(rc) if rc.is_failure else "")

    def _shutdown(self) -> None:
        """Unsubscribe, wait (bounded) for verdict acknowledgements, disconnect cleanly."""
        client, self._client = self._client, None
        was_ready = self.ready.is_set()
        self.connected.clear()
        self.ready.clear()
        if client is None:
            return
        try:
            if was_ready:
                client.unsubscribe(self._shared())
                # Keep serving the client's I/O while the broker acknowledges our verdicts.
                self._client = client
                if self._endpoint is not None:
                    self._endpoint.close()
                self.verdicts.drain(client, DRAIN_TIMEOUT_S)
                self._say_offline(client)
                self._client = None
            client.disconnect()
        except (OSError, ValueError, RuntimeError) as exc:
            log.debug("clean disconnect failed: %s", exc)
        finally:
            self._client = None

    def _say_offline(self, client: mqtt.Client) -> None:
        """Replace the retained ``online`` (a clean stop sends no last will)."""
        info = client.publish(
            self.topics.worker_status(self.worker_id), self._status("offline"), qos=1, retain=True
        )
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while not info.is_published() and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break

    # -- messages -----------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        received_ns = time.monotonic_ns()
        topic = "?"
        deferred = False
        try:
            topic = msg.topic
            deferred = self._dispatch(client, msg, topic, received_ns)
        except Rejected as rej:
            self._reject(rej, topic)
        except LedgerError as exc:
            self.ledger_failed(exc, 1)
        except UnicodeDecodeError:
            self._reject(Rejected("invalid_utf8", "topic is not valid UTF-8"), topic)
        except Exception:
            # Last line of defence: whatever a message does, the worker keeps serving.
            self.counters["errors"] += 1
            if self.throttle.allow("internal-error")[0]:
                log.exception("unexpected error handling a message on %.200s", topic)
        finally:
            if self._endpoint is not None and not deferred:
                ack(client, msg.mid, msg.qos, client)

    def _dispatch(
        self, client: mqtt.Client, msg: mqtt.MQTTMessage, topic: str, received_ns: int
    ) -> bool:
        """Handle one request; True when its answer (and acknowledgement) comes later."""
        kind = topic.rsplit("/", 1)[-1]
        device = Topics.device_of(topic)
        if len(msg.payload) > self.cloud.max_payload_bytes:
            raise Rejected(
                "too_large", f"payload of {len(msg.payload)} bytes is over cloud.max_payload_bytes"
            )
        if kind == "hard":
            return self._handle_urgent(client, msg, device, received_ns)
        if kind == "batch":
            return self._handle_batch(client, msg, device, received_ns)
        raise Rejected("unknown_topic", "not a hard or batch topic")

    def _reject(self, rej: Rejected, topic: str) -> None:
        self.counters[f"rejected_{rej.reason}"] += 1
        allowed, held = self.throttle.allow(rej.reason)
        if allowed:
            more = f" ({held} more since the last report)" if held else ""
            log.warning(
                "rejected a message on %.200s: %s: %.300s%s", topic, rej.reason, rej.detail, more
            )

    def ledger_failed(self, exc: LedgerError, cases: int) -> None:
        """Cases scored but not answered: their charge could not be recorded. The devices
        send them again (``link.confirm = "verdict"``)."""
        self.counters["ledger_write_failed"] += 1
        self.counters["unanswered_ledger_failed"] += cases
        allowed, held = self.throttle.allow("ledger")
        if allowed:
            more = f" ({held} more since the last report)" if held else ""
            log.error("cases left unanswered: %s%s", exc, more)

    def _validate(self, case: HardCase) -> Reading:
        if self._readings is None:
            raise RuntimeError("the worker is not started")
        return validate(self._readings, case)

    def _score(self, readings: list[Reading]) -> list[Decision]:
        try:
            return self.scorer.score(readings)
        except EdgeAgentError as exc:
            self.counters["score_failed"] += len(readings)
            raise Rejected("score_failed", str(exc)) from None

    def _handle_urgent(
        self, client: mqtt.Client, msg: mqtt.MQTTMessage, device: str, received_ns: int
    ) -> bool:
        case = decode_case(msg.payload, device)
        reply_to = reply_topic(msg, self.topics, device)
        self.books.observe(device, case.readings_total)
        answer = self.books.known(device, case.key)
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        ctx = UrgentCtx(case, reply_to, correlation, client, msg.mid, msg.qos, received_ns)
        if answer is not None:
            self.counters["duplicates"] += 1
        elif self._endpoint is not None:
            if self._endpoint.working(device, case.key):
                self.counters["duplicates_in_flight"] += 1
                return False  # the first copy's answer goes out when it comes
            deadline_ms = case.deadline_ms or self.settings.router.deadline_ms
            deadline_ms -= self.settings.endpoint.deadline_margin_ms
            self._endpoint.submit_urgent(ctx, self._validate(case), deadline_ms)
            return True
        else:
            decision = self._score([self._validate(case)])[0]
            answer = Answer(decision.label, decision.confidence, decision.model)
            self.books.answered(device, Tier.URGENT, [(case.key, answer)])  # before the verdict
            self.counters["urgent_scored"] += 1
        self.verdicts.urgent(client, ctx, answer)
        return False

    def _handle_batch(
        self, client: mqtt.Client, msg: mqtt.MQTTMessage, device: str, received_ns: int
    ) -> bool:
        batch = decode_batch(msg.payload, device)
        self.counters["batches"] += 1
        ctx = BatchCtx(device, [], [], client, msg.mid, msg.qos, received_ns)
        pending = self._take_cases(ctx, batch.cases)
        if self._endpoint is not None and pending:
            self._endpoint.submit_group(ctx, pending)
            return True
        for chunk in chunks(pending, self.cloud.batch_max):
            try:
                decisions = self._score([p.reading for p in chunk])
            except Rejected as rej:
                self._reject(rej, self.topics.batch(device))
                continue
            answers = [Answer(d.label, d.confidence, d.model) for d in decisions]
            try:  # one transaction per chunk, before the verdicts go out
                self.books.answered(
                    device,
                    Tier.BATCH,
                    [(p.case.key, a) for p, a in zip(chunk, answers, strict=True)],
                )
            except LedgerError as exc:
                self.ledger_failed(exc, len(chunk))
                continue
            for p, answer in zip(chunk, answers, strict=True):
                ctx.answers[p.index] = (p.case, answer)
            self.counters["batch_cases_scored"] += len(chunk)
        self.verdicts.batch(self._client, ctx)
        return False

    def _take_cases(self, ctx: BatchCtx, raw_cases: list[Any]) -> list[Pending]:
        """Decode and check each case of a batch on its own: answered from memory, an echo of
        an earlier case of the same batch, refused alone, or pending (returned)."""
        device = ctx.device
        pending: list[Pending] = []
        first_index: dict[str, int] = {}  # key -> index in answers of its first occurrence
        for raw in raw_cases:
            try:
                case = decode_case(raw, device)
                self.books.observe(device, case.readings_total)
                remembered = self.books.known(device, case.key)
                if (
                    remembered is None
                    and self._endpoint
                    and self._endpoint.working(device, case.key)
                ):
                    self.counters["duplicates_in_flight"] += 1
                    continue  # answered when the copy at the endpoint is
                if remembered is not None or case.key in first_index:
                    self.counters["duplicates"] += 1
                    if remembered is None:
                        ctx.echoes.append((len(ctx.answers), first_index[case.key]))
                    ctx.answers.append((case, remembered))
                    continue
                reading = self._validate(case)
            except Rejected as rej:
                self._reject(rej, self.topics.batch(device))
                continue
            first_index[case.key] = len(ctx.answers)
            pending.append(Pending(len(ctx.answers), case, reading))
            ctx.answers.append((case, None))
        return pending
