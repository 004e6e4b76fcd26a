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

Nothing a device sends can crash or stall the worker. A payload over
``cloud.max_payload_bytes`` is refused unparsed; decoding is strict (msgspec
structs that forbid unknown fields); the values go through the same
validation as on the device (``ReadingDecoder.from_values``: shape, finite
numbers); the device named in the payload must be the device segment of the
topic it came on, and a ResponseTopic must lie in that device's own verdict
topic (``<prefix>/<device>/verdict`` or below), so nobody can make the worker
publish elsewhere. Every refusal is counted as ``rejected_<reason>`` and
logged at most once per ``REJECT_LOG_INTERVAL_S`` per reason.

A batch is refused as a whole only when its envelope is bad (size, JSON,
version, device); each case is then decoded and validated on its own, so one
bad case is refused alone and the others are answered.

At-least-once on the wire, effectively-once in the cloud: the model's answer
(label, confidence, model) to each scored case is remembered under its
(device, idempotency key) — the payload's ``key``, which the device also
sends as the ``idempotency-key`` user property — in a bounded LRU of
``cloud.dedupe_keys`` entries. A case seen again is counted in
``duplicates``, is neither scored nor charged again, and is answered again
from memory (so a device whose first answer was lost still gets one). Keys
are scoped by device, so one device cannot pre-empt another's. The memory is
per worker: a redelivery that the broker routes to another worker of the
group is scored there again.

The ``CostLedger`` prices what was scored, per device and UTC day, and
compares it with the all-cloud counterfactual. With ``cloud.ledger_path`` set
it is written atomically every ``LEDGER_WRITE_INTERVAL_S`` and at stop, and
read back at start, so a restart keeps the day's figures. Give every worker
its own ledger path.

Connection handling: a fresh paho client per attempt (client id
``edge-cloud-<cloud.worker_id or host-pid>``, clean start), reconnects with
exponential backoff and full jitter between ``link.reconnect_min_s`` and
``link.reconnect_max_s``, subscriptions renewed on every connect. A CONNACK
or SUBACK with a failure reason code is logged as an error and counted,
never treated as success; a refusal that no retry can cure (bad credentials,
not authorised, banned, ...) ends the worker after
``PERMANENT_REFUSAL_LIMIT`` consecutive attempts, so that the service exits
with a failure instead of idling (systemd restarts it and says why).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import queue
import random
import signal
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal, NamedTuple

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.cloud.endpoint import TRANSIENT, EndpointTier, Job, Prompt, Reply
from edge_agent.config import CloudSettings, EndpointSettings, Settings
from edge_agent.delivery.link import backoff_s, new_client, set_nodelay
from edge_agent.errors import ConfigError, EdgeAgentError, ReadingError
from edge_agent.ingest.readings import Reading, ReadingDecoder
from edge_agent.models.pack import resolve
from edge_agent.scoring.backends.base import BackendOptions
from edge_agent.scoring.scorer import Decision, Scorer
from edge_agent.wire.messages import (
    IDEMPOTENCY_PROPERTY,
    SCHEMA_VERSION,
    BatchVerdicts,
    HardCase,
    Topics,
    Verdict,
    encoder,
)

log = logging.getLogger(__name__)

Tier = Literal["urgent", "batch"]

#: Seconds between two writes of the ledger file while running (it is also written at stop).
LEDGER_WRITE_INTERVAL_S = 30.0
#: UTC days of per-day figures the ledger keeps; older days are dropped (totals too).
LEDGER_KEEP_DAYS = 400
#: Longest time the network thread sleeps in one paho ``loop`` call (bounds stop latency).
LOOP_TIMEOUT_S = 0.1
#: The same while endpoint requests are open: how late a finished request's verdict can be
#: picked up by the network thread (which alone touches the MQTT client).
BUSY_LOOP_TIMEOUT_S = 0.005
#: A rejection reason is logged at most once per this many seconds; the rest are counted.
REJECT_LOG_INTERVAL_S = 10.0
#: At stop: longest wait for the broker's acknowledgements of verdicts already published.
DRAIN_TIMEOUT_S = 2.0
#: CONNACK reason codes no retry can change: unsupported protocol version, client id not
#: valid, bad user name or password, not authorised, banned, bad authentication method.
PERMANENT_REFUSALS = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})
#: Consecutive permanent refusals after which the worker gives up (exit code 1).
PERMANENT_REFUSAL_LIMIT = 5

LEDGER_SCHEMA = 1
#: MQTT v5 user property on every verdict naming the worker that answered (for tracing).
WORKER_PROPERTY = "cloud-worker"


# --------------------------------------------------------------------------------------
# Cost ledger
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    """What one device was charged on one UTC day."""

    urgent: int = 0  #: urgent cases scored
    batch: int = 0  #: batch cases scored
    tokens: int = 0
    spend_urgent: float = 0.0
    spend_batch: float = 0.0
    #: Endpoint requests billed (with a ``usage``), answered or not, and their tokens.
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cases(self) -> int:
        return self.urgent + self.batch

    @property
    def spend(self) -> float:
        return self.spend_urgent + self.spend_batch

    def add(self, other: Usage) -> None:
        self.urgent += other.urgent
        self.batch += other.batch
        self.tokens += other.tokens
        self.spend_urgent += other.spend_urgent
        self.spend_batch += other.spend_batch
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "urgent": self.urgent,
            "batch": self.batch,
            "tokens": self.tokens,
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "spend_urgent": _money(self.spend_urgent),
            "spend_batch": _money(self.spend_batch),
            "spend": _money(self.spend),
        }


class _SavedUsage(msgspec.Struct):
    urgent: int = 0
    batch: int = 0
    tokens: int = 0
    spend_urgent: float = 0.0
    spend_batch: float = 0.0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _SavedDevice(msgspec.Struct):
    readings_total: int = 0


class _SavedLedger(msgspec.Struct):
    v: int
    days: dict[str, dict[str, _SavedUsage]] = {}
    devices: dict[str, _SavedDevice] = {}


def _money(x: float) -> float:
    return round(x, 9)


class CostLedger:
    """Pure arithmetic over what the cloud scored; thread-safe.

    Prices, cloud pack (estimated): a case costs ``tokens_per_reading`` tokens;
    urgent (synchronous) cases ``tokens / 1000 * price_sync_per_1k_tokens``,
    batch cases the same times ``1 - batch_discount``. Figures are kept per
    device and UTC day.

    Prices, endpoint (measured, ``charge_tokens``): every billed request costs
    its ``usage`` — ``prompt_tokens / 1000 * price_prompt_per_1k +
    completion_tokens / 1000 * price_completion_per_1k`` — times
    ``batch_price_factor`` in the batch tier; a request whose answer did not
    parse is billed too (``calls`` counts billed requests, ``urgent``/``batch``
    the cases answered). Once requests were billed, the unit price of a case
    (and so the all-cloud counterfactual below) is the measured mean tokens per
    request at those prices, not the ``tokens_per_reading`` estimate.

    The counterfactual: each hard case carries the number of readings its
    device had scored so far (``readings_total``); the highest value seen per
    device (never fewer than the cases scored for it) is what an all-cloud
    design would have sent. ``all_cloud_sync`` prices all of them as urgent
    calls, ``all_cloud_batch`` as batch cases; ``spend`` is what the hybrid
    actually cost. A device that never escalates is never seen, so the
    counterfactual is a lower bound.
    """

    def __init__(
        self,
        price_sync_per_1k_tokens: float,
        batch_discount: float,
        tokens_per_reading: int,
        keep_days: int = LEDGER_KEEP_DAYS,
        *,
        price_prompt_per_1k: float = 0.0,
        price_completion_per_1k: float = 0.0,
        batch_price_factor: float = 0.5,
    ) -> None:
        if price_sync_per_1k_tokens < 0 or not math.isfinite(price_sync_per_1k_tokens):
            raise ValueError("price_sync_per_1k_tokens must be a finite number >= 0")
        if not 0.0 <= batch_discount <= 1.0:
            raise ValueError("batch_discount must be within [0, 1]")
        if tokens_per_reading < 1 or keep_days < 1:
            raise ValueError("tokens_per_reading and keep_days must be >= 1")
        self.price_sync_per_1k_tokens = price_sync_per_1k_tokens
        self.batch_discount = batch_discount
        self.tokens_per_reading = tokens_per_reading
        self.keep_days = keep_days
        for price in (price_prompt_per_1k, price_completion_per_1k):
            if price < 0 or not math.isfinite(price):
                raise ValueError("endpoint prices must be finite numbers >= 0")
        if not 0.0 <= batch_price_factor <= 1.0:
            raise ValueError("batch_price_factor must be within [0, 1]")
        self.price_prompt_per_1k = price_prompt_per_1k
        self.price_completion_per_1k = price_completion_per_1k
        self.batch_price_factor = batch_price_factor
        self._days: dict[str, dict[str, Usage]] = {}
        self._readings_total: dict[str, int] = {}
        self._lock = threading.Lock()
        self._changes = 0

    @classmethod
    def from_settings(cls, cloud: CloudSettings, endpoint: EndpointSettings) -> CostLedger:
        return cls(
            cloud.price_sync_per_1k_tokens,
            cloud.batch_discount,
            cloud.tokens_per_reading,
            price_prompt_per_1k=endpoint.price_prompt_per_1k,
            price_completion_per_1k=endpoint.price_completion_per_1k,
            batch_price_factor=endpoint.batch_price_factor,
        )

    # -- prices -------------------------------------------------------------------------

    def token_price(self, tier: Tier, prompt_tokens: float, completion_tokens: float) -> float:
        """Cost of an endpoint request with these measured tokens in ``tier``."""
        sync = (
            prompt_tokens / 1000.0 * self.price_prompt_per_1k
            + completion_tokens / 1000.0 * self.price_completion_per_1k
        )
        return sync if tier == "urgent" else sync * self.batch_price_factor

    def _measured_locked(self) -> tuple[float, float] | None:
        calls = prompt = completion = 0
        for per_device in self._days.values():
            for u in per_device.values():
                calls += u.calls
                prompt += u.prompt_tokens
                completion += u.completion_tokens
        return (prompt / calls, completion / calls) if calls else None

    def measured_tokens(self) -> tuple[float, float] | None:
        """Mean (prompt, completion) tokens per billed endpoint request; None before any."""
        with self._lock:
            return self._measured_locked()

    def unit_price(self, tier: Tier) -> float:
        """Cost of one case in ``tier``: measured tokens once the endpoint billed any."""
        with self._lock:
            measured = self._measured_locked()
        return self._unit_price(tier, measured)

    def _unit_price(self, tier: Tier, measured: tuple[float, float] | None) -> float:
        if measured is not None:
            return self.token_price(tier, *measured)
        sync = self.tokens_per_reading / 1000.0 * self.price_sync_per_1k_tokens
        return sync if tier == "urgent" else sync * (1.0 - self.batch_discount)

    # -- recording ----------------------------------------------------------------------

    def charge(
        self, device: str, tier: Tier, cases: int = 1, at: dt.datetime | None = None
    ) -> float:
        """Record ``cases`` scored cases of ``device`` in ``tier``; returns what they cost."""
        if cases < 0:
            raise ValueError("cases must be >= 0")
        day = self._day(at)
        sync = self.tokens_per_reading / 1000.0 * self.price_sync_per_1k_tokens
        cost = cases * (sync if tier == "urgent" else sync * (1.0 - self.batch_discount))
        with self._lock:
            usage = self._usage_locked(day, device)
            usage.tokens += cases * self.tokens_per_reading
            if tier == "urgent":
                usage.urgent += cases
                usage.spend_urgent += cost
            else:
                usage.batch += cases
                usage.spend_batch += cost
            self._changes += 1
        return cost

    def charge_tokens(
        self,
        device: str,
        tier: Tier,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        answered: bool,
        at: dt.datetime | None = None,
    ) -> float:
        """Record one billed endpoint request (its ``usage``); returns what it cost.

        ``answered``: the reply was a label (counts as a scored case); an unparseable
        reply is billed all the same.
        """
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("token counts must be >= 0")
        cost = self.token_price(tier, prompt_tokens, completion_tokens)
        day = self._day(at)
        with self._lock:
            usage = self._usage_locked(day, device)
            usage.calls += 1
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.tokens += prompt_tokens + completion_tokens
            if tier == "urgent":
                usage.urgent += int(answered)
                usage.spend_urgent += cost
            else:
                usage.batch += int(answered)
                usage.spend_batch += cost
            self._changes += 1
        return cost

    @staticmethod
    def _day(at: dt.datetime | None) -> str:
        when = at if at is not None else dt.datetime.now(dt.timezone.utc)
        if when.tzinfo is not None:
            when = when.astimezone(dt.timezone.utc)
        return when.date().isoformat()

    def _usage_locked(self, day: str, device: str) -> Usage:
        per_device = self._days.get(day)
        if per_device is None:
            per_device = self._days[day] = {}
            self._expire()
        return per_device.setdefault(device, Usage())

    def observe(self, device: str, readings_total: int) -> None:
        """Note the readings count a device reported with a hard case (the highest one counts)."""
        with self._lock:
            if readings_total > self._readings_total.get(device, 0):
                self._readings_total[device] = readings_total
                self._changes += 1

    def _expire(self) -> None:
        days = sorted(self._days)
        for day in days[: max(0, len(days) - self.keep_days)]:
            del self._days[day]

    @property
    def changes(self) -> int:
        """A number that grows with every recorded change (to know when to write)."""
        return self._changes

    # -- reading ------------------------------------------------------------------------

    def totals(self) -> dict[str, Usage]:
        """Usage per device over every kept day."""
        with self._lock:
            return self._totals_locked()

    def _totals_locked(self) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        for per_device in self._days.values():
            for device, usage in per_device.items():
                out.setdefault(device, Usage()).add(usage)
        return out

    def _figures(
        self, usage: Usage, reported: int, readings: int, measured: tuple[float, float] | None
    ) -> dict[str, Any]:
        """Actual spend next to the all-cloud cost of ``readings`` readings."""
        sync = readings * self._unit_price("urgent", measured)
        batch = readings * self._unit_price("batch", measured)
        return {
            **usage.as_dict(),
            "readings_total": reported,
            "readings_priced": readings,
            "all_cloud_sync": _money(sync),
            "all_cloud_batch": _money(batch),
            "saved_vs_all_cloud_sync": _money(sync - usage.spend),
            "saved_vs_all_cloud_batch": _money(batch - usage.spend),
        }

    def summary(self) -> dict[str, Any]:
        """Everything as a JSON-able dict (also the ledger file's content)."""
        with self._lock:
            measured = self._measured_locked()
            totals = self._totals_locked()
            devices = sorted(set(totals) | set(self._readings_total))
            per_device: dict[str, dict[str, Any]] = {}
            grand = Usage()
            reported_sum = priced_sum = 0
            for d in devices:
                usage = totals.get(d, Usage())
                reported = self._readings_total.get(d, 0)
                priced = max(reported, usage.cases)
                per_device[d] = self._figures(usage, reported, priced, measured)
                grand.add(usage)
                reported_sum += reported
                priced_sum += priced
            total = self._figures(grand, reported_sum, priced_sum, measured)
            total["devices"] = len(devices)
            days = {
                day: {d: u.as_dict() for d, u in sorted(by_device.items())}
                for day, by_device in sorted(self._days.items())
            }
        return {
            "v": LEDGER_SCHEMA,
            "pricing": {
                "price_sync_per_1k_tokens": self.price_sync_per_1k_tokens,
                "batch_discount": self.batch_discount,
                "tokens_per_reading": self.tokens_per_reading,
                "price_prompt_per_1k": self.price_prompt_per_1k,
                "price_completion_per_1k": self.price_completion_per_1k,
                "batch_price_factor": self.batch_price_factor,
                "tokens_measured": measured is not None,
                "mean_prompt_tokens": None if measured is None else round(measured[0], 3),
                "mean_completion_tokens": None if measured is None else round(measured[1], 3),
                "unit_price_urgent": _money(self._unit_price("urgent", measured)),
                "unit_price_batch": _money(self._unit_price("batch", measured)),
            },
            "total": total,
            "devices": per_device,
            "days": days,
        }

    # -- persistence --------------------------------------------------------------------

    def restore(self, data: bytes) -> None:
        """Add the figures of a ledger file written by ``write`` (raises ValueError if invalid)."""
        try:
            saved = msgspec.json.decode(data, type=_SavedLedger)
        except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a ledger file: {exc}") from exc
        if saved.v != LEDGER_SCHEMA:
            raise ValueError(f"ledger schema {saved.v} is not {LEDGER_SCHEMA}")
        with self._lock:
            for day, by_device in saved.days.items():
                target = self._days.setdefault(day, {})
                for device, s in by_device.items():
                    target.setdefault(device, Usage()).add(
                        Usage(
                            s.urgent,
                            s.batch,
                            s.tokens,
                            s.spend_urgent,
                            s.spend_batch,
                            s.calls,
                            s.prompt_tokens,
                            s.completion_tokens,
                        )
                    )
            for device, sd in saved.devices.items():
                if sd.readings_total > self._readings_total.get(device, 0):
                    self._readings_total[device] = sd.readings_total
            self._expire()
            self._changes += 1

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write ``summary()`` to ``path`` atomically (temporary file, fsync, rename)."""
        target = Path(path)
        body = json.dumps(self.summary(), indent=1, sort_keys=True).encode() + b"\n"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# --------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------


class _Rejected(Exception):
    """A message (or one case of a batch) refused, with a ``rejected_<reason>`` counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Throttle:
    """Allows one log line per key per interval and counts the ones it held back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def allow(self, key: str) -> tuple[bool, int]:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] += 1
            return False, 0
        self._last[key] = now
        held = self._held.pop(key, 0)
        return True, held


def _decode_error(exc: BaseException) -> _Rejected:
    """Translate a msgspec / codec failure into a rejection reason."""
    text = str(exc)
    if isinstance(exc, RecursionError):
        return _Rejected("too_deep", "JSON nests too deeply")
    if isinstance(exc, UnicodeDecodeError):
        return _Rejected("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
    if isinstance(exc, msgspec.ValidationError):
        if "Number out of range" in text:
            return _Rejected("non_finite", text)
        return _Rejected("invalid_schema", text)
    return _Rejected("malformed_json", text)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _BatchEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``messages.Batch`` with its cases left undecoded, so that one bad case is refused alone."""

    v: int
    device: str
    cases: list[msgspec.Raw]


class _Answer(NamedTuple):
    """What the model said about a case: all the dedupe memory keeps per key.

    With ``no_verdict`` set it is the cloud's "no answer" (never remembered).
    """

    label: str
    confidence: float
    model: str
    no_verdict: str | None = None

    def verdict(self, case: HardCase, tier: Tier, cloud_ms: float) -> Verdict:
        return Verdict(
            v=SCHEMA_VERSION,
            key=case.key,
            device=case.device,
            seq=case.seq,
            label=self.label,
            confidence=self.confidence,
            model=self.model,
            tier=tier,
            cloud_ms=cloud_ms,
            id=case.id,
            no_verdict=self.no_verdict,
        )


@dataclass(slots=True)
class _Pending:
    """A batch case that passed validation and waits for its chunk to be scored."""

    index: int
    case: HardCase
    reading: Reading
    tries: int = 0  #: endpoint requests made for it so far


@dataclass(slots=True)
class _UrgentCtx:
    """An urgent case handed to the endpoint: what its answer needs."""

    case: HardCase
    reply_to: str
    correlation: bytes | None
    client: mqtt.Client
    mid: int
    qos: int
    received_ns: int


@dataclass(slots=True)
class _BatchCtx:
    """A batch (or a group of retried batch cases) handed to the endpoint."""

    device: str
    answers: list[tuple[HardCase, _Answer | None]]
    echoes: list[tuple[int, int]]
    client: mqtt.Client | None  #: None for retries (nothing to acknowledge)
    mid: int
    qos: int
    received_ns: int


@dataclass(slots=True)
class _Retry:
    """A batch case whose request failed, due for another try."""

    due: float
    device: str
    pending: _Pending


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
        self.connected = threading.Event()
        self.ready = threading.Event()  #: connected and both subscriptions granted
        self.failed = ""  #: why the worker gave up, if it did
        self.signalled = 0  #: the signal that stopped ``run_forever``, if one did
        self.last_error = ""
        self._scorer = scorer
        self._owns_scorer = scorer is None
        self._readings: ReadingDecoder | None = None
        self._dedupe: OrderedDict[tuple[str, str], _Answer] = OrderedDict()
        self._hard_decoder = msgspec.json.Decoder(HardCase)
        self._batch_decoder = msgspec.json.Decoder(_BatchEnvelope)
        self._throttle = _Throttle(REJECT_LOG_INTERVAL_S)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._sub_mid: int | None = None
        self._attempt = 0
        self._permanent_refusals = 0
        self._next_attempt = 0.0
        self._unacked: set[int] = set()
        self._ledger_written = -1
        self._stopped = False
        self._endpoint: EndpointTier | None = None
        self._model_name = ""
        #: Finished endpoint work, handed from the request threads to the network thread.
        self._done: queue.SimpleQueue[Job | tuple[_BatchCtx, list[Job]]] = queue.SimpleQueue()
        self._retries: list[_Retry] = []
        #: (device, key) of cases at the endpoint or waiting for a retry: a copy the device
        #: sends meanwhile (it re-sends what is not answered) is not asked for twice.
        self._working: set[tuple[str, str]] = set()
        if self.cloud.ledger_path:
            self._load_ledger(Path(self.cloud.ledger_path))

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            raise RuntimeError("the worker is not started")
        return self._scorer

    def start(self) -> None:
        """Open the cloud pack (unless given a scorer) and start the network thread."""
        if self._thread is not None:
            raise RuntimeError("the worker was already started")
        if self.cloud.backend == "endpoint" and self._owns_scorer:
            pack = resolve(self.cloud.pack, self.settings.model.packs_dir)
            prompt = Prompt.from_pack(pack)
            self._endpoint = EndpointTier(self.settings.endpoint, prompt)
            self._model_name = f"{self.settings.endpoint.model}@endpoint"
            self._readings = ReadingDecoder(tuple(pack.manifest.input.shape))
            log.info(
                "cloud tier: endpoint %s, model %s, prompt of %s",
                self.settings.endpoint.base_url,
                self.settings.endpoint.model,
                pack.ref,
            )
            self._thread = threading.Thread(target=self._run, name="edge-cloud-net", daemon=True)
            self._thread.start()
            return
        if self._scorer is None:
            pack = resolve(self.cloud.pack, self.settings.model.packs_dir)
            options = BackendOptions(
                intra_op_threads=self.settings.model.intra_op_threads,
                inter_op_threads=self.settings.model.inter_op_threads,
            )
            self._scorer = Scorer.open(pack, options)
            log.info("cloud pack %s loaded from %s", pack.ref, pack.path)
        self._readings = ReadingDecoder(self.scorer.shape)
        self._thread = threading.Thread(target=self._run, name="edge-cloud-net", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the worker to stop (safe from a signal handler); ``stop`` finishes the job."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Leave the group, let published verdicts be acknowledged, disconnect, write ledger."""
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
        if not alive:
            self._close_endpoint()
        self.write_ledger()
        if self._owns_scorer and self._scorer is not None and not alive:
            self._scorer.close()

    def run_forever(self) -> None:
        """Block until ``request_stop``/``stop``, SIGTERM or SIGINT, or a fatal error; then stop.

        Signal handlers are installed only when called from the main thread.
        """
        if self._thread is None:
            self.start()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def handler(signum: int, _frame: FrameType | None) -> None:
                self.signalled = signum
                self._stop.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        try:
            while not self._stop.wait(LEDGER_WRITE_INTERVAL_S):
                self.write_ledger()
            if self.signalled:
                log.info("signal %d: stopping", self.signalled)
        finally:
            self.stop()
            for sig, old in previous.items():
                signal.signal(sig, old)

    def write_ledger(self) -> None:
        """Write the ledger file now if it changed (no-op without ``cloud.ledger_path``)."""
        path = self.cloud.ledger_path
        changes = self.ledger.changes
        if not path or changes == self._ledger_written:
            return
        error: OSError | None = None
        try:
            self.ledger.write(path)
        except OSError as exc:
            error = exc
        if error is not None:
            self.counters["ledger_write_failed"] += 1
            log.error("cannot write the cost ledger to %s: %s", path, error)
            return
        self._ledger_written = changes

    def _load_ledger(self, path: Path) -> None:
        """Continue the figures of an earlier run; an invalid file is moved aside, not lost."""
        if not path.exists():
            return
        problem = ""
        try:
            self.ledger.restore(path.read_bytes())
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        except ValueError as exc:
            aside = path.with_name(path.name + ".invalid")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            problem = f"is invalid ({exc}); moved to {aside}"
        if problem:
            log.error("the cost ledger %s %s; starting a new one", path, problem)
            return
        self._ledger_written = self.ledger.changes

    # -- network thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                client = self._client
                if self._endpoint is not None:
                    self._service_endpoint()
                if client is None:
                    wait = self._next_attempt - time.monotonic()
                    if wait > 0:
                        self._stop.wait(min(wait, 0.5 if self._endpoint is None else 0.05))
                    else:
                        self._connect()
                    continue
                busy = self._endpoint is not None and self._endpoint.busy > 0
                rc = client.loop(timeout=BUSY_LOOP_TIMEOUT_S if busy else LOOP_TIMEOUT_S)
                if rc != mqtt.MQTT_ERR_SUCCESS and self._client is client:
                    self._lost(f"network: {mqtt.error_string(rc)}")
        except Exception as exc:
            log.exception("the cloud worker's network thread failed")
            self.failed = f"internal error: {exc!r}"
            self._stop.set()
        finally:
            self._shutdown()

    def _connect(self) -> None:
        m = self.settings.mqtt
        try:
            client = new_client(self.settings, self.client_id)
        except ConfigError as exc:
            self._give_up(f"cannot connect: {exc}")
            return
        client.max_inflight_messages_set(self.settings.link.inflight_window)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        if self._endpoint is not None:
            # A request is acknowledged once answered (the answer comes from another thread).
            client.manual_ack_set(True)
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
            log.warning("broker connection failed (%s); retry in %.2f s", why, delay)
        self.last_error = why

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
        if self._unacked:
            # The devices fall back on their local answers (their deadline passes).
            self.counters["verdicts_lost"] += len(self._unacked)
            self._unacked.clear()
        if client is not None:
            try:
                client.disconnect()
            except (OSError, ValueError) as exc:
                log.debug("closing a lost connection: %s", exc)
        if was_connected:
            self.counters["disconnects"] += 1
        self._failed_attempt(why)

    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        if client is not self._client:
            return
        if rc.is_failure:
            self.counters["connect_refused"] += 1
            log.error("broker refused the connection of %s: %s", self.client_id, rc)
            if rc.value in PERMANENT_REFUSALS:
                self._permanent_refusals += 1
                if self._permanent_refusals >= PERMANENT_REFUSAL_LIMIT:
                    self._give_up(
                        f"the broker refused the connection {self._permanent_refusals} times: {rc}"
                    )
            else:
                self._permanent_refusals = 0
            self._lost(f"CONNACK refused: {rc}")
            return
        set_nodelay(client)
        self._attempt = 0
        self._permanent_refusals = 0
        self.last_error = ""
        self.counters["connects"] += 1
        self.connected.set()
        result, mid = client.subscribe(
            [
                (self.topics.shared(self.cloud.group, "hard"), 1),
                (self.topics.shared(self.cloud.group, "batch"), 1),
            ]
        )
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
        self.ready.set()
        log.info(
            "serving %s and %s",
            self.topics.shared(self.cloud.group, "hard"),
            self.topics.shared(self.cloud.group, "batch"),
        )

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
        self._unacked.discard(mid)
        if rc.is_failure:
            self.counters["verdicts_refused"] += 1
            log.error("the broker refused a verdict: %s", rc)

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
                client.unsubscribe(
                    [
                        self.topics.shared(self.cloud.group, "hard"),
                        self.topics.shared(self.cloud.group, "batch"),
                    ]
                )
                # Keep serving the client's I/O while the broker acknowledges our verdicts.
                self._client = client
                self._close_endpoint()
                deadline = time.monotonic() + DRAIN_TIMEOUT_S
                while self._unacked and time.monotonic() < deadline:
                    if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                        break
                self._client = None
                if self._unacked:
                    log.warning("%d verdict(s) not acknowledged at stop", len(self._unacked))
            client.disconnect()
        except (OSError, ValueError, RuntimeError) as exc:
            log.debug("clean disconnect failed: %s", exc)
        finally:
            self._client = None

    # -- messages -----------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        received_ns = time.monotonic_ns()
        topic = "?"
        deferred = False
        try:
            topic = msg.topic
            deferred = self._dispatch(client, msg, topic, received_ns)
        except _Rejected as rej:
            self._reject(rej, topic)
        except UnicodeDecodeError:
            self._reject(_Rejected("invalid_utf8", "topic is not valid UTF-8"), topic)
        except Exception:
            # Last line of defence: whatever a message does, the worker keeps serving.
            self.counters["errors"] += 1
            if self._throttle.allow("internal-error")[0]:
                log.exception("unexpected error handling a message on %.200s", topic)
        finally:
            if self._endpoint is not None and not deferred:
                _ack(client, msg.mid, msg.qos, client)

    def _dispatch(
        self, client: mqtt.Client, msg: mqtt.MQTTMessage, topic: str, received_ns: int
    ) -> bool:
        """Handle one request; True when its answer (and acknowledgement) comes later."""
        kind = topic.rsplit("/", 1)[-1]
        device = Topics.device_of(topic)
        if len(msg.payload) > self.cloud.max_payload_bytes:
            raise _Rejected(
                "too_large", f"payload of {len(msg.payload)} bytes is over cloud.max_payload_bytes"
            )
        if kind == "hard":
            return self._handle_urgent(client, msg, device, received_ns)
        if kind == "batch":
            return self._handle_batch(client, msg, device, received_ns)
        raise _Rejected("unknown_topic", "not a hard or batch topic")

    def _reject(self, rej: _Rejected, topic: str) -> None:
        self.counters[f"rejected_{rej.reason}"] += 1
        allowed, held = self._throttle.allow(rej.reason)
        if allowed:
            more = f" ({held} more since the last report)" if held else ""
            log.warning(
                "rejected a message on %.200s: %s: %.300s%s", topic, rej.reason, rej.detail, more
            )

    def _decode_case(self, payload: bytes | bytearray | msgspec.Raw) -> HardCase:
        try:
            return self._hard_decoder.decode(payload)
        except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError) as exc:
            raise _decode_error(exc) from None

    def _check_case(self, case: HardCase, device: str) -> None:
        if case.v != SCHEMA_VERSION:
            raise _Rejected("unsupported_version", f"schema version {case.v}")
        if case.device != device:
            raise _Rejected(
                "device_mismatch", f"case of {case.device!r} sent on the topic of {device!r}"
            )

    def _validate(self, case: HardCase) -> Reading:
        if self._readings is None:
            raise RuntimeError("the worker is not started")
        try:
            reading = self._readings.from_values(case.values, case.id)
        except ReadingError as exc:
            raise _Rejected(exc.code, exc.message) from None
        reading.seq = case.seq
        return reading

    def _remembered(self, device: str, key: str) -> _Answer | None:
        answer = self._dedupe.get((device, key))
        if answer is not None:
            self._dedupe.move_to_end((device, key))
        return answer

    def _remember(self, device: str, key: str, answer: _Answer) -> None:
        self._dedupe[(device, key)] = answer
        self._dedupe.move_to_end((device, key))
        while len(self._dedupe) > self.cloud.dedupe_keys:
            self._dedupe.popitem(last=False)

    def _score(self, readings: list[Reading]) -> list[Decision]:
        try:
            return self.scorer.score(readings)
        except EdgeAgentError as exc:
            self.counters["score_failed"] += len(readings)
            raise _Rejected("score_failed", str(exc)) from None

    def _reply_topic(self, msg: mqtt.MQTTMessage, device: str) -> str:
        own = self.topics.verdict(device)
        wanted = getattr(msg.properties, "ResponseTopic", None) if msg.properties else None
        if not wanted:
            return own
        if not isinstance(wanted, str) or not (wanted == own or wanted.startswith(own + "/")):
            raise _Rejected("response_topic", f"ResponseTopic {wanted!r:.200} is not under {own}")
        if "+" in wanted or "#" in wanted or "\0" in wanted or len(wanted.encode()) > 65535:
            raise _Rejected("response_topic", "ResponseTopic is not a valid topic name")
        return wanted

    def _handle_urgent(
        self, client: mqtt.Client, msg: mqtt.MQTTMessage, device: str, received_ns: int
    ) -> bool:
        case = self._decode_case(msg.payload)
        self._check_case(case, device)
        reply_to = self._reply_topic(msg, device)
        self.ledger.observe(device, case.readings_total)
        answer = self._remembered(device, case.key)
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        if answer is not None:
            self.counters["duplicates"] += 1
        elif self._endpoint is not None:
            if (device, case.key) in self._working:
                self.counters["duplicates_in_flight"] += 1
                return False  # the first copy's answer goes out when it comes
            reading = self._validate(case)
            deadline_ms = case.deadline_ms or self.settings.router.deadline_ms
            deadline_ms -= self.settings.endpoint.deadline_margin_ms
            job = Job(
                body=self._endpoint.body(reading.values, case.local),
                deadline=received_ns / 1e9 + deadline_ms / 1000.0,
                tier="urgent",
                token=_UrgentCtx(
                    case, reply_to, correlation, client, msg.mid, msg.qos, received_ns
                ),
            )
            self._working.add((device, case.key))
            if not self._endpoint.submit_urgent(job, self._done.put):
                job.reply = Reply(failure="overloaded", detail="too many urgent cases waiting")
                self._finish_urgent(job)
            return True
        else:
            decision = self._score([self._validate(case)])[0]
            answer = _Answer(decision.label, decision.confidence, decision.model)
            self._remember(device, case.key, answer)
            self.ledger.charge(device, "urgent")
            self.counters["urgent_scored"] += 1
        self._send_urgent(
            client,
            case=case,
            answer=answer,
            reply_to=reply_to,
            correlation=correlation,
            received_ns=received_ns,
        )
        return False

    def _send_urgent(
        self,
        client: mqtt.Client,
        *,
        case: HardCase,
        answer: _Answer,
        reply_to: str,
        correlation: bytes | None,
        received_ns: int,
    ) -> None:
        verdict = answer.verdict(case, "urgent", _ms_since(received_ns))
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [(IDEMPOTENCY_PROPERTY, case.key), (WORKER_PROPERTY, self.worker_id)]
        if correlation is not None:
            props.CorrelationData = correlation
        self._publish(client, reply_to, encoder.encode(verdict), props, 1)

    def _handle_batch(
        self, client: mqtt.Client, msg: mqtt.MQTTMessage, device: str, received_ns: int
    ) -> bool:
        try:
            batch = self._batch_decoder.decode(msg.payload)
        except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError) as exc:
            raise _decode_error(exc) from None
        if batch.v != SCHEMA_VERSION:
            raise _Rejected("unsupported_version", f"schema version {batch.v}")
        if batch.device != device:
            raise _Rejected(
                "device_mismatch", f"batch of {batch.device!r} sent on the topic of {device!r}"
            )
        if not batch.cases:
            raise _Rejected("empty_batch", "a batch without cases")
        self.counters["batches"] += 1
        answers: list[tuple[HardCase, _Answer | None]] = []
        pending: list[_Pending] = []
        first_index: dict[str, int] = {}  # key -> index in answers of its first occurrence
        echoes: list[tuple[int, int]] = []  # (index in answers, index of the first occurrence)
        for raw in batch.cases:
            try:
                case = self._decode_case(raw)
                self._check_case(case, device)
                self.ledger.observe(device, case.readings_total)
                remembered = self._remembered(device, case.key)
                if remembered is None and (device, case.key) in self._working:
                    self.counters["duplicates_in_flight"] += 1
                    continue  # answered when the copy at the endpoint is
                if remembered is not None or case.key in first_index:
                    self.counters["duplicates"] += 1
                    if remembered is None:
                        echoes.append((len(answers), first_index[case.key]))
                    answers.append((case, remembered))
                    continue
                reading = self._validate(case)
            except _Rejected as rej:
                self._reject(rej, self.topics.batch(device))
                continue
            first_index[case.key] = len(answers)
            pending.append(_Pending(len(answers), case, reading))
            answers.append((case, None))
        if self._endpoint is not None and pending:
            ctx = _BatchCtx(device, answers, echoes, client, msg.mid, msg.qos, received_ns)
            self._submit_group(ctx, pending)
            return True
        for chunk in _chunks(pending, self.cloud.batch_max):
            try:
                decisions = self._score([p.reading for p in chunk])
            except _Rejected as rej:
                self._reject(rej, self.topics.batch(device))
                continue
            for p, decision in zip(chunk, decisions, strict=True):
                answer = _Answer(decision.label, decision.confidence, decision.model)
                answers[p.index] = (p.case, answer)
                self._remember(device, p.case.key, answer)
            self.ledger.charge(device, "batch", len(chunk))
            self.counters["batch_cases_scored"] += len(chunk)
        self._send_batch(client, device, answers, echoes, received_ns)
        return False

    def _send_batch(
        self,
        client: mqtt.Client | None,
        device: str,
        answers: list[tuple[HardCase, _Answer | None]],
        echoes: list[tuple[int, int]],
        received_ns: int,
    ) -> None:
        for i, first in echoes:
            answers[i] = (answers[i][0], answers[first][1])
        cloud_ms = _ms_since(received_ns)
        verdicts = [a.verdict(case, "batch", cloud_ms) for case, a in answers if a is not None]
        if not verdicts:
            return
        if client is None:
            self.counters["verdicts_unsent"] += len(verdicts)
            return
        body = encoder.encode(BatchVerdicts(v=SCHEMA_VERSION, device=device, verdicts=verdicts))
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [
            (IDEMPOTENCY_PROPERTY, f"{verdicts[0].key}+{len(verdicts)}"),
            (WORKER_PROPERTY, self.worker_id),
        ]
        self._publish(client, self.topics.verdict(device), body, props, len(verdicts))

    # -- the endpoint tier (cloud.backend = "endpoint") -----------------------------------

    def _submit_group(self, ctx: _BatchCtx, pending: list[_Pending]) -> None:
        tier = self._endpoint
        if tier is None:  # pragma: no cover - only called in endpoint mode
            raise RuntimeError("no endpoint")
        deadline = time.monotonic() + self.settings.endpoint.batch_timeout_s
        jobs = []
        for p in pending:
            self._working.add((ctx.device, p.case.key))
            p.tries += 1
            body = tier.body(p.reading.values, p.case.local)
            jobs.append(Job(body=body, deadline=deadline, tier="batch", token=p))
        tier.submit_group(jobs, lambda done: self._done.put((ctx, done)))

    def _service_endpoint(self) -> None:
        """On the network thread: publish what the endpoint answered; send due retries."""
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                self._finish_urgent(item)
            else:
                self._finish_group(*item)
        if self._retries and not self._stop.is_set():
            now = time.monotonic()
            due = [r for r in self._retries if r.due <= now]
            if due:
                self._retries = [r for r in self._retries if r.due > now]
                by_device: dict[str, list[_Pending]] = {}
                for r in due:
                    by_device.setdefault(r.device, []).append(r.pending)
                for device, group in by_device.items():
                    answers: list[tuple[HardCase, _Answer | None]] = []
                    for p in group:
                        p.index = len(answers)
                        answers.append((p.case, None))
                    ctx = _BatchCtx(device, answers, [], None, 0, 0, time.monotonic_ns())
                    self._submit_group(ctx, group)

    def _account(self, device: str, tier: Tier, reply: Reply) -> None:
        """Count one finished request and bill its tokens."""
        self.counters["endpoint_requests"] += reply.attempts
        if reply.attempts > 1:
            self.counters["endpoint_retries"] += reply.attempts - 1
        if reply.usage_reported:
            self.ledger.charge_tokens(
                device,
                tier,
                reply.prompt_tokens,
                reply.completion_tokens,
                answered=reply.label is not None,
            )
        elif reply.label is not None or reply.failure == "unparseable":
            self.counters["endpoint_usage_missing"] += 1
        if reply.failure is not None:
            self.counters[f"endpoint_failed_{reply.failure}"] += 1
            if self._throttle.allow(f"endpoint-{reply.failure}")[0]:
                log.warning("endpoint (%s): %s: %.300s", tier, reply.failure, reply.detail)

    def _no_verdict(self, reason: str) -> _Answer:
        self.counters["no_verdict"] += 1
        self.counters[f"no_verdict_{reason}"] += 1
        return _Answer("", 0.0, self._model_name, reason)

    def _finish_urgent(self, job: Job) -> None:
        ctx: _UrgentCtx = job.token
        reply = job.reply or Reply(failure="stopped", detail="no reply")
        case = ctx.case
        self._working.discard((case.device, case.key))
        self._account(case.device, "urgent", reply)
        if reply.label is not None:
            answer = _Answer(reply.label, 1.0, self._model_name)
            self._remember(case.device, case.key, answer)
            self.counters["urgent_scored"] += 1
        else:
            answer = self._no_verdict(reply.failure or "bad_response")
        client = self._client
        if client is None:
            self.counters["verdicts_unsent"] += 1
        else:
            self._send_urgent(
                client,
                case=case,
                answer=answer,
                reply_to=ctx.reply_to,
                correlation=ctx.correlation,
                received_ns=ctx.received_ns,
            )
        _ack(ctx.client, ctx.mid, ctx.qos, self._client)

    def _finish_group(self, ctx: _BatchCtx, jobs: list[Job]) -> None:
        s = self.settings.endpoint
        for job in jobs:
            p: _Pending = job.token
            reply = job.reply or Reply(failure="stopped", detail="no reply")
            self._account(ctx.device, "batch", reply)
            if reply.label is not None:
                answer = _Answer(reply.label, 1.0, self._model_name)
                self._remember(ctx.device, p.case.key, answer)
                self._working.discard((ctx.device, p.case.key))
                ctx.answers[p.index] = (p.case, answer)
                self.counters["batch_cases_scored"] += 1
                continue
            failure = reply.failure or "bad_response"
            if self._stop.is_set() and (failure in TRANSIENT or failure == "stopped"):
                # Not answered: the device sends it again (link.confirm) to whoever serves then.
                self._working.discard((ctx.device, p.case.key))
                self.counters["batch_left_for_resend"] += 1
                continue
            if (
                failure in TRANSIENT
                and p.tries < s.batch_max_tries
                and len(self._retries) < s.max_retry_cases
            ):
                delay = s.batch_retry_s * random.uniform(0.5, 1.5)  # noqa: S311
                self._retries.append(_Retry(time.monotonic() + delay, ctx.device, p))
                self.counters["batch_retries_scheduled"] += 1
                continue
            if failure not in TRANSIENT:
                reason = failure  # the answer itself was wrong (unparseable, 401, ...): final
            elif p.tries >= s.batch_max_tries:
                reason = "gave_up"
            else:
                reason = "overloaded"
            self._working.discard((ctx.device, p.case.key))
            ctx.answers[p.index] = (p.case, self._no_verdict(reason))
        self._send_batch(self._client, ctx.device, ctx.answers, ctx.echoes, ctx.received_ns)
        if ctx.client is not None:
            _ack(ctx.client, ctx.mid, ctx.qos, self._client)

    def _close_endpoint(self) -> None:
        """Stop the endpoint tier: open requests end (``stopped``), their answers go out."""
        tier = self._endpoint
        if tier is None or tier.stop_event.is_set():
            return
        left = tier.close(DRAIN_TIMEOUT_S)
        if left:
            self.counters["endpoint_open_at_stop"] += left
            log.warning("%d endpoint request(s) still open at stop", left)
        self._service_endpoint()
        if self._retries:
            # Left unanswered on purpose: the devices keep them and send them again
            # (link.confirm = "verdict") to whichever worker serves then.
            self.counters["batch_left_for_resend"] += len(self._retries)
            log.warning(
                "%d batch case(s) waiting for a retry left to the devices to send again",
                len(self._retries),
            )
            self._retries = []
            self._working.clear()

    def _publish(
        self, client: mqtt.Client, topic: str, body: bytes, props: Properties, verdicts: int
    ) -> None:
        try:
            info = client.publish(topic, body, qos=1, properties=props)
        except ValueError as exc:  # a topic paho refuses; validated before, so unexpected
            raise _Rejected("response_topic", str(exc)) from None
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.counters["verdicts_unsent"] += verdicts
            log.error("verdict to %s not sent: %s", topic, mqtt.error_string(info.rc))
            return
        self._unacked.add(info.mid)
        self.counters["verdicts_sent"] += verdicts


def _ack(client: mqtt.Client, mid: int, qos: int, current: mqtt.Client | None) -> None:
    """Acknowledge a request (manual acks), if it came on the connection still in use."""
    if qos > 0 and client is current:
        client.ack(mid, qos)


def _ms_since(t0_ns: int) -> float:
    return round((time.monotonic_ns() - t0_ns) / 1e6, 3)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def main_cloud(settings: Settings) -> int:
    """Run a cloud worker until SIGINT/SIGTERM; log the ledger summary; return the exit code.

    0 after a requested stop, 1 when the worker gave up (broker refusals, internal
    error). ConfigError and ModelError from start-up propagate to the CLI.
    """
    worker = CloudWorker(settings)
    worker.start()
    log.info("cloud worker %s started (group %r)", worker.client_id, settings.cloud.group)
    worker.run_forever()
    summary = worker.ledger.summary()
    log.info(
        "cloud worker stopped: counters %s; ledger %s",
        json.dumps(dict(sorted(worker.counters.items()))),
        json.dumps(summary["total"], sort_keys=True),
    )
    if worker.failed:
        log.error("cloud worker failed: %s", worker.failed)
        return 1
    return 0
