"""The bench's telemetry on/off measurement, shortened: its blocks pair up for the budget,
the loop takes the snapshots, and the link publishes them through a real broker."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edge_agent.devtools import measure
from edge_agent.devtools.costs import budgets
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.models.pack import BUNDLED_TEST_DATA, resolve
from edge_agent.scoring.scorer import Scorer


def test_telemetry_effect_pairs_its_blocks_and_publishes_what_the_loop_took(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(measure, "TELEMETRY_BLOCKS", 4)  # off, on, off, on
    monkeypatch.setattr(measure, "TELEMETRY_BLOCK_S", 0.3)
    scorer = Scorer.open(resolve())
    try:
        got = measure.telemetry_effect(
            scorer, measure.load_lines(BUNDLED_TEST_DATA), 1, tmp_path / "tel", broker.port
        )
    finally:
        scorer.close()
    assert len(got["blocks"]) == 2
    assert all(b["off_p99_ms"] > 0 and b["on_p99_ms"] > 0 for b in got["blocks"])
    # 0.6 s "on" at one snapshot per 50 ms: about a dozen, each taken by the scoring loop
    # and published (the link encodes it) before the next block.
    assert got["taken_by_loop"] >= 6
    assert got["published"] >= got["taken_by_loop"]  # the thread may take one on a busy machine
    assert math.isfinite(got["p999_ratio"])
    (tel,) = budgets({"packs": {}, "telemetry": got})
    pairs = sorted(b["on_p99_ms"] / b["off_p99_ms"] for b in got["blocks"])
    assert tel["value"] == pytest.approx(sum(pairs) / 2)
    assert tel["pooled"] == got["p99_ratio"]
