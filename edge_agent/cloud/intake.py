"""What the cloud worker accepts from devices, and what it remembers of its answers.

Nothing a device sends can crash or stall the worker. A payload over
``cloud.max_payload_bytes`` is refused unparsed; decoding is strict (msgspec
structs that forbid unknown fields); the values go through the same
validation as on the device (``ReadingDecoder.from_values``: shape, finite
numbers); the device named in the payload must be the device segment of the
topic it came on, and a ResponseTopic must lie in that device's own verdict
topic (``<prefix>/<device>/verdict`` or below), so nobody can make the worker
publish elsewhere. Every refusal is a ``Rejected`` with a reason code, counted
as ``rejected_<reason>`` and logged at most once per interval per reason (``Throttle``).

At-least-once on the wire, effectively-once in the cloud: the model's answer
(label, confidence, model) to each scored case is remembered under its
(device, idempotency key) in a bounded LRU (``AnswerMemory``). A case seen
again is neither scored nor charged again, and is answered again from memory.
Keys are scoped by device, so one device cannot pre-empt another's.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import paho.mqtt.client as mqtt

from edge_agent.errors import ReadingError
from edge_agent.ingest.readings import Reading, ReadingDecoder
from edge_agent.wire.messages import (
    DECODE_ERRORS,
    SCHEMA_VERSION,
    HardCase,
    Tier,
    Topics,
    Verdict,
    decode_failure,
)


class Rejected(Exception):
    """A message (or one case of a batch) refused, with a ``rejected_<reason>`` counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Throttle:
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


class BatchEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``messages.Batch`` with its cases left undecoded, so that one bad case is refused alone."""

    v: int
    device: str
    cases: list[msgspec.Raw]


_case_decoder = msgspec.json.Decoder(HardCase)
_batch_decoder = msgspec.json.Decoder(BatchEnvelope)


def _decoded(exc: BaseException) -> Rejected:
    return Rejected(*decode_failure(exc))


def decode_case(payload: bytes | bytearray | msgspec.Raw, device: str) -> HardCase:
    """One hard case sent on ``device``'s topic, decoded and checked; raises Rejected."""
    try:
        case = _case_decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise _decoded(exc) from None
    check_sender(case.v, case.device, device, "case")
    return case


def decode_batch(payload: bytes | bytearray, device: str) -> BatchEnvelope:
    """A batch's envelope (its cases still raw), checked; raises Rejected."""
    try:
        batch = _batch_decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise _decoded(exc) from None
    check_sender(batch.v, batch.device, device, "batch")
    if not batch.cases:
        raise Rejected("empty_batch", "a batch without cases")
    return batch


def check_sender(v: int, named: str, device: str, what: str) -> None:
    """The schema version is ours and the payload names the device whose topic it came on."""
    if v != SCHEMA_VERSION:
        raise Rejected("unsupported_version", f"schema version {v}")
    if named != device:
        raise Rejected("device_mismatch", f"{what} of {named!r} sent on the topic of {device!r}")


def validate(decoder: ReadingDecoder, case: HardCase) -> Reading:
    """The case's values as a reading, validated as on the device; raises Rejected."""
    try:
        reading = decoder.from_values(case.values, case.id)
    except ReadingError as exc:
        raise Rejected(exc.code, exc.message) from None
    reading.seq = case.seq
    return reading


def reply_topic(msg: mqtt.MQTTMessage, topics: Topics, device: str) -> str:
    """Where an urgent case's verdict goes: its ResponseTopic when that lies in the device's
    own verdict topic, else that topic; raises Rejected for any other ResponseTopic."""
    own = topics.verdict(device)
    wanted = getattr(msg.properties, "ResponseTopic", None) if msg.properties else None
    if not wanted:
        return own
    if not isinstance(wanted, str) or not (wanted == own or wanted.startswith(own + "/")):
        raise Rejected("response_topic", f"ResponseTopic {wanted!r:.200} is not under {own}")
    if "+" in wanted or "#" in wanted or "\0" in wanted or len(wanted.encode()) > 65535:
        raise Rejected("response_topic", "ResponseTopic is not a valid topic name")
    return wanted


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(slots=True)
class Pending:
    """A batch case that passed validation and waits for its answer."""

    index: int
    case: HardCase
    reading: Reading
    tries: int = 0  #: endpoint requests made for it so far


@dataclass(slots=True)
class UrgentCtx:
    """An urgent case handed to the endpoint: what its answer needs."""

    case: HardCase
    reply_to: str
    correlation: bytes | None
    client: mqtt.Client
    mid: int
    qos: int
    received_ns: int


@dataclass(slots=True)
class BatchCtx:
    """A batch (or a group of retried batch cases) handed to the endpoint."""

    device: str
    answers: list[tuple[HardCase, Answer | None]]
    echoes: list[tuple[int, int]]
    client: mqtt.Client | None  #: None for retries (nothing to acknowledge)
    mid: int
    qos: int
    received_ns: int


class Answer(NamedTuple):
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


class AnswerMemory:
    """The answers given, by (device, idempotency key): a bounded LRU, per worker."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._answers: OrderedDict[tuple[str, str], Answer] = OrderedDict()

    def get(self, device: str, key: str) -> Answer | None:
        answer = self._answers.get((device, key))
        if answer is not None:
            self._answers.move_to_end((device, key))
        return answer

    def put(self, device: str, key: str, answer: Answer) -> None:
        self._answers[(device, key)] = answer
        self._answers.move_to_end((device, key))
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)
