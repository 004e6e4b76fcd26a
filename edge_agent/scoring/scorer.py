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
from dataclasses import dataclass

import numpy as np

from edge_agent.errors import ModelLoadError, ModelPackError
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import ModelPack
from edge_agent.scoring import backends, golden
from edge_agent.scoring.backends.base import Backend, BackendOptions, BackendOutput, FloatArray
from edge_agent.scoring.guard import OodCheck, graph_reasons, probe_windows

__all__ = ["ROUTE_REASONS", "Decision", "OodCheck", "Route", "Scorer"]


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
        n = len(readings)
        if n == 0:
            return []
        if n == 1:
            x = readings[0].values[np.newaxis]
            return self._decide(readings, x, self.backend.score_batch(x))
        # One thread fills the reused buffer at a time; another meanwhile stacks its own.
        if not self._buffer_lock.acquire(blocking=False):
            x = np.stack([r.values for r in readings])
            return self._decide(readings, x, self.backend.score_batch(x))
        try:
            buf = self._buffer
            if buf.shape[0] < n:
                buf = self._buffer = np.empty((n, *self.shape), dtype=np.float32)
            for i, r in enumerate(readings):
                buf[i] = r.values
            x = buf[:n]
            return self._decide(readings, x, self.backend.score_batch(x))
        finally:
            self._buffer_lock.release()

    def _decide(self, readings: list[Reading], x: FloatArray, out: BackendOutput) -> list[Decision]:
        probs = out.probs
        if len(readings) == 1:
            k = int(probs[0].argmax())
            idx, conf = [k], [float(probs[0, k])]
        else:
            best = probs.argmax(axis=1)
            idx, conf = best.tolist(), probs[np.arange(len(readings)), best].tolist()
        if out.guard is None:
            guard = self.guard.reasons(x)
        else:
            codes = out.guard.tolist()
            guard = graph_reasons(codes) if any(codes) else [None] * len(codes)
        z = out.ood_score.tolist() if out.ood_score is not None else None
        z_max, threshold, labels, ref = self.z_max, self.threshold, self.labels, self.ref
        now = time.monotonic_ns()
        decisions = []
        for i, reading in enumerate(readings):
            c = conf[i]
            zi = z[i] if z is not None else None
            reason = guard[i]
            if reason is None and zi is not None and z_max is not None and zi > z_max:
                reason = "feature_outlier"
            if reason is None and c < threshold:
                reason = "low_confidence"
            decisions.append(
                Decision(
                    label=labels[idx[i]],
                    confidence=c,
                    route=Route.LOCAL if reason is None else Route.HARD,
                    reason=reason,
                    model=ref,
                    latency_ms=(now - reading.t_mono_ns) / 1e6,
                    reading=reading,
                    ood_score=zi,
                )
            )
        return decisions

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
