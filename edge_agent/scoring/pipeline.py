"""The JSON-lines scoring pipeline behind ``edge-agent score``: lines in, lines out.

Each non-blank input line gets exactly one output line, in input order: a
decision, or an error object with a stable code. Valid readings that arrived
together are scored in batches of up to ``max_batch`` for throughput; the
output order is kept. Every outcome is counted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from edge_agent.errors import ReadingError
from edge_agent.ingest.readings import Item, Oversize, Reading, ReadingDecoder
from edge_agent.scoring.scorer import Decision, Scorer


class ErrorBody(msgspec.Struct):
    code: str
    message: str


class ErrorOut(msgspec.Struct, omit_defaults=True):
    error: ErrorBody
    id: Any = msgspec.UNSET


class DecisionOut(msgspec.Struct, omit_defaults=True):
    id: Any
    label: str
    confidence: float
    route: str
    reason: str | None
    model: str
    latency_ms: float
    tier: str | msgspec.UnsetType = msgspec.UNSET  #: set by the agent for hard cases
    key: str | msgspec.UnsetType = msgspec.UNSET  #: idempotency key of a hard case


#: Called for each decision in input order; may return (tier, key) for the output line.
DecisionHook = Callable[[Decision], "tuple[str, str] | None"]


_encoder = msgspec.json.Encoder()


def decision_out(d: Decision, routed: tuple[str, str] | None = None) -> DecisionOut:
    tier, key = routed if routed is not None else (msgspec.UNSET, msgspec.UNSET)
    return DecisionOut(
        id=d.reading.id,
        label=d.label,
        confidence=round(d.confidence, 6),
        route=d.route,
        reason=d.reason,
        model=d.model,
        latency_ms=round(d.latency_ms, 4),
        tier=tier,
        key=key,
    )


class ScorePipeline:
    """Decode, validate, score and encode groups of lines."""

    def __init__(
        self,
        scorer: Scorer,
        max_line_bytes: int,
        max_batch: int = 64,
        *,
        on_decision: DecisionHook | None = None,
        next_seq: Callable[[], int] | None = None,
    ) -> None:
        self.scorer = scorer
        self.on_decision = on_decision
        self.next_seq = next_seq
        self.decoder = ReadingDecoder(scorer.shape, max_line_bytes)
        self.max_batch = max_batch
        self.counts: Counter[str] = Counter()
        self.rejects: Counter[str] = Counter()

    def process(self, lines: Sequence[Item]) -> bytes:
        """Return the output lines (newline-terminated) for ``lines``, in order.

        An item is a raw line, an ``Oversize`` marker, or — from sources that
        decode themselves (sample windowing) — a ready ``Reading`` or the
        ``ReadingError`` that rejected its input.
        """
        out: list[bytes] = [b""] * len(lines)
        pending: list[tuple[int, Reading]] = []
        for pos, line in enumerate(lines):
            t0 = time.monotonic_ns()
            if isinstance(line, ReadingError):
                out[pos] = self._reject(line, msgspec.UNSET)
                continue
            if isinstance(line, Reading):
                reading = line
            elif isinstance(line, Oversize):
                out[pos] = self._reject(
                    ReadingError(
                        "too_large",
                        f"line of {line.size} bytes is over the"
                        f" {self.decoder.max_line_bytes}-byte limit",
                    ),
                    msgspec.UNSET,
                )
                continue
            else:
                try:
                    reading = self.decoder.decode(line)
                except ReadingError as err:
                    rid = self.decoder.reject_id(line) if err.code != "malformed_json" else None
                    out[pos] = self._reject(err, msgspec.UNSET if rid is None else rid)
                    continue
                reading.t_mono_ns = t0
            reading.seq = self.next_seq() if self.next_seq else self.counts["lines"] + pos
            pending.append((pos, reading))
            if len(pending) >= self.max_batch:
                self._score(pending, out)
                pending = []
        if pending:
            self._score(pending, out)
        self.counts["lines"] += len(lines)
        return b"".join(out)

    def _score(self, pending: list[tuple[int, Reading]], out: list[bytes]) -> None:
        decisions = self.scorer.score([r for _, r in pending])
        for (pos, _), decision in zip(pending, decisions, strict=True):
            # The hook may re-route (the learned policy): count the route it leaves.
            routed = self.on_decision(decision) if self.on_decision is not None else None
            self.counts[decision.route] += 1
            out[pos] = _encoder.encode(decision_out(decision, routed)) + b"\n"

    def _reject(self, err: ReadingError, rid: Any) -> bytes:
        self.counts["rejected"] += 1
        self.rejects[err.code] += 1
        return _encoder.encode(ErrorOut(error=ErrorBody(err.code, err.message), id=rid)) + b"\n"

    def summary(self) -> str:
        """One line for stderr: totals and rejections by reason."""
        c = self.counts
        text = (
            f"scored {c['local'] + c['hard']} of {c['lines']} lines:"
            f" {c['local']} local, {c['hard']} hard, {c['rejected']} rejected"
        )
        if self.rejects:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.rejects.items())) + ")"
        return text
