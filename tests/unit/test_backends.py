from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import BackendUnavailable, ModelIntegrityError
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import open_pack
from edge_agent.scoring import backends
from edge_agent.scoring.scorer import Scorer


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailable, match="unknown backend 'tensorflow'"):
        backends.create("tensorflow")


def test_registry_imports_lazily() -> None:
    assert set(backends.REGISTRY) >= {"onnx", "fake"}
    for target in backends.REGISTRY.values():
        module, _, cls = target.partition(":")
        assert module.startswith("edge_agent.scoring.backends.")
        assert cls


def test_fake_backend_routes_by_confidence(fake_pack: Path) -> None:
    scorer = Scorer.open(open_pack(fake_pack))
    confident = np.zeros((2, 4), dtype=np.float32)
    confident[0, :2] = [1, 0.95]
    unsure = np.zeros((2, 4), dtype=np.float32)
    unsure[0, :2] = [2, 0.5]
    d1, d2 = scorer.score([Reading(confident, id=1), Reading(unsure, id=2)])
    assert (d1.label, d1.route, d1.reason) == ("b", "local", None)
    assert d1.confidence == pytest.approx(0.95)
    assert (d2.label, d2.route, d2.reason) == ("c", "hard", "low_confidence")
    assert d1.model == "fake-pack@0.0.1"
    assert d1.latency_ms >= 0


def test_scorer_refuses_a_tampered_pack(fake_pack: Path) -> None:
    (fake_pack / "weights.bin").write_bytes(b"fake weightz\n")
    with pytest.raises(ModelIntegrityError, match=r"weights\.bin"):
        Scorer.open(open_pack(fake_pack))


def test_the_bound_single_run_equals_the_public_one_and_falls_back_without_internals() -> None:
    """``score_one`` calls the session's compiled run on the bound buffers where it can reach
    it; a session without those internals takes the public method. Both give ``run``'s
    probabilities (the same graph on the same input: bit for bit)."""
    from edge_agent.devtools.measure import load_lines, windows_of  # noqa: PLC0415
    from edge_agent.models.pack import BUNDLED_TEST_DATA, resolve  # noqa: PLC0415
    from edge_agent.scoring.backends import onnx  # noqa: PLC0415

    scorer = Scorer.open(resolve("basicmotions-int8"))
    backend = scorer.backend
    assert isinstance(backend, onnx.OnnxBackend)
    x = windows_of(load_lines(BUNDLED_TEST_DATA))[:8]
    want = [backend.score_batch(w[np.newaxis]).probs[0] for w in x]  # one window a run
    direct = [backend.score_one(w) for w in x]

    class Public:  # the session as its public methods alone show it
        def __init__(self, session: object) -> None:
            self.run_with_iobinding = session.run_with_iobinding  # type: ignore[attr-defined]

    assert backend._binding is not None
    assert backend._session is not None
    backend._run_one = onnx._bound_run(Public(backend._session), backend._binding)  # type: ignore[arg-type]
    public = [backend.score_one(w) for w in x]
    scorer.close()
    for row, d, p in zip(want, direct, public, strict=True):
        assert d is not None
        assert p is not None
        assert d[0] == row.tolist() == p[0]
