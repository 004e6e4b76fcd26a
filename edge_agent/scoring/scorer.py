"""Scorer: one backend plus one verified model pack, turning readings into Decisions.

Besides running the model, the scorer applies the pack's out-of-distribution
guard. A window unlike anything the model was trained on is never trusted
locally, whatever the classifier says: a dead (constant) channel, values far
outside the training range, a clipped (saturated) channel, or a model-side OOD
score over the manifest's limit sends it to ``hard`` with the reason. Below
the manifest's confidence threshold a reading is ``hard`` too. The router
(router.py) later decides which cloud tier a hard case goes to.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.errors import ModelLoadError, ModelPackError
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import ModelPack
from edge_agent.scoring import backends, golden
from edge_agent.scoring.backends.base import Backend, BackendOptions, FloatArray


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


class OodCheck:
    """Vectorised checks of raw windows against the pack's training statistics."""

    def __init__(self, pack: ModelPack) -> None:
        ood = pack.manifest.ood
        self.enabled = ood is not None
        if ood is None:
            return
        lo = np.asarray(ood.channel_min, dtype=np.float32)
        hi = np.asarray(ood.channel_max, dtype=np.float32)
        span = hi - lo
        self.lower = lo - ood.range_margin * span
        self.upper = hi + ood.range_margin * span
        self.dead_std = ood.dead_channel_std
        self.saturation = ood.saturation_fraction

    def reasons(self, x: FloatArray) -> list[str | None]:
        """One reason (or None) per window of ``x`` shaped [N, channels, samples].

        Written for the common case (nothing wrong) to cost a handful of numpy calls:
        the standard deviation is computed only for channels whose range is small
        enough that it could be below the dead-sensor limit (a window of T samples with
        range r has a standard deviation of at least r / sqrt(2T)).
        """
        n = x.shape[0]
        out: list[str | None] = [None] * n
        if not self.enabled:
            return out
        xmin = x.min(axis=2)
        xmax = x.max(axis=2)
        span = xmax - xmin
        maybe_dead = span < self.dead_std * np.sqrt(2.0 * x.shape[2])
        if maybe_dead.any():
            dead = (maybe_dead & (x.std(axis=2) < self.dead_std)).any(axis=1)
        else:
            dead = maybe_dead.any(axis=1)
        out_of_range = ((xmin < self.lower) | (xmax > self.upper)).any(axis=1)
        limit = self.saturation * x.shape[2]
        at_max = (x == xmax[:, :, None]).sum(axis=2)
        at_min = (x == xmin[:, :, None]).sum(axis=2)
        saturated = ((span > 0) & ((at_max > limit) | (at_min > limit))).any(axis=1)
        flagged = dead | out_of_range | saturated
        if not flagged.any():
            return out
        for i in np.flatnonzero(flagged):
            if dead[i]:
                out[i] = "dead_sensor"
            elif out_of_range[i]:
                out[i] = "out_of_range"
            else:
                out[i] = "saturated"
        return out


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
        if not readings:
            return []
        x = (
            np.stack([r.values for r in readings])
            if len(readings) > 1
            else (readings[0].values[np.newaxis])
        )
        out = self.backend.score_batch(x)
        guard = self.guard.reasons(x)
        probs = out.probs
        idx = probs.argmax(axis=1)
        conf = probs[np.arange(len(readings)), idx]
        z: npt.NDArray[np.float32] | None = out.ood_score
        now = time.monotonic_ns()
        decisions = []
        for i, reading in enumerate(readings):
            c = float(conf[i])
            zi = float(z[i]) if z is not None else None
            reason = guard[i]
            if reason is None and zi is not None and self.z_max is not None and zi > self.z_max:
                reason = "feature_outlier"
            if reason is None and c < self.threshold:
                reason = "low_confidence"
            decisions.append(
                Decision(
                    label=self.labels[int(idx[i])],
                    confidence=c,
                    route=Route.LOCAL if reason is None else Route.HARD,
                    reason=reason,
                    model=self.ref,
                    latency_ms=(now - reading.t_mono_ns) / 1e6,
                    reading=reading,
                    ood_score=zi,
                )
            )
        return decisions

    def close(self) -> None:
        self.backend.close()
