"""ONNX Runtime backend, tuned for single-reading latency on a small CPU.

Defaults: one intra-op thread, spinning off (an idle agent must not burn a
core), sequential execution, full graph optimisation. The graph takes the raw
window and returns calibrated probabilities (and, when the pack provides them,
an out-of-distribution score and the raw-value guard); names come from the
manifest.

One reading at a time is the latency path (``score_one``): the window is copied
into an input buffer bound once with the output buffers (ONNX Runtime's I/O
binding), which saves the ~8 us per call that ``InferenceSession.run`` spends
building its input and output lists (AMD EPYC, docs/BENCHMARKS.md), and the
outputs come back as Python numbers. Batches go through ``run``; their cost is
in the model.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from edge_agent.errors import ModelLoadError
from edge_agent.models.pack import ModelPack
from edge_agent.scoring.backends.base import BackendOptions, BackendOutput, FloatArray, OneOutput

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


def _bound_run(session: ort.InferenceSession, binding: ort.IOBinding) -> Callable[[], None]:
    """A call that runs ``session`` on ``binding``'s buffers. The public
    ``run_with_iobinding`` first checks, in Python, for a captured GPU graph, which a CPU
    session never has: about 3 us of a ~45 us single-window run here (AMD EPYC). Where the
    binding's compiled objects are reachable (ONNX Runtime 1.x), they are called directly;
    otherwise the public method."""
    c_session, c_binding = getattr(session, "_sess", None), getattr(binding, "_iobinding", None)
    run = getattr(c_session, "run_with_iobinding", None)
    if run is not None and c_binding is not None:
        return functools.partial(run, c_binding, None)
    return functools.partial(session.run_with_iobinding, binding)


def _not_loaded() -> None:
    raise ModelLoadError("the ONNX backend was used before load() or after close()")


class OnnxBackend:
    name = "onnx"

    def __init__(self) -> None:
        self._session: ort.InferenceSession | None = None
        self._input = ""
        self._outputs: list[str] = []
        self._has_ood = False
        self._has_guard = False
        # The single-reading path: an I/O binding with its input and output buffers bound
        # once. One thread at a time uses it (the lock is only tried); another thread
        # meanwhile takes ``run``.
        self._binding: ort.IOBinding | None = None
        self._one_in: FloatArray = np.zeros((0,), dtype=np.float32)
        self._one_row: FloatArray = self._one_in
        self._one_probs: FloatArray = self._one_in
        self._single: list[FloatArray] = []
        self._single_lock = threading.Lock()
        self._run_one: Callable[[], None] = _not_loaded

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
        wanted = [m.outputs.probs] + [o for o in (m.outputs.feature_z, m.outputs.guard) if o]
        missing = [w for w in wanted if w not in available]
        if missing:
            raise ModelLoadError(
                f"{path}: outputs {missing} not in the model ({sorted(available)})"
            )
        self._session = session
        self._input = m.input.name
        self._outputs = wanted
        self._has_ood = bool(m.outputs.feature_z)
        self._has_guard = bool(m.outputs.guard)
        self._bind_single(session, len(m.labels), m.input.shape)
        # Warm-up: one dummy run each way, checked, so the first real reading pays no
        # first-run cost.
        zeros = np.zeros(tuple(m.input.shape), dtype=np.float32)
        self.score_one(zeros)
        out = self.score(zeros)
        if out.probs.shape != (1, len(m.labels)):
            raise ModelLoadError(
                f"{path}: warm-up returned probabilities of shape {out.probs.shape},"
                f" expected (1, {len(m.labels)})"
            )
        log.debug("loaded %s with %d intra-op threads", pack.ref, options.intra_op_threads)

    def score(self, window: FloatArray) -> BackendOutput:
        return self.score_batch(window[np.newaxis])

    def _bind_single(self, session: ort.InferenceSession, labels: int, shape: list[int]) -> None:
        """Input and output buffers for one window, bound once."""
        self._one_in = np.zeros((1, *shape), dtype=np.float32)
        self._one_row = self._one_in[0]
        shapes = [(1, labels)] + [(1,)] * (len(self._outputs) - 1)
        self._single = [np.zeros(shape, dtype=np.float32) for shape in shapes]
        self._one_probs = self._single[0][0]
        binding = session.io_binding()
        binding.bind_ortvalue_input(self._input, ort.OrtValue.ortvalue_from_numpy(self._one_in))
        for name, buf in zip(self._outputs, self._single, strict=True):
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buf))
        self._binding = binding
        self._run_one = _bound_run(session, binding)

    def score_one(self, window: FloatArray) -> OneOutput | None:
        """One window through the bound buffers, the outputs as Python numbers: the latency
        path. None when another thread is using the buffers (the caller takes
        ``score_batch``)."""
        binding = self._binding
        if binding is None or self._session is None:
            raise ModelLoadError("the ONNX backend was used before load() or after close()")
        if not self._single_lock.acquire(blocking=False):
            return None
        try:
            np.copyto(self._one_row, window)
            self._run_one()
            out = self._single
            return (
                self._one_probs.tolist(),
                out[1].item() if self._has_ood else None,
                out[-1].item() if self._has_guard else None,
            )
        except Exception as exc:  # ORT raises its own untyped errors
            raise ModelLoadError(f"ONNX Runtime failed to score: {exc}") from exc
        finally:
            self._single_lock.release()

    def score_batch(self, windows: FloatArray) -> BackendOutput:
        session = self._session
        if session is None:
            raise ModelLoadError("the ONNX backend was used before load() or after close()")
        try:
            results = session.run(self._outputs, {self._input: windows})
        except Exception as exc:  # ORT raises its own untyped errors
            raise ModelLoadError(f"ONNX Runtime failed to score: {exc}") from exc
        return BackendOutput(
            probs=results[0],
            ood_score=results[1] if self._has_ood else None,
            guard=results[-1] if self._has_guard else None,
        )

    def close(self) -> None:
        self._session = None
        self._binding = None
        self._run_one = _not_loaded
