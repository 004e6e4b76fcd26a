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
    return {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(arr, qs), strict=True)}


def percentile(values: Iterable[float] | npt.NDArray[Any], q: float) -> float | None:
    """One percentile of ``values``; None when there are no samples."""
    return percentiles(values, (q,))[f"p{q:g}"]
