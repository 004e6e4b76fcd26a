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
    """``np.percentile(arr, qs)`` (linear interpolation, and numpy's formula for it) from
    partial sorts: a fifth of ``np.percentile``'s time on the 10,000 latencies of a telemetry
    snapshot, which the telemetry thread takes while scoring goes on."""
    last = arr.size - 1
    where = [last * q / 100.0 for q in qs]
    below = [min(int(np.floor(w)), last) for w in where]
    above = [min(b + 1, last) for b in below]
    # One partition per needed rank, each on what lies above the rank before it: numpy's
    # partition with several ranks at once costs several times as much (AMD EPYC: ~180 us
    # for six ranks of 10,000 values, ~20 us for one; np.percentile ~270 us), and every
    # rank after the first works on a shrinking tail.
    part = np.array(arr, dtype=np.float64, copy=True)
    start = 0
    for k in sorted(set(below + above)):
        part[start:].partition(k - start)
        start = k + 1  # part[k] is in place; everything after it is no smaller
    out = []
    for w, b, a in zip(where, below, above, strict=True):
        lo, hi, t = float(part[b]), float(part[a]), w - b
        diff = hi - lo
        out.append(hi - diff * (1.0 - t) if t >= 0.5 else lo + diff * t)
    return out


def percentile(values: Iterable[float] | npt.NDArray[Any], q: float) -> float | None:
    """One percentile of ``values``; None when there are no samples."""
    return percentiles(values, (q,))[f"p{q:g}"]
