"""The bundled BasicMotions packs, scored through the real ONNX Runtime backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import resolve
from edge_agent.scoring.scorer import Decision, Scorer
from tests.conftest import ONNX_CROSS_BUILD_TOLERANCE, TEST_JSONL, assert_accuracy_within

pytestmark = pytest.mark.integration


def load_split() -> tuple[list[np.ndarray], list[str]]:
    windows, labels = [], []
    for raw in TEST_JSONL.read_text().splitlines():
        obj = json.loads(raw)
        windows.append(np.asarray(obj["values"], dtype=np.float32))
        labels.append(obj["label"])
    return windows, labels


@pytest.fixture(scope="module")
def split() -> tuple[list[np.ndarray], list[str]]:
    return load_split()


@pytest.fixture(scope="module", params=["basicmotions-int8", "basicmotions-fp32"])
def scorer(request: pytest.FixtureRequest) -> Scorer:
    return Scorer.open(resolve(request.param))


def score_all(scorer: Scorer, windows: list[np.ndarray]) -> list[Decision]:
    return scorer.score([Reading(w.copy(), id=i) for i, w in enumerate(windows)])


def test_accuracy_reproduces_the_manifest(scorer: Scorer, split: tuple) -> None:
    windows, labels = split
    decisions = score_all(scorer, windows)
    assert len(decisions) == scorer.pack.manifest.metrics["test_windows"] == 40
    expected = scorer.pack.manifest.metrics["accuracy_test"]
    assert isinstance(expected, float)
    assert_accuracy_within(
        [d.label for d in decisions],
        [d.confidence for d in decisions],
        labels,
        expected,
        ONNX_CROSS_BUILD_TOLERANCE,
    )


def test_clean_windows_never_trip_the_raw_guard(scorer: Scorer, split: tuple) -> None:
    for d in score_all(scorer, split[0]):
        assert d.reason in (None, "low_confidence", "feature_outlier")


def test_single_and_batched_scoring_agree(scorer: Scorer, split: tuple) -> None:
    windows = split[0][:8]
    batched = score_all(scorer, windows)
    # Dynamic int8 quantization scales activations per call, so a window's probabilities move
    # slightly with the batch it is scored in; fp32 agrees to float precision.
    tolerance = 1e-2 if scorer.pack.manifest.metrics.get("quantization") == "dynamic" else 1e-5
    for w, b in zip(windows, batched, strict=True):
        (single,) = scorer.score([Reading(w.copy())])
        assert single.label == b.label
        assert single.confidence == pytest.approx(b.confidence, abs=tolerance)


def test_probabilities_are_calibrated_as_recorded(scorer: Scorer, split: tuple) -> None:
    windows, labels = split
    decisions = score_all(scorer, windows)
    conf = np.array([d.confidence for d in decisions])
    correct = np.array([d.label == y for d, y in zip(decisions, labels, strict=True)], dtype=float)
    bins = np.minimum((conf * 10).astype(int), 9)
    ece = sum(
        abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
        for b in range(10)
        if (bins == b).any()
    )
    calibration = scorer.pack.manifest.calibration
    assert calibration is not None
    assert calibration.method == "temperature"
    assert calibration.ece_after_test is not None
    assert ece == pytest.approx(calibration.ece_after_test, abs=0.02)
    assert ((conf > 0) & (conf <= 1)).all()


@pytest.mark.parametrize("channel", range(6))
def test_dead_sensor_is_routed_hard(scorer: Scorer, split: tuple, channel: int) -> None:
    w = split[0][channel * 5].copy()
    w[channel, :] = w[channel, 0]
    (d,) = scorer.score([Reading(w)])
    assert (d.route, d.reason) == ("hard", "dead_sensor")


@pytest.mark.parametrize("factor", [20.0, -50.0])
def test_out_of_range_is_routed_hard(scorer: Scorer, split: tuple, factor: float) -> None:
    w = split[0][3].copy()
    w[1, 40:60] = factor * (np.abs(w[1]).max() + 1.0)
    (d,) = scorer.score([Reading(w)])
    assert (d.route, d.reason) == ("hard", "out_of_range")


def test_saturated_channel_is_routed_hard(scorer: Scorer, split: tuple) -> None:
    w = split[0][12].copy()
    ceiling = np.quantile(w[0], 0.6)
    w[0] = np.minimum(w[0], ceiling)
    (d,) = scorer.score([Reading(w)])
    assert (d.route, d.reason) == ("hard", "saturated")


@pytest.mark.parametrize("level", [0.5, 1.0, 2.0])
def test_noisy_windows_are_right_or_hard(scorer: Scorer, split: tuple, level: float) -> None:
    windows, labels = split
    rng = np.random.default_rng(1234)
    noisy = [
        (w + rng.normal(size=w.shape) * level * w.std(axis=1, keepdims=True)).astype(np.float32)
        for w in windows
    ]
    wrong_but_local = [
        (i, d.label, y, round(d.confidence, 3))
        for i, (d, y) in enumerate(zip(score_all(scorer, noisy), labels, strict=True))
        if d.route == "local" and d.label != y
    ]
    assert wrong_but_local == []
