"""ONNX Runtime backend, tuned for single-reading latency on a small CPU.

Defaults: one intra-op thread, spinning off (an idle agent must not burn a
core), sequential execution, full graph optimisation. The graph takes the raw
window and returns calibrated probabilities (and, when the pack provides it,
an out-of-distribution score); names come from the manifest.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from edge_agent.errors import ModelLoadError
from edge_agent.models.pack import ModelPack
from edge_agent.scoring.backends.base import BackendOptions, BackendOutput, FloatArray

log = logging.getLogger(__name__)


def open_session(
    path: str | os.PathLike[str], options: BackendOptions | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with the runtime's options (the module docstring); the
    benchmark's floor and the training script use it too, so all measure the same thing.
    ORT's own errors propagate."""
    options = options or BackendOptions()
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class OnnxBackend:
    name = "onnx"

    def __init__(self) -> None:
        self._session: ort.InferenceSession | None = None
        self._input = ""
        self._outputs: list[str] = []
        self._has_ood = False

    def load(self, pack: ModelPack, options: BackendOptions) -> None:
        m = pack.manifest
        if m.outputs is None:
            raise ModelLoadError(f"{pack.path}: an onnx pack needs an [outputs] table")
        model_files = [f.path for f in m.files if f.path.endswith(".onnx")]
        if len(model_files) != 1:
            raise ModelLoadError(f"{pack.path}: expected exactly one .onnx file in the manifest")
        path = pack.file(model_files[0])
        try:
            session = open_session(path, options)
        except Exception as exc:  # ORT raises its own untyped errors
            raise ModelLoadError(f"{path}: ONNX Runtime refused the model: {exc}") from exc
        inputs = {i.name for i in session.get_inputs()}
        if m.input.name not in inputs:
            raise ModelLoadError(f"{path}: no input named {m.input.name!r} (has {sorted(inputs)})")
        available = {o.name for o in session.get_outputs()}
        wanted = [m.outputs.probs] + ([m.outputs.feature_z] if m.outputs.feature_z else [])
        missing = [w for w in wanted if w not in available]
        if missing:
            raise ModelLoadError(
                f"{path}: outputs {missing} not in the model ({sorted(available)})"
            )
        self._session = session
        self._input = m.input.name
        self._outputs = wanted
        self._has_ood = bool(m.outputs.feature_z)
        # Warm-up: one dummy run, checked, so the first real reading pays no first-run cost.
        out = self.score(np.zeros(tuple(m.input.shape), dtype=np.float32))
        if out.probs.shape != (1, len(m.labels)):
            raise ModelLoadError(
                f"{path}: warm-up returned probabilities of shape {out.probs.shape},"
                f" expected (1, {len(m.labels)})"
            )
        log.debug("loaded %s with %d intra-op threads", pack.ref, options.intra_op_threads)

    def score(self, window: FloatArray) -> BackendOutput:
        return self.score_batch(window[np.newaxis])

    def score_batch(self, windows: FloatArray) -> BackendOutput:
        session = self._session
        if session is None:
            raise ModelLoadError("the ONNX backend was used before load() or after close()")
        try:
            results = session.run(self._outputs, {self._input: windows})
        except Exception as exc:  # ORT raises its own untyped errors
            raise ModelLoadError(f"ONNX Runtime failed to score: {exc}") from exc
        return BackendOutput(probs=results[0], ood_score=results[1] if self._has_ood else None)

    def close(self) -> None:
        self._session = None
