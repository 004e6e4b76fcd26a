"""The Backend protocol: the one interface every model runtime implements.

A backend is created empty, then ``load``-ed with a verified model pack; it
warms itself up (one dummy run) before ``load`` returns, so the first real
reading pays no first-run cost. ``score`` takes one window shaped as the
manifest's input, ``score_batch`` a stack of them; both return calibrated
class probabilities and, where the model provides one, an out-of-distribution
score per window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from edge_agent.config import ModelSettings
from edge_agent.ingest.readings import FloatArray
from edge_agent.models.pack import ModelPack

__all__ = ["Backend", "BackendOptions", "BackendOutput", "FloatArray"]


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """Runtime knobs a backend may use (from the ``[model]`` config section)."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1

    @classmethod
    def of(cls, model: ModelSettings) -> BackendOptions:
        """The options the ``[model]`` section asks for."""
        return cls(intra_op_threads=model.intra_op_threads, inter_op_threads=model.inter_op_threads)


@dataclass(frozen=True, slots=True)
class BackendOutput:
    """What a backend returns for N windows."""

    probs: FloatArray  #: [N, labels] calibrated probabilities, rows sum to 1
    ood_score: FloatArray | None = None  #: [N] model-side OOD score (larger = stranger)
    #: [N] the raw-value guard computed by the model itself (0 nothing wrong, 1 saturated,
    #: 2 out_of_range, 3 dead_sensor); None: the scorer checks the pack's ``[ood]`` table.
    guard: FloatArray | None = None


@runtime_checkable
class Backend(Protocol):
    """One model runtime. Implementations live one per module in this package."""

    name: str

    def load(self, pack: ModelPack, options: BackendOptions) -> None:
        """Load the (verified) pack's model and warm it up; raise ModelLoadError on failure."""

    def score(self, window: FloatArray) -> BackendOutput:
        """Score one window shaped as the manifest's input (output has N = 1)."""

    def score_batch(self, windows: FloatArray) -> BackendOutput:
        """Score a stack of windows, shape [N, *input shape]. The arrays returned may be the
        backend's own output buffers: read them before the next call."""

    def close(self) -> None:
        """Release the runtime's resources; the backend may not be used afterwards."""
