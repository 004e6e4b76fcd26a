"""Scorer: one backend plus one verified model pack, turning readings into Decisions.

Besides running the model, the scorer applies the pack's out-of-distribution
guard (guard.py). A window unlike anything the model was trained on is never
trusted locally, whatever the classifier says: a dead (constant) channel, values
far outside the training range, a clipped (saturated) channel, or a model-side
OOD score over the manifest's limit sends it to ``hard`` with the reason. Below
the manifest's confidence threshold a reading is ``hard`` too. The router
(router.py) later decides which cloud tier a hard case goes to.

Readings scored together are copied into one input buffer, allocated once and
reused; the work per reading after the model is a few list lookups.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from edge_agent.errors import ModelLoadError, ModelPackError
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import ModelPack
from edge_agent.scoring import backends, golden
from edge_agent.scoring.backends.base import (
    Backend,
    BackendOptions,
    BackendOutput,
    FloatArray,
    OneOutput,
)
from edge_agent.scoring.guard import GRAPH_CODES, OodCheck, graph_reasons, probe_windows

__all__ = [
    "ROUTE_REASONS",
    "Assessment",
    "Decision",
    "GroupAssessment",
    "OodCheck",
    "Route",
    "Scorer",
]


class Route(enum.StrEnum):
    """Where a decision goes: acted on locally, or a hard case for the cloud."""

    LOCAL = "local"
    HARD = "hard"


#: Stable route reasons, in the order they are checked.
ROUTE_REASONS: dict[str, str] = {
    "dead_sensor": "a channel is constant (stuck or disconnected sensor)",
    "out_of_range": "values lie far outside the range seen in training",
    "saturated": "a channel is clipped at its extreme for much of the window",
    "feature_outlier": "the model's own out-of-distribution score is over the pack's limit",
    "low_confidence": "the calibrated confidence is below the pack's threshold",
}


#: Reason codes of ``Scorer._decide``: 0 none, 1-3 the guard's (guard.GRAPH_CODES), 4 and 5.
_REASON_OF: list[str | None] = [
    None,
    GRAPH_CODES[1],
    GRAPH_CODES[2],
    GRAPH_CODES[3],
    "feature_outlier",
    "low_confidence",
]
_GUARD_CODE = {reason: code for code, reason in enumerate(_REASON_OF) if code <= 3}
_ROUTE_OF = [Route.LOCAL] + [Route.HARD] * 5

#: ``Scorer.assess_one``'s answer: the label's index, the confidence, the reason code
#: (``_REASON_OF``; 0: none, the reading is local), the model's OOD score, the latency (ms).
Assessment = tuple[int, float, int, float | None, float]
#: ``Scorer.assess_many``'s answer: the group's stacked input, then per reading the label's
#: index, the confidence, the reason code (an array: ``!= 0`` is hard), the OOD score and
#: the latency (ms).
GroupAssessment = tuple[
    FloatArray, list[int], list[float], npt.NDArray[Any], list[Any], list[float]
]
T = TypeVar("T")


@dataclass(slots=True)
class Decision:
    """The scorer's answer for one reading."""

    label: str
    confidence: float
    route: Route
    reason: str | None
    model: str  #: name@version
    latency_ms: float
    reading: Reading
    ood_score: float | None = None


class Scorer:
    """Loads a verified pack into its backend and scores readings."""

    def __init__(self, pack: ModelPack, backend: Backend, guard: OodCheck) -> None:
        self.pack = pack
        self.backend = backend
        self.guard = guard
        m = pack.manifest
        self.labels = list(m.labels)
        self.shape = tuple(m.input.shape)
        self.threshold = m.routing.confidence_threshold
        self.z_max = m.routing.feature_z_max
        self.ref = pack.ref
        self._buffer = np.empty((0, *self.shape), dtype=np.float32)
        #: The backend's single-window path (``score_one``), where it has one.
        self._score_one: Callable[[FloatArray], OneOutput | None] | None = getattr(
            backend, "score_one", None
        )
        self._buffer_lock = threading.Lock()

    @classmethod
    def open(cls, pack: ModelPack, options: BackendOptions | None = None) -> Scorer:
        """Verify the pack's files, load its backend, warm it up."""
        if not pack.verified:
            pack.verify()
        if pack.manifest.input.dtype != "float32":
            raise ModelPackError(f"{pack.path}: only float32 input is supported")
        backend = backends.create(pack.manifest.backend)
        backend.load(pack, options or BackendOptions())
        scorer = cls(pack, backend, OodCheck(pack))
        why = scorer.check_graph_guard()
        if why:
            scorer.close()
            raise ModelLoadError(
                f"{pack.path}: the guard inside the model's graph does not decide like the"
                f" manifest's [ood] table: {why}; the pack is refused"
            )
        st = pack.manifest.selftest
        if st is not None and st.on_load:
            why = golden.self_test(scorer)
            if why:
                scorer.close()
                raise ModelLoadError(
                    f"{pack.path}: this machine's {pack.manifest.backend} build does not"
                    f" reproduce the pack's golden inputs within its cross-build tolerance"
                    f" ({st.confidence_tolerance}): {why}; the pack is refused rather than"
                    " served with other decisions than it was checked with"
                )
        return scorer

    def score(self, readings: list[Reading]) -> list[Decision]:
        """Score readings in one backend call; decisions in the same order."""
        return self.score_with_input(readings)[0]

    def score_with_input(self, readings: list[Reading]) -> tuple[list[Decision], FloatArray]:
        """``score``, and the stacked input it scored ([N, *shape]; for more than one reading
        a view of the reused buffer: read it before this scorer scores again)."""
        n = len(readings)
        if n == 0:
            return [], np.empty((0, *self.shape), dtype=np.float32)
        if n == 1:
            reading = readings[0]
            x = reading.values[np.newaxis]
            assessed = self.assess_one(reading)
            if assessed is not None:
                return [self.decision(reading, assessed)], x
            return self._decide(readings, x, self.backend.score_batch(x)), x
        return self._group(readings, lambda x, out: (self._decide(readings, x, out), x))

    def assess_many(self, readings: list[Reading]) -> GroupAssessment:
        """``assess_one`` for a group of readings, scored together, without a ``Decision``:
        the stacked input (as ``score_with_input`` gives it) and, per reading, the label's
        index, the confidence, the reason code, the OOD score and the latency (ms)."""

        def assess(x: FloatArray, out: BackendOutput) -> GroupAssessment:
            best, conf, code = self._codes(x, out)
            z = out.ood_score.tolist() if out.ood_score is not None else [None] * len(readings)
            now = time.monotonic_ns()
            ms = [(now - r.t_mono_ns) / 1e6 for r in readings]
            return x, best.tolist(), conf.tolist(), code, z, ms

        return self._group(readings, assess)

    def _group(self, readings: list[Reading], use: Callable[[FloatArray, BackendOutput], T]) -> T:
        """``use`` of a group's stacked input and the backend's output for it."""
        n = len(readings)
        block = readings[0].block
        if (
            block is not None
            and block.shape[0] == n
            and [r.row for r in readings] == list(range(n))
            and all(r.block is block for r in readings)
        ):
            # Frames decoded together, all valid: their block is the input as it is.
            return use(block, self.backend.score_batch(block))
        # One thread fills the reused buffer at a time; another meanwhile stacks its own.
        if not self._buffer_lock.acquire(blocking=False):
            x = np.stack([r.values for r in readings])
            return use(x, self.backend.score_batch(x))
        try:
            buf = self._buffer
            if buf.shape[0] < n:
                buf = self._buffer = np.empty((n, *self.shape), dtype=np.float32)
            for i, r in enumerate(readings):
                buf[i] = r.values
            x = buf[:n]
            return use(x, self.backend.score_batch(x))
        finally:
            self._buffer_lock.release()

    def assess_one(self, reading: Reading) -> Assessment | None:
        """One reading through the backend's single-window path, without a ``Decision``: the
        latency path, on which the agent makes one only for a reading that needs more than to
        be counted (``Agent.act_one``). None where the backend has no such path, or another
        thread is using it: then ``score_with_input``."""
        got = self._score_one(reading.values) if self._score_one is not None else None
        if got is None:
            return None
        probs, z, g = got
        c = max(probs)
        if g is not None:
            code = int(g)  # the graph's guard codes are ``_decide``'s 0-3
        else:
            code = _GUARD_CODE[self.guard.reasons(reading.values[np.newaxis])[0]]
        if not code and z is not None and self.z_max is not None and z > self.z_max:
            code = 4
        if not code and c < self.threshold:
            code = 5
        return probs.index(c), c, code, z, (time.monotonic_ns() - reading.t_mono_ns) / 1e6

    def decision(self, reading: Reading, assessed: Assessment) -> Decision:
        """The ``Decision`` of a reading ``assess_one`` scored."""
        k, c, code, z, ms = assessed
        return Decision(
            self.labels[k], c, _ROUTE_OF[code], _REASON_OF[code], self.ref, ms, reading, z
        )

    def _codes(
        self, x: FloatArray, out: BackendOutput
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64], npt.NDArray[Any]]:
        """For a scored group, with numpy: each reading's label index, confidence and reason
        code: the guard's (3 dead, 2 out of range, 1 saturated), else 4 for the model's own
        OOD score over its limit, else 5 below the confidence threshold, else 0 (local)."""
        probs = out.probs
        best = probs.argmax(axis=1)
        conf = probs[np.arange(len(probs)), best].astype(np.float64)  # limits compare as floats
        if out.guard is not None:
            code = out.guard.astype(np.int8)
        else:
            code = np.array([_GUARD_CODE[r] for r in self.guard.reasons(x)], dtype=np.int8)
        if out.ood_score is not None and self.z_max is not None:
            z_over = out.ood_score.astype(np.float64) > self.z_max
            code = np.where(code > 0, code, np.where(z_over, 4, 0))
        return best, conf, np.where(code > 0, code, np.where(conf < self.threshold, 5, 0))

    def _decide(self, readings: list[Reading], x: FloatArray, out: BackendOutput) -> list[Decision]:
        """Decisions for a scored group: the reasons worked out with numpy for the whole
        group (``_codes``), then one ``Decision`` per reading."""
        best, conf, code = self._codes(x, out)
        z = out.ood_score.tolist() if out.ood_score is not None else [None] * len(readings)
        labels, ref, now = self.labels, self.ref, time.monotonic_ns()
        return [
            Decision(
                labels[k],
                c,
                _ROUTE_OF[r],
                _REASON_OF[r],
                ref,
                (now - reading.t_mono_ns) / 1e6,
                reading,
                zi,
            )
            for k, c, r, reading, zi in zip(
                best.tolist(), conf.tolist(), code.tolist(), readings, z, strict=True
            )
        ]

    def check_graph_guard(self) -> str:
        """ "" when the backend's own guard decides like the ``[ood]`` table on the probe
        windows (or the backend has none), else what differed."""
        ood = self.pack.manifest.ood
        if ood is None:
            return ""
        x = probe_windows(ood, self.shape)
        got = self.backend.score_batch(x).guard
        if got is None:
            return ""
        want = OodCheck(self.pack).reasons(x)
        have = graph_reasons(got.tolist())
        wrong = [(i, h, w) for i, (h, w) in enumerate(zip(have, want, strict=True)) if h != w]
        if not wrong:
            return ""
        i, h, w = wrong[0]
        return (
            f"{len(wrong)} of {len(want)} probe windows differ (window {i}: the graph says"
            f" {h or 'nothing wrong'}, the [ood] table {w or 'nothing wrong'})"
        )

    def close(self) -> None:
        self.backend.close()
