"""MQTT payloads and topic names shared by the device and the cloud worker.

Every payload is a UTF-8 JSON object with a schema version field ``v``; floats
are always finite (the encoder refuses NaN/Infinity). The same structs encode
on one side and decode, strictly, on the other. docs/topics.md documents them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import msgspec

SCHEMA_VERSION = 1
#: MQTT v5 user property carrying the idempotency key of a message.
IDEMPOTENCY_PROPERTY = "idempotency-key"

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
    tier: Literal["urgent", "batch"]
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
    tier: Literal["urgent", "batch"]
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


def check_finite(values: list[list[float]]) -> bool:
    """True when every value is a finite float (JSON has no NaN, but a peer may send 1e999)."""
    return all(math.isfinite(x) for row in values for x in row)


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

    def decision(self, device: str) -> str:
        return f"{self.prefix}/{device}/decision"

    def telemetry(self, device: str) -> str:
        return f"{self.prefix}/{device}/telemetry"

    def model_cmd(self, device: str) -> str:
        """Model release commands to the device (rollout.ModelCommand)."""
        return f"{self.prefix}/{device}/cmd/model"

    def model_chunk(self, device: str) -> str:
        """The files of a release sent over MQTT (rollout.ModelChunk)."""
        return f"{self.prefix}/{device}/cmd/model/chunk"

    def model_events(self, device: str) -> str:
        """What the device did with a release (rollout.ModelEvent)."""
        return f"{self.prefix}/{device}/model"

    def shared(self, group: str, kind: str) -> str:
        """Shared subscription for cloud workers, e.g. ``$share/cloud/edge/+/hard``."""
        return f"$share/{group}/{self.prefix}/+/{kind}"

    @staticmethod
    def device_of(topic: str) -> str:
        """The ``{device}`` segment of a device topic (second from the end)."""
        parts = topic.split("/")
        return parts[-2] if len(parts) >= 2 else ""


encoder = msgspec.json.Encoder()
