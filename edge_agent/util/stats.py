"""Percentiles of latency samples: one definition for the agent, rollout, bench and demo."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

#: The percentiles the runtime reports.
REPORTED = (50, 95, 99)


def percentiles(values: Iterable[float], qs: Sequence[float] = REPORTED) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` of ``values`` (linear interpolation, numpy's
    default); every value None when there are no samples."""
    # An array is taken as it is: iterating one element by element (np.fromiter) would hold
    # the GIL for the whole window, stalling the scoring thread while telemetry runs.
    arr = (
        np.asarray(values, dtype=np.float64)
        if isinstance(values, np.ndarray)
        else np.fromiter(values, dtype=np.float64)
    )
    if arr.size == 0:
        return {f"p{q:g}": None for q in qs}
    return {f"p{q:g}": v for q, v in zip(qs, _linear(arr, qs), strict=True)}


def _linear(arr: npt.NDArray[np.float64], qs: Sequence[float]) -> list[float]:
    """``np.percentile(arr, qs)`` (linear interpolation, and numpy's formula for it) from one
    partial sort: a third of ``np.percentile``'s time on the 10,000 latencies of a telemetry
    snapshot, which the telemetry thread takes while scoring goes on."""
    last = arr.size - 1
    where = [last * q / 100.0 for q in qs]
    below = [min(int(np.floor(w)), last) for w in where]
    above = [min(b + 1, last) for b in below]
    part = np.partition(arr, sorted(set(below + above)))
    out = []
    for w, b, a in zip(where, below, above, strict=True):
        lo, hi, t = float(part[b]), float(part[a]), w - b
        diff = hi - lo
        out.append(hi - diff * (1.0 - t) if t >= 0.5 else lo + diff * t)
    return out


def percentile(values: Iterable[float] | npt.NDArray[Any], q: float) -> float | None:
    """One percentile of ``values``; None when there are no samples."""
    return percentiles(values, (q,))[f"p{q:g}"]
