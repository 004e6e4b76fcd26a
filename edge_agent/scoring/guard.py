"""The out-of-distribution guard: raw windows checked against the pack's ``[ood]`` table.

A window unlike anything the model was trained on is never trusted locally, whatever the
classifier says: a dead (constant) channel, values far outside the training range, or a
channel clipped at its extreme for much of the window. Two implementations decide alike:

* inside the model's graph, for ONNX packs whose manifest names an ``[outputs] guard``
  (``scripts/graph_guard.py`` adds it): one ``session.run`` returns the probabilities and
  the guard, next to the per-channel reductions the model makes anyway;
* ``OodCheck``, with numpy, for packs and backends without it (llama.cpp).

``check_graph_guard`` runs at load: probe windows built from the ``[ood]`` table go through
both, and a pack whose graph decides otherwise than its manifest is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent.models.pack import ModelPack, OodGuard
from edge_agent.scoring.backends.base import FloatArray

#: The graph guard's values and the reasons they stand for (0: nothing wrong). Where several
#: apply the higher wins: the order ``OodCheck`` checks them in.
GRAPH_CODES: dict[int, str] = {3: "dead_sensor", 2: "out_of_range", 1: "saturated"}


class OodCheck:
    """Vectorised checks of raw windows against the pack's training statistics (numpy)."""

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


def graph_reasons(codes: list[float]) -> list[str | None]:
    """The reasons of the graph guard's values (one per window)."""
    return [GRAPH_CODES.get(int(c)) for c in codes]


def probe_windows(ood: OodGuard, shape: tuple[int, ...]) -> FloatArray:
    """Windows on both sides of each limit of the ``[ood]`` table, on each channel, built from
    the table alone: a smooth in-range signal, then one channel at a time constant or barely
    moving, just past or just inside the range margin (above and below), clipped at its
    maximum or minimum for more or fewer samples than the saturation limit."""
    channels, samples = shape
    lo = np.asarray(ood.channel_min, dtype=np.float64)[:, None]
    hi = np.asarray(ood.channel_max, dtype=np.float64)[:, None]
    mid, half, span = (lo + hi) / 2, (hi - lo) / 2, hi - lo
    t = np.arange(samples)[None, :]
    phase = 2 * np.pi * t / samples * np.arange(1, channels + 1)[:, None]
    base = mid + 0.4 * half * np.sin(phase)
    m = ood.range_margin
    limit = ood.saturation_fraction * samples
    clips = [n for n in (int(limit * 1.5) + 1, int(limit * 0.5)) if 0 < n <= samples]
    windows = [base, 0.9 * base + 0.1 * mid]
    for c in range(channels):
        edits: list[tuple[Any, Any]] = [
            (c, np.full(samples, mid[c, 0])),
            (c, mid[c, 0] + 3 * ood.dead_channel_std * np.sqrt(2) * np.sin(phase[0])),
            ((c, samples // 2), hi[c, 0] + (1.1 * m + 0.01) * span[c, 0]),
            ((c, samples // 2), hi[c, 0] + 0.9 * m * span[c, 0]),
            ((c, samples // 3), lo[c, 0] - (1.1 * m + 0.01) * span[c, 0]),
            ((c, samples // 3), lo[c, 0] - 0.9 * m * span[c, 0]),
        ]
        for n in clips:
            edits += [((c, slice(0, n)), base[c].max()), ((c, slice(0, n)), base[c].min())]
        for where, value in edits:
            w = base.copy()
            w[where] = value
            windows.append(w)
    return np.stack(windows).astype(np.float32)
