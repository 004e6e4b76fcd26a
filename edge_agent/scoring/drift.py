"""Drift: do live readings still look like the data the model was trained on?

The pack's ``[drift]`` table (``modelpack.DriftReference``, written offline by
``scripts/drift_reference.py`` from the training split) holds, for a few cheap
per-channel window statistics (``mean`` and ``std`` of each channel), quantile
bin edges and the share of training windows in each bin; and the confidence
histogram and hard-case rate the pack's scorer gave on those windows.

Online, the scoring loop only copies each scored reading's raw window, its
confidence and whether it was hard into preallocated ring buffers of
``drift.window`` readings (``DriftMonitor.record``: a numpy slot write, no
allocation). On each telemetry tick ``DriftMonitor.snapshot`` computes the
statistics of the windows in the ring, bins them with the reference edges and
reports the population stability index (PSI) of every feature,

    PSI = sum over bins of (o - r) * ln(o / r),

with observed and reference shares ``o`` and ``r`` floored at ``drift.epsilon``,
the largest PSI and its feature, the confidence histogram next to its reference
and the hard-case rate. The ``flag`` rises when the largest PSI reaches
``drift.psi_threshold`` (or, if ``drift.hard_rate_excess`` > 0, when the hard
rate exceeds the reference by that much) and clears when the largest PSI falls
below ``drift.psi_clear`` (and the hard rate is back); both edges are logged
once. Nothing is computed until the ring holds ``drift.window`` readings.

A pack without ``[drift]``, an input that is not [channels, samples], or
``drift.enabled = false`` turns monitoring off; the telemetry block says so
and why. docs/drift.md has the measured numbers behind the defaults.
"""

from __future__ import annotations

import array
import itertools
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.config import DriftSettings
from edge_agent.errors import ModelPackError
from edge_agent.models.pack import DriftReference, ModelPack

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

#: Per-channel window statistics a reference may name, computed over the samples axis.
STATS = ("mean", "std")


def window_features(x: npt.NDArray[np.floating[Any]], stats: Sequence[str]) -> F64:
    """[N, channels, samples] -> [N, len(stats) x channels], stat-major, in float64."""
    # Accumulated in float64 as the reductions read the values, as ``x.mean`` and ``x.std``
    # with ``dtype=float64`` do (the same numbers as a float64 copy first, without the copy),
    # and the mean summed once for both: numpy's ``std`` sums it again.
    n = x.shape[2]
    mean = np.add.reduce(x, axis=2, dtype=np.float64, keepdims=True)
    np.true_divide(mean, n, out=mean)
    cols: list[F64] = []
    for stat in stats:
        if stat == "mean":
            cols.append(mean[:, :, 0])
        elif stat == "std":
            dev = np.subtract(x, mean, dtype=np.float64)
            np.multiply(dev, dev, out=dev)
            var = np.add.reduce(dev, axis=2, dtype=np.float64)
            np.true_divide(var, n, out=var)
            cols.append(np.sqrt(var, out=var))
        else:
            raise ValueError(f"unknown drift statistic {stat!r} (known: {', '.join(STATS)})")
    return np.concatenate(cols, axis=1)


def feature_names(stats: Sequence[str], channels: Sequence[str]) -> list[str]:
    return [f"{ch}_{stat}" for stat in stats for ch in channels]


def bin_shares(values: F64, edges: F64) -> F64:
    """Share of ``values`` [N, F] in each bin of each feature; ``edges`` [F, B-1] ascending.

    Bin b of feature f holds edges[f, b-1] <= v < edges[f, b] (the first and last bins are
    open-ended), as ``np.searchsorted(..., side="right")`` assigns them.
    """
    n, nf = values.shape
    bins = edges.shape[1] + 1
    idx = (values[:, :, None] >= edges[None, :, :]).sum(axis=2)  # [N, F] bin index
    # One count over all features: feature f's bins are f * bins ... f * bins + bins - 1.
    idx += np.arange(nf) * bins
    counts = np.bincount(idx.ravel(), minlength=nf * bins).reshape(nf, bins)
    shares: F64 = counts / max(n, 1)
    return shares


def psi(observed: F64, reference: F64, epsilon: float) -> F64:
    """Population stability index per row of shares [F, B] (both floored at ``epsilon``)."""
    o = np.maximum(observed, epsilon)
    r = np.maximum(reference, epsilon)
    out: F64 = ((o - r) * np.log(o / r)).sum(axis=-1)
    return out


def reference_from_windows(
    x: npt.NDArray[np.floating[Any]], stats: Sequence[str], bins: int, digits: int = 7
) -> tuple[F64, F64]:
    """Quantile bin edges (rounded to ``digits`` significant digits) and the windows'
    share per bin under those rounded edges: what ``[drift]`` stores."""
    feats = window_features(x, stats)
    q = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges = np.quantile(feats, q, axis=0).T  # [F, B-1]
    edges = np.asarray([[float(f"{v:.{digits}g}") for v in row] for row in edges])
    return edges, bin_shares(feats, edges)


def confidence_labels(edges: Sequence[float]) -> list[str]:
    """Bucket names for a confidence histogram with inner ``edges``: ``"0.90-0.95"`` ..."""
    bounds = [0.0, *edges, 1.0]
    return [f"{lo:.2f}-{hi:.2f}" for lo, hi in itertools.pairwise(bounds)]


class DriftMonitor:
    """Ring buffers of the last ``window`` scored readings, and the drift statistics over them.

    ``record`` runs on the scoring thread; ``snapshot`` on the telemetry thread. The ring is
    written without a lock: a snapshot taken while a slot is overwritten may see one window
    half old, half new, which moves a statistic over hundreds of readings by nothing that
    matters; ``snapshot`` itself is serialised so the flag's edges are logged once.
    """

    def __init__(self, pack: ModelPack, settings: DriftSettings) -> None:
        self.settings = settings
        self.window = settings.window
        self.off_reason = ""
        self.flag = False
        self.raised = 0
        self._lock = threading.Lock()
        self._n = 0
        self._values: npt.NDArray[np.float32] | None = None
        self._rows: list[npt.NDArray[np.float32]] = []
        m = pack.manifest
        ref = m.drift
        if not settings.enabled:
            self.off_reason = "disabled by drift.enabled = false"
        elif ref is None:
            self.off_reason = f"model pack {pack.ref} has no [drift] reference"
        elif len(m.input.shape) != 2:
            self.off_reason = f"input shape {m.input.shape} is not [channels, samples]"
        if self.off_reason:
            return
        if ref is None:  # pragma: no cover - handled above; narrows the type
            return
        channels = list(m.input.channels) or [f"ch{i}" for i in range(m.input.shape[0])]
        self.ref = ref
        self.stats = list(ref.stats)
        self.names = feature_names(self.stats, channels)
        self.edges = np.asarray(ref.edges, dtype=np.float64)
        self.ref_shares = np.asarray(ref.proportions, dtype=np.float64)
        self.conf_edges = np.asarray(ref.confidence_edges, dtype=np.float64)
        self.conf_ref = np.asarray(ref.confidence_proportions, dtype=np.float64)
        self.conf_names = confidence_labels(ref.confidence_edges)
        _check_reference(pack, ref, self.names, len(channels), m.input.shape[0])
        if settings.psi_clear > settings.psi_threshold:
            raise ModelPackError(
                f"drift.psi_clear {settings.psi_clear} is above drift.psi_threshold"
                f" {settings.psi_threshold}"
            )
        shape = (self.window, *m.input.shape)
        self._values = np.zeros(shape, dtype=np.float32)
        self._rows = list(self._values)  # a view of each slot, made once
        # Plain buffers: a Python number stored per reading costs less than a numpy element.
        self._conf = array.array("f", bytes(4 * self.window))
        self._hard = bytearray(self.window)

    @property
    def enabled(self) -> bool:
        return self._values is not None

    def record(self, values: npt.NDArray[np.float32], confidence: float, hard: bool) -> None:
        """Keep one scored reading (scoring thread; a few slot writes)."""
        buf = self._values
        if buf is None:
            return
        i = self._n % self.window
        self._rows[i][...] = values
        self._conf[i] = confidence
        self._hard[i] = hard
        self._n += 1

    def record_many(
        self, values: npt.NDArray[np.float32], confidence: list[float], hard: list[bool]
    ) -> None:
        """``record`` for a scored group: ``values`` is its stacked input [N, *shape]."""
        buf = self._values
        if buf is None:
            return
        n = len(confidence)
        if n > self.window:  # only the last ``window`` readings are kept anyway
            self._n += n - self.window
            values, confidence, hard = (
                values[-self.window :],
                confidence[-self.window :],
                hard[-self.window :],
            )
            n = self.window
        i = self._n % self.window
        first = min(n, self.window - i)  # up to the end of the ring, then from its start
        for lo, hi, at in ((0, first, i), (first, n, 0)):
            if hi > lo:
                buf[at : at + hi - lo] = values[lo:hi]
                self._conf[at : at + hi - lo] = array.array("f", confidence[lo:hi])
                self._hard[at : at + hi - lo] = bytes(hard[lo:hi])
        self._n += n

    def snapshot(self) -> dict[str, Any]:
        """The ``drift`` block of telemetry (telemetry thread)."""
        with self._lock:
            return self._snapshot()

    def _update_flag(
        self, over: bool, psi_max: float, feature: str, hard_rate: float, hard_high: bool
    ) -> None:
        """Raise the flag on drift; clear it once PSI is below ``psi_clear`` (hysteresis)."""
        s = self.settings
        if not self.flag and over:
            self.flag = True
            self.raised += 1
            log.warning(
                "drift: live input differs from the training distribution over the last %d"
                " readings: max PSI %.3f on %s (threshold %g)%s",
                self.window,
                psi_max,
                feature,
                s.psi_threshold,
                f"; hard rate {hard_rate:.3f} vs {self.ref.hard_rate:.3f} in training"
                if hard_high
                else "",
            )
        elif self.flag and psi_max < s.psi_clear and not hard_high:
            self.flag = False
            log.warning(
                "drift cleared: max PSI %.3f on %s (below %g) over the last %d readings",
                psi_max,
                feature,
                s.psi_clear,
                self.window,
            )

    def _snapshot(self) -> dict[str, Any]:
        s = self.settings
        if self._values is None:
            return {
                "enabled": False,
                "state": "off",
                "reason": self.off_reason,
                "flag": False,
                "psi": {},
                "confidence": {},
            }
        n = self._n
        filled = min(n, self.window)
        block: dict[str, Any] = {
            "enabled": True,
            "state": "warming_up",
            "flag": self.flag,
            "flags_raised": self.raised,
            "window": self.window,
            "readings": filled,
            "psi_threshold": s.psi_threshold,
            "psi_max": None,
            "psi_max_feature": None,
            "features_over": [],
            "psi": {},
            "confidence": {},
            "confidence_ref": dict(zip(self.conf_names, self.conf_ref.tolist(), strict=True)),
            "confidence_psi": None,
            "hard_rate": None,
            "hard_rate_ref": self.ref.hard_rate,
        }
        if filled < self.window:
            return block
        feats = window_features(self._values, self.stats)
        values = psi(bin_shares(feats, self.edges), self.ref_shares, s.epsilon)
        top = int(values.argmax())
        psi_max = float(values[top])
        conf = np.frombuffer(self._conf, dtype=np.float32).astype(np.float64)
        conf_shares = bin_shares(conf[:, None], self.conf_edges[None, :])[0]
        hard_rate = float(np.frombuffer(self._hard, dtype=np.uint8).mean())
        hard_high = s.hard_rate_excess > 0 and hard_rate - self.ref.hard_rate >= s.hard_rate_excess
        over = [
            name
            for name, v in zip(self.names, values.tolist(), strict=True)
            if v >= s.psi_threshold
        ]
        reasons = (["feature_psi"] if psi_max >= s.psi_threshold else []) + (
            ["hard_rate"] if hard_high else []
        )
        self._update_flag(bool(reasons), psi_max, self.names[top], hard_rate, hard_high)
        block.update(
            {
                "state": "drift" if self.flag else "ok",
                "flag": self.flag,
                "flags_raised": self.raised,
                "reasons": reasons,
                "psi_max": round(psi_max, 6),
                "psi_max_feature": self.names[top],
                "features_over": over,
                "psi": {k: round(v, 6) for k, v in zip(self.names, values.tolist(), strict=True)},
                "confidence": {
                    k: round(v, 6)
                    for k, v in zip(self.conf_names, conf_shares.tolist(), strict=True)
                },
                "confidence_psi": round(float(psi(conf_shares, self.conf_ref, s.epsilon)), 6),
                "hard_rate": round(hard_rate, 6),
            }
        )
        return block


def _check_reference(
    pack: ModelPack, ref: DriftReference, names: list[str], n_names: int, channels: int
) -> None:
    where = f"{pack.path}/manifest.toml: [drift]"
    unknown = [s for s in ref.stats if s not in STATS]
    if unknown:
        raise ModelPackError(f"{where} stats {unknown} unknown (known: {', '.join(STATS)})")
    if n_names != channels:
        raise ModelPackError(f"{where} needs input.channels to name all {channels} channels")
    features = len(names)
    if len(ref.edges) != features or len(ref.proportions) != features:
        raise ModelPackError(f"{where} edges and proportions need {features} rows ({names})")
    for name, edges, shares in zip(names, ref.edges, ref.proportions, strict=True):
        if len(shares) != len(edges) + 1 or any(b < a for a, b in itertools.pairwise(edges)):
            raise ModelPackError(
                f"{where} {name}: needs ascending edges and one more proportion than edges"
            )
    if len(ref.confidence_proportions) != len(ref.confidence_edges) + 1:
        raise ModelPackError(f"{where} confidence_proportions needs one more entry than edges")
