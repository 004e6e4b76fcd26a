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
from edge_agent.scoring.backends.base import FloatArray
from edge_agent.scoring.scorer import Decision, Route, Scorer


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
#: Called once per scored group with its decisions in input order and the stacked input
#: ([N, *shape], valid during the call); returns, per decision, (tier, key) for the output
#: line or None. The agent's routing (``Agent.route_many``).
DecisionsHook = Callable[[list[Decision], FloatArray], "list[tuple[str, str] | None]"]
#: Scores and acts on one reading itself, when nobody reads its decision; returns whether it
#: went hard. The agent's latency path (``Agent.act_one``), which the hooks above would
#: also give, with a ``Decision`` for every reading.
ActOne = Callable[[Reading], bool]
#: The same for a group of ready readings (``Agent.act_many``); returns how many went hard.
ActMany = Callable[[list[Reading]], int]


_encoder = msgspec.json.Encoder()


def decision_out(d: Decision, routed: tuple[str, str] | None = None) -> DecisionOut:
    """The output line's fields. Confidence is given to 6 decimals and latency to 4, rounded
    half up (both are non-negative): ``int(v * 10^k + 0.5) / 10^k`` is the double nearest to
    that decimal, so it prints as it; a fifth of what ``round`` costs per call."""
    tier, key = routed if routed is not None else (msgspec.UNSET, msgspec.UNSET)
    return DecisionOut(
        id=d.reading.id,
        label=d.label,
        confidence=int(d.confidence * 1e6 + 0.5) / 1e6,
        route=d.route,
        reason=d.reason,
        model=d.model,
        latency_ms=int(d.latency_ms * 1e4 + 0.5) / 1e4,
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
        on_decisions: DecisionsHook | None = None,
        act_one: ActOne | None = None,
        act_many: ActMany | None = None,
        next_seqs: Callable[[int], list[int]] | None = None,
        next_seq: Callable[[], int] | None = None,
        output: bool = True,
    ) -> None:
        self.scorer = scorer
        self.on_decision = on_decision
        self.on_decisions = on_decisions
        self.act_one = act_one
        self.act_many = act_many
        #: Sequence numbers for n readings (the outbox's, unique across runs); default: the
        #: reading's position among all lines.
        self.next_seqs = next_seqs
        #: One sequence number (``next_seqs(1)[0]``, cheaper where given).
        self.next_seq = next_seq or ((lambda: next_seqs(1)[0]) if next_seqs is not None else None)
        #: False: nobody reads the output (``edge-agent run`` without ``--decisions``), so
        #: ``process`` returns nothing and encodes nothing; every outcome is still counted.
        self.output = output
        self.decoder = ReadingDecoder(scorer.shape, max_line_bytes)
        self.max_batch = max_batch
        self.counts: Counter[str] = Counter()
        self.rejects: Counter[str] = Counter()

    def process(self, lines: Sequence[Item]) -> bytes:
        """Return the output lines (newline-terminated) for ``lines``, in order.

        An item is a raw line, an ``Oversize`` marker, or — from sources that
        decode themselves (sample windowing, binary frames) — a ready ``Reading`` or
        the ``ReadingError`` that rejected its input.
        """
        if len(lines) == 1 and not self.output:
            # One reading whose decision nobody reads: no lists. (A line that fails to decode
            # takes the general path below, which rejects it.)
            line = lines[0]
            if type(line) is Reading:
                return self._one(line)
            if type(line) is bytes:
                t0 = time.monotonic_ns()
                try:
                    reading = self.decoder.decode(line)
                except ReadingError:
                    pass
                else:
                    reading.t_mono_ns = t0
                    return self._one(reading)
        if not self.output and all(type(line) is Reading for line in lines):
            for start in range(0, len(lines), self.max_batch):
                self._ready(lines[start : start + self.max_batch])  # type: ignore[arg-type]
            self.counts["lines"] += len(lines)
            return b""
        # Rejections are encoded at once; decisions at the end, all in one call when the
        # group had no rejection (the common case).
        out: list[bytes | DecisionOut] = [b""] * len(lines)
        pending: list[tuple[int, Reading]] = []
        for pos, line in enumerate(lines):
            if isinstance(line, Reading):
                reading = line
            elif isinstance(line, ReadingError):
                out[pos] = self._reject(line, msgspec.UNSET)
                continue
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
                t0 = time.monotonic_ns()
                try:
                    reading = self.decoder.decode(line)
                except ReadingError as err:
                    rid = self.decoder.reject_id(line) if err.code != "malformed_json" else None
                    out[pos] = self._reject(err, msgspec.UNSET if rid is None else rid)
                    continue
                reading.t_mono_ns = t0
            pending.append((pos, reading))
            if len(pending) >= self.max_batch:
                self._score(pending, out)
                pending = []
        if pending:
            self._score(pending, out)
        self.counts["lines"] += len(lines)
        if not self.output:
            return b""
        if not any(isinstance(o, bytes) for o in out):
            return _encoder.encode_lines(out)
        return b"".join(o if isinstance(o, bytes) else _encoder.encode(o) + b"\n" for o in out)

    def _one(self, reading: Reading) -> bytes:
        """``process`` of one ready reading whose decision nobody reads: what ``_score`` does,
        without the lists."""
        counts = self.counts
        reading.seq = self.next_seq() if self.next_seq is not None else counts["lines"]
        if self.act_one is not None:
            hard = self.act_one(reading)
        else:
            decisions, x = self.scorer.score_with_input([reading])
            if self.on_decisions is not None:
                self.on_decisions(decisions, x)
            elif self.on_decision is not None:
                self.on_decision(decisions[0])
            hard = decisions[0].route == Route.HARD
        counts["hard" if hard else "local"] += 1
        counts["lines"] += 1
        return b""

    def _ready(self, readings: list[Reading]) -> None:
        """Score and route ready readings whose decisions nobody reads (``process``)."""
        if self.act_many is None:
            self._route(self._number(readings))
            return
        hard = self.act_many(self._number(readings))
        self.counts["hard"] += hard
        self.counts["local"] += len(readings) - hard

    def _score(self, pending: list[tuple[int, Reading]], out: list[bytes | DecisionOut]) -> None:
        if not self.output:
            self._ready([r for _, r in pending])
            return
        decisions, routed = self._route(self._number([r for _, r in pending]))
        for (pos, _), decision, how in zip(pending, decisions, routed, strict=True):
            out[pos] = decision_out(decision, how)

    def _number(self, readings: list[Reading]) -> list[Reading]:
        """Give each reading its sequence number, in order."""
        if self.next_seqs is not None:
            for r, seq in zip(readings, self.next_seqs(len(readings)), strict=True):
                r.seq = seq
        else:
            base = self.counts["lines"]
            for i, r in enumerate(readings):
                r.seq = base + i
        return readings

    def _route(
        self, readings: list[Reading]
    ) -> tuple[list[Decision], list[tuple[str, str] | None]]:
        """Score a group, hand its decisions to the hook and count the routes it leaves (the
        learned policy may re-route); the decisions and, per decision, (tier, key) or None."""
        decisions, x = self.scorer.score_with_input(readings)
        routed: list[tuple[str, str] | None]
        if self.on_decisions is not None:
            routed = self.on_decisions(decisions, x)
        elif self.on_decision is not None:
            routed = [self.on_decision(d) for d in decisions]
        else:
            routed = [None] * len(decisions)
        hard = sum(d.route == Route.HARD for d in decisions)
        self.counts["hard"] += hard
        self.counts["local"] += len(decisions) - hard
        return decisions, routed

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
