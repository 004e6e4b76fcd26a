"""Drift monitoring: PSI math, binning, the ring window and the flag, on the real default pack."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import msgspec
import numpy as np
import pytest

from edge_agent.config import DriftSettings, load_settings
from edge_agent.errors import ModelPackError
from edge_agent.ingest.sources.replay import ReplaySource
from edge_agent.models.pack import DriftReference, ModelPack, open_pack
from edge_agent.scoring.drift import (
    DriftMonitor,
    bin_shares,
    confidence_labels,
    psi,
    reference_from_windows,
    window_features,
)
from edge_agent.service.metrics import agent_metrics, decision_histogram, round_trip_histogram
from tests.conftest import MODELS, TEST_JSONL, TRAIN_JSONL

#: acc_z's standard deviation over the train split (data/basicmotions/README.md).
ACC_Z_STD = 3.546


def _windows(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    return np.asarray([json.loads(line)["values"] for line in lines], dtype=np.float32)


@pytest.fixture(scope="module")
def pack() -> ModelPack:
    return open_pack(MODELS / "basicmotions-int8")


def test_psi_is_zero_for_equal_shares_and_matches_the_formula() -> None:
    ref = np.array([[0.25, 0.25, 0.25, 0.25]])
    assert psi(ref, ref, 1e-3)[0] == 0.0
    obs = np.array([[0.1, 0.2, 0.3, 0.4]])
    expected = sum((o - r) * math.log(o / r) for o, r in zip(obs[0], ref[0], strict=True))
    assert psi(obs, ref, 1e-3)[0] == pytest.approx(expected)
    assert expected > 0


def test_psi_floors_empty_bins_at_epsilon() -> None:
    ref = np.array([[0.5, 0.5, 0.0]])
    obs = np.array([[0.0, 0.5, 0.5]])
    value = psi(obs, ref, 1e-3)[0]
    assert math.isfinite(value)
    assert value == pytest.approx(2 * (0.5 - 1e-3) * math.log(0.5 / 1e-3))
    assert psi(obs, ref, 1e-2)[0] < value  # a larger epsilon caps an empty bin's weight lower


def test_bin_shares_put_a_value_on_an_edge_into_the_upper_bin() -> None:
    edges = np.array([[0.0, 1.0], [10.0, 20.0]])
    values = np.array([[-1.0, 10.0], [0.0, 15.0], [1.0, 25.0], [2.0, 9.0]])
    shares = bin_shares(values, edges)
    assert shares.tolist() == [[0.25, 0.25, 0.5], [0.25, 0.5, 0.25]]
    assert shares.sum(axis=1).tolist() == [1.0, 1.0]


def test_window_features_are_per_channel_mean_then_std() -> None:
    x = np.array([[[1.0, 3.0], [2.0, 2.0]]], dtype=np.float32)  # 1 window, 2 channels, 2 samples
    assert window_features(x, ["mean", "std"]).tolist() == [[2.0, 2.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="median"):
        window_features(x, ["median"])


def test_reference_bins_are_quantiles_of_the_training_windows() -> None:
    x = _windows(TRAIN_JSONL)
    edges, shares = reference_from_windows(x, ["mean", "std"], 6)
    assert edges.shape == (12, 5)
    assert (np.diff(edges, axis=1) > 0).all()
    assert np.allclose(shares.sum(axis=1), 1.0)
    assert shares.min() >= 6 / 40
    assert shares.max() <= 7 / 40


def test_confidence_bucket_names() -> None:
    assert confidence_labels([0.5, 0.9]) == ["0.00-0.50", "0.50-0.90", "0.90-1.00"]


def test_bundled_pack_reference_matches_the_training_split(pack: ModelPack) -> None:
    ref = pack.manifest.drift
    assert ref is not None
    edges, shares = reference_from_windows(_windows(TRAIN_JSONL), ref.stats, len(ref.edges[0]) + 1)
    assert np.allclose(edges, ref.edges)
    assert np.allclose(shares, ref.proportions)
    assert ref.windows == 40
    assert sum(ref.confidence_proportions) == pytest.approx(1.0)


def _monitor(pack: ModelPack, **kw: float | int | bool) -> DriftMonitor:
    return DriftMonitor(pack, DriftSettings(**kw))  # type: ignore[arg-type]


def test_nothing_is_computed_until_the_window_is_full(pack: ModelPack) -> None:
    mon = _monitor(pack, window=50)
    x = _windows(TEST_JSONL)
    for w in x:
        mon.record(w, 0.99, False)
    snap = mon.snapshot()
    assert snap["state"] == "warming_up"
    assert snap["readings"] == 40
    assert snap["psi_max"] is None
    assert snap["flag"] is False


def test_clean_test_replay_does_not_flag_and_a_shifted_channel_does(
    pack: ModelPack, caplog: pytest.LogCaptureFixture
) -> None:
    window = DriftSettings().window
    mon = _monitor(pack)
    x = _windows(TEST_JSONL)
    clean = np.tile(x, (window // len(x) + 1, 1, 1))
    for w in clean[:window]:
        mon.record(w, 0.99, False)
    snap = mon.snapshot()
    assert snap["state"] == "ok"
    assert snap["flag"] is False
    assert 0 < snap["psi_max"] < snap["psi_threshold"]
    assert set(snap["psi"]) == {
        f"{c}_{s}" for s in ("mean", "std") for c in pack.manifest.input.channels
    }
    assert snap["confidence"]["0.99-1.00"] == 1.0
    assert snap["hard_rate"] == 0.0
    # acc_z is the channel whose offset is the hardest to see (docs/drift.md): +0.25 x its std.
    shifted = clean.copy()
    shifted[:, 2] += 0.25 * ACC_Z_STD
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring.drift"):
        flagged_at = None
        for i, w in enumerate(shifted[:window]):
            mon.record(w, 0.99, False)
            if mon.snapshot()["flag"] and flagged_at is None:
                flagged_at = i + 1
        assert flagged_at is not None
        assert flagged_at <= window
        snap = mon.snapshot()
        assert snap["state"] == "drift"
        assert snap["psi_max_feature"] == "acc_z_mean"
        assert snap["features_over"] == ["acc_z_mean"]
        assert snap["reasons"] == ["feature_psi"]
        assert snap["flags_raised"] == 1
        # back to a healthy sensor: the flag clears once the window is clean again
        for w in clean[:window]:
            mon.record(w, 0.99, False)
        snap = mon.snapshot()
        mon.snapshot()
    assert snap["flag"] is False
    assert snap["state"] == "ok"
    messages = [r.getMessage() for r in caplog.records if r.name == "edge_agent.scoring.drift"]
    assert len(messages) == 2, messages  # one when it rose, one when it cleared
    assert "acc_z_mean" in messages[0]
    assert messages[1].startswith("drift cleared")


def test_hard_rate_flag_is_opt_in(pack: ModelPack) -> None:
    x = _windows(TEST_JSONL)
    for excess, flag in ((0.0, False), (0.5, True)):
        mon = _monitor(pack, window=40, hard_rate_excess=excess)
        for w in x:
            mon.record(w, 0.6, True)
        snap = mon.snapshot()
        assert snap["hard_rate"] == 1.0
        assert snap["flag"] is flag
        assert snap["confidence"]["0.50-0.70"] == 1.0
        assert snap["confidence_psi"] > 1


def test_pack_without_reference_or_disabled_is_off(pack: ModelPack, fake_pack: Path) -> None:
    fake = open_pack(fake_pack)
    mon = DriftMonitor(fake, DriftSettings())
    mon.record(np.zeros((2, 4), dtype=np.float32), 0.9, False)
    snap = mon.snapshot()
    assert snap["state"] == "off"
    assert not mon.enabled
    assert "no [drift] reference" in snap["reason"]
    off = _monitor(pack, enabled=False).snapshot()
    assert off["state"] == "off"
    assert "drift.enabled" in off["reason"]


def test_inconsistent_reference_or_settings_are_refused(pack: ModelPack) -> None:
    ref = pack.manifest.drift
    assert ref is not None
    short = msgspec.structs.replace(ref, edges=ref.edges[:3])
    bad = ModelPack(pack.path, msgspec.structs.replace(pack.manifest, drift=short))
    with pytest.raises(ModelPackError, match="12 rows"):
        DriftMonitor(bad, DriftSettings())
    unknown = msgspec.structs.replace(ref, stats=["mean", "kurtosis"])
    bad = ModelPack(pack.path, msgspec.structs.replace(pack.manifest, drift=unknown))
    with pytest.raises(ModelPackError, match="kurtosis"):
        DriftMonitor(bad, DriftSettings())
    with pytest.raises(ModelPackError, match="psi_clear"):
        _monitor(pack, psi_threshold=0.3, psi_clear=0.5)
    assert isinstance(ref, DriftReference)


def test_drift_section_in_prometheus_text() -> None:
    text = agent_metrics(
        {
            "readings": 3,
            "rejects": {"malformed_json": 1},
            "drift": {
                "enabled": True,
                "state": "ok",
                "flag": False,
                "flags_raised": 2,
                "psi_max": 0.2,
                "psi_max_feature": "acc_x_mean",
                "features_over": [],
                "psi": {"acc_x_mean": 0.2},
                "confidence": {"0.99-1.00": 1.0},
            },
        },
        "dev1",
        decision_histogram().data(),
        round_trip_histogram().data(),
    )
    lines = set(text.splitlines())
    assert {
        "edge_agent_readings_total 3",
        'edge_agent_readings_rejected_total{reason="malformed_json"} 1',
        "# TYPE edge_agent_drift_flag gauge",
        "edge_agent_drift_enabled 1",
        "edge_agent_drift_flag 0",
        "edge_agent_drift_flags_raised_total 2",
        "edge_agent_drift_psi_max 0.2",
        'edge_agent_drift_psi{feature="acc_x_mean"} 0.2',
        'edge_agent_drift_confidence_share{bucket="0.99-1.00"} 1.0',
    } <= lines
    assert not any("state" in line or "acc_x_mean" in line.split("{")[0] for line in lines)


def test_drift_settings_from_file_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[drift]\nwindow = 400\npsi_threshold = 0.8\n")
    s = load_settings(
        cfg, env={"EDGE_AGENT_DRIFT_ENABLED": "false", "EDGE_AGENT_SOURCE_SHIFT_CHANNEL": "2"}
    )
    assert (s.drift.window, s.drift.psi_threshold, s.drift.enabled) == (400, 0.8, False)
    assert s.source.shift_channel == 2
    assert load_settings(None, env={}).drift == DriftSettings()


def test_replay_shift_applies_to_one_channel_from_the_onset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(json.dumps({"id": i, "values": [[1.0, 2.0], [3.0, 4.0]]}) for i in range(4))
    )
    src = ReplaySource(
        str(path), 4096, rate_hz=0, loops=1, noise=0, seed=0, batch=8,
        shift_channel=1, shift_offset=0.5, shift_gain=2.0, shift_after=2,
    )  # fmt: skip
    lines = [json.loads(item) for group in src.groups() for item in group]  # type: ignore[arg-type]
    assert [line["values"] for line in lines] == [
        [[1.0, 2.0], [3.0, 4.0]],
        [[1.0, 2.0], [3.0, 4.0]],
        [[1.0, 2.0], [6.5, 8.5]],
        [[1.0, 2.0], [6.5, 8.5]],
    ]


@pytest.mark.parametrize("sizes", [[1] * 7, [3, 64, 5], [250], [199, 1, 1, 2], [64, 64, 64, 64]])
def test_recording_a_group_keeps_what_recording_one_at_a_time_keeps(
    pack: ModelPack, sizes: list[int]
) -> None:
    """``record_many`` (the agent's path, one call per scored group) and ``record`` fill the
    ring the same way, across its wrap and for groups larger than the window."""
    x = np.random.default_rng(3).normal(0, 5, (sum(sizes), 6, 100)).astype(np.float32)
    conf = [float(i % 97) / 97 for i in range(len(x))]
    hard = [i % 5 == 0 for i in range(len(x))]
    one, many = _monitor(pack, window=200), _monitor(pack, window=200)
    for i in range(len(x)):
        one.record(x[i], conf[i], hard[i])
    at = 0
    for n in sizes:
        many.record_many(x[at : at + n], conf[at : at + n], hard[at : at + n])
        at += n
    assert many._n == one._n == len(x)
    assert one._values is not None
    assert many._values is not None
    assert np.array_equal(one._values, many._values)
    assert np.array_equal(one._conf, many._conf)
    assert np.array_equal(one._hard, many._hard)


def test_window_features_of_float32_windows_are_those_of_a_float64_copy() -> None:
    """The statistics accumulate in float64 as they read float32 windows, without a float64
    copy first: bit for bit what the copy gave (the training reference was made so)."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(50, 6, 100)) * rng.gamma(2.0, 3.0, size=(50, 6, 1))).astype(np.float32)
    got = window_features(x, ("mean", "std"))
    x64 = x.astype(np.float64)
    want = np.concatenate([x64.mean(axis=2), x64.std(axis=2)], axis=1)
    assert got.dtype == np.float64
    assert np.array_equal(got, want)
