"""A deterministic backend for tests of everything downstream of scoring.

It needs no model file, so the router, outbox, link and agent can be tested
without ONNX Runtime: like an HTTP client's mock transport, it is a real
implementation of the protocol whose answers the caller controls. The first
value of the window picks the label index (modulo the number of labels), the
second is the confidence given to that label (clipped to [1/labels, 1]); the
rest share what is left. Never used unless a pack names ``backend = "fake"``.
"""

from __future__ import annotations

import numpy as np

from edge_agent.errors import ModelLoadError
from edge_agent.models.pack import ModelPack
from edge_agent.scoring.backends.base import BackendOptions, BackendOutput, FloatArray


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self._labels = 0
        self.calls = 0

    def load(self, pack: ModelPack, options: BackendOptions) -> None:
        if len(pack.manifest.labels) < 2:
            raise ModelLoadError(f"{pack.path}: the fake backend needs at least two labels")
        self._labels = len(pack.manifest.labels)

    def score(self, window: FloatArray) -> BackendOutput:
        return self.score_batch(window[np.newaxis])

    def score_batch(self, windows: FloatArray) -> BackendOutput:
        if self._labels == 0:
            raise ModelLoadError("the fake backend was used before load()")
        self.calls += 1
        n, k = windows.shape[0], self._labels
        flat = windows.reshape(n, -1)
        idx = np.abs(flat[:, 0]).astype(np.int64) % k
        conf = np.clip(flat[:, 1], 1.0 / k, 1.0).astype(np.float32)
        probs = np.repeat(((1.0 - conf) / (k - 1))[:, None], k, axis=1).astype(np.float32)
        probs[np.arange(n), idx] = conf
        return BackendOutput(probs=probs, ood_score=None)

    def close(self) -> None:
        self._labels = 0
