"""MQTT payloads and topic names shared by the device, the cloud worker and ``models push``.

Every payload is a UTF-8 JSON object with a schema version field ``v``; floats
are always finite (the encoder refuses NaN/Infinity). The same structs encode
on one side and decode, strictly, on the other. docs/topics.md documents them.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec

SCHEMA_VERSION = 1
#: MQTT v5 user property carrying the idempotency key of a message.
IDEMPOTENCY_PROPERTY = "idempotency-key"

encoder = msgspec.json.Encoder()

#: What a failed decode of a payload can raise (msgspec, bad UTF-8, nesting too deep).
DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError, RecursionError)


class Tier(enum.StrEnum):
    """The cloud tier a hard case goes to (its value is what travels on the wire)."""

    URGENT = "urgent"
    BATCH = "batch"


_Key = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
_Device = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class LocalDecision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The device's own answer, sent along with a hard case."""

    label: str
    confidence: float
    reason: str | None
    model: str


class HardCase(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One hard case: urgent on its own, or one element of a batch."""

    v: int
    key: _Key  #: idempotency key: "<device>:<seq>"
    device: _Device
    seq: Annotated[int, msgspec.Meta(ge=0)]
    values: list[list[float]]
    local: LocalDecision
    tier: Tier
    id: Any = None  #: the reading's own id from the input, if it had one
    deadline_ms: float | None = None
    readings_total: int = 0  #: readings the device had scored when it escalated this one


class Batch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Non-urgent hard cases sent together."""

    v: int
    device: _Device
    cases: list[HardCase]


class Verdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The cloud's answer to one hard case.

    ``no_verdict`` set (a reason code) means the cloud has no answer for this case — its
    endpoint failed, the deadline passed, the answer did not parse — and ``label`` is empty:
    the device keeps its local answer. Fields at their default are left out on the wire, so
    an ordinary verdict is byte-compatible with devices that predate ``no_verdict``.
    """

    v: int
    key: _Key
    device: _Device
    seq: int
    label: str
    confidence: float
    model: str
    tier: Tier
    cloud_ms: float = 0.0  #: time the cloud spent from receipt to answer
    id: Any = None
    no_verdict: str | None = None  #: why there is no answer (label is then "")


class BatchVerdicts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    device: _Device
    verdicts: list[Verdict]


class Status(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Retained on ``{prefix}/{device}/status``; the last will says ``offline``."""

    v: int
    device: _Device
    state: Literal["online", "offline"]
    model: str = ""


class WorkerStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Retained on ``{prefix}/cloud/{worker}/status`` by a cloud worker: ``online`` once its
    shared subscriptions are granted; ``offline`` at a clean stop, and as its last will."""

    v: int
    worker: str
    group: str
    state: Literal["online", "offline"]


def status_payload(device: str, state: Literal["online", "offline"], model: str) -> bytes:
    """The retained status message (``offline`` is also the last will)."""
    return encoder.encode(Status(v=SCHEMA_VERSION, device=device, state=state, model=model))


def batch_payload(device: str, cases: list[bytes]) -> bytes:
    """A ``Batch`` from hard cases already encoded (as the outbox stores them)."""
    head = b'{"v":%d,"device":"%s","cases":[' % (SCHEMA_VERSION, device.encode())
    return head + b",".join(cases) + b"]}"


_verdict_decoder = msgspec.json.Decoder(Verdict)
_verdicts_decoder = msgspec.json.Decoder(BatchVerdicts)


def decode_verdicts(payload: bytes | bytearray) -> list[Verdict]:
    """The verdicts in one message on a verdict topic (a ``Verdict`` or a ``BatchVerdicts``).

    Raises one of ``DECODE_ERRORS`` when the payload is neither.
    """
    if b'"verdicts"' in payload:
        return _verdicts_decoder.decode(payload).verdicts
    return [_verdict_decoder.decode(payload)]


def decode_failure(exc: BaseException) -> tuple[str, str]:
    """A rejection reason code and a message for one of ``DECODE_ERRORS``.

    Codes: ``too_deep``, ``invalid_utf8``, ``non_finite`` (a number out of range),
    ``invalid_schema`` (valid JSON, wrong fields or types) and ``malformed_json``.
    """
    text = str(exc)
    if isinstance(exc, RecursionError):
        return "too_deep", "JSON nests too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "invalid_utf8", f"invalid UTF-8 at byte {exc.start}"
    if isinstance(exc, msgspec.ValidationError):
        if "Number out of range" in text:
            return "non_finite", f"number out of range ({text})"
        return "invalid_schema", text
    return "malformed_json", text


class Topics:
    """Topic names under one prefix (``mqtt.topic_prefix``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def status(self, device: str) -> str:
        return f"{self.prefix}/{device}/status"

    def hard(self, device: str) -> str:
        return f"{self.prefix}/{device}/hard"

    def batch(self, device: str) -> str:
        return f"{self.prefix}/{device}/batch"

    def verdict(self, device: str) -> str:
        return f"{self.prefix}/{device}/verdict"

    def telemetry(self, device: str) -> str:
        return f"{self.prefix}/{device}/telemetry"

    def model_cmd(self, device: str) -> str:
        """Model release commands to the device (``ModelCommand``)."""
        return f"{self.prefix}/{device}/cmd/model"

    def model_chunk(self, device: str) -> str:
        """The files of a release sent over MQTT (``ModelChunk``)."""
        return f"{self.prefix}/{device}/cmd/model/chunk"

    def model_events(self, device: str) -> str:
        """What the device did with a release (``ModelEvent``)."""
        return f"{self.prefix}/{device}/model"

    def worker_status(self, worker: str) -> str:
        """A cloud worker's retained status (``WorkerStatus``); one level deeper than a
        device's, so ``{prefix}/+/status`` sees devices only."""
        return f"{self.prefix}/cloud/{worker}/status"

    def shared(self, group: str, kind: str) -> str:
        """Shared subscription for cloud workers, e.g. ``$share/cloud/edge/+/hard``."""
        return f"$share/{group}/{self.prefix}/+/{kind}"

    @staticmethod
    def device_of(topic: str) -> str:
        """The ``{device}`` segment of a device topic (second from the end)."""
        parts = topic.split("/")
        return parts[-2] if len(parts) >= 2 else ""


# -- model releases over MQTT (rollout/) -----------------------------------------------------

Action = Literal["install", "status"]
State = Literal[
    "received",
    "awaiting_files",
    "refused",
    "staged",
    "selftest_failed",
    "shadow",
    "rejected",
    "promoted",
    "committed",
    "rolled_back",
    "status",
]
#: The states after which a release's story is over (``models push`` stops waiting).
FINAL_STATES = frozenset(
    {"promoted", "committed", "refused", "selftest_failed", "rejected", "rolled_back"}
)


class ModelCommand(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """On ``<prefix>/<device>/cmd/model``: install a release, or ask what serves."""

    v: int
    action: Action
    request_id: str = ""
    #: A release folder on the device (or a ``file://`` URL of one).
    path: str = ""
    #: Or the release itself, over MQTT: ``release.json`` and ``release.sig``, base64; the files
    #: follow as ``ModelChunk`` messages.
    statement: str = ""
    signature: str = ""


class ModelChunk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """On ``<prefix>/<device>/cmd/model/chunk``: bytes ``offset``.. of one file of a release."""

    v: int
    release: str
    file: str
    offset: int
    data: str  #: base64
    sha256: str  #: of the decoded data


class ModelEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """On ``<prefix>/<device>/model``: one step of a release, or the answer to ``status``."""

    v: int
    device: str
    state: State
    live: str
    release: str = ""
    request_id: str = ""
    reason: str = ""
    details: dict[str, Any] = {}
