"""Drift in telemetry: the real agent and default model replaying the real test data.

Unchanged, the replay never raises the drift flag; with an offset on one channel from a given
reading on, the flag rises within ``drift.window`` readings of the onset (plus one telemetry
tick), naming the feature, in the MQTT telemetry and in the Prometheus textfile.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import load_settings
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.ingest.sources import open_source
from edge_agent.models.pack import resolve
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from tests.conftest import ROOT, TEST_JSONL, settings_env
from tests.mqtt_peer import Collector

pytestmark = pytest.mark.integration

WINDOW = 200
LOOPS = 16  # 640 readings: the window fills at 200, the shift below starts at 240
ONSET = 240
#: acc_z's train std is 3.546 (data/basicmotions/README.md): +0.25 x std, the smallest offset
#: docs/drift.md promises to catch on every channel.
OFFSET = "0.8865"
RATE_HZ = "400"  # paced so that 0.05 s telemetry ticks see ~20 readings each
TICK = "0.05"


def run_agent(
    broker: Mosquitto, prefix: str, tmp: Path, **extra: str
) -> tuple[list[dict[str, Any]], str]:
    textfile = tmp / "edge_agent.prom"
    env = settings_env(
        broker.port,
        prefix,
        tmp / "state",
        model_pack="basicmotions-int8",
        source_kind="replay",
        source_path=str(TEST_JSONL),
        source_loops=str(LOOPS),
        source_rate_hz=RATE_HZ,
        telemetry_interval_s=TICK,
        # Every tick looks at the ring: the window promise is tested, not the cost knob that
        # makes ticks faster than 1 s reuse the statistics (at 400 readings/s a 1 s old look
        # may be 400 readings late).
        telemetry_slow_interval_s="0",
        telemetry_textfile=str(textfile),
        drift_window=str(WINDOW),
        link_confirm="puback",  # no cloud worker answers here: the PUBACK settles a hard case
        **extra,
    )
    settings = load_settings(None, env=env)
    collector = Collector(broker.port, prefix, extra_topics=(f"{prefix}/+/telemetry",))
    scorer = Scorer.open(resolve(settings.model.pack))
    agent = Agent(settings, scorer, emit=lambda _b: None)
    spec = scorer.pack.manifest.input
    source = open_source(settings, tuple(spec.shape), spec.hop)
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(agent.run(source, exit_when_drained=True, drain_timeout_s=10))
    )
    thread.start()
    thread.join(60)
    assert codes == [0]
    # Every telemetry message the broker acknowledged reaches the collector; wait for them.
    # (The very last tick, taken while the agent closes, may not be published: the final
    # numbers are checked in the textfile, which that tick writes.)
    published = agent.link.counters["published_telemetry"]
    assert published > 0
    # While it scores, the run loop takes the snapshots itself (between groups), not the
    # telemetry thread, whose snapshots delay a reading (TelemetryThread).
    assert agent.telemetry.by_loop > 0

    def telemetry() -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in list(collector.messages) if t.endswith("/telemetry")]

    deadline = time.monotonic() + 10
    while len(telemetry()) < published and time.monotonic() < deadline:
        time.sleep(0.01)
    snaps = telemetry()
    assert len(snaps) >= published
    collector.close()
    snaps.sort(key=lambda s: s["time_unix"])
    return snaps, textfile.read_text()


def test_unchanged_replay_never_flags(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring.drift"):
        snaps, text = run_agent(broker, topic_prefix, tmp_path)
    assert snaps, "no telemetry"
    assert f"edge_agent_readings_total {LOOPS * 40}" in text
    drift = [s["drift"] for s in snaps]
    assert all(d["flag"] is False for d in drift)
    assert drift[0]["state"] in ("warming_up", "ok")
    assert drift[-1]["state"] == "ok"
    computed = [d["psi_max"] for d in drift if d["psi_max"] is not None]
    assert computed, "the window never filled"
    assert max(computed) < drift[-1]["psi_threshold"]
    assert drift[-1]["hard_rate"] == 0.0
    assert "edge_agent_drift_flag 0" in text
    assert "edge_agent_drift_enabled 1" in text
    assert 'edge_agent_drift_psi{feature="acc_z_mean"}' in text
    assert not [r for r in caplog.records if r.name == "edge_agent.scoring.drift"]


def test_shifted_channel_raises_the_flag_within_the_window(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring.drift"):
        snaps, text = run_agent(
            broker,
            topic_prefix,
            tmp_path,
            source_shift_channel="2",
            source_shift_offset=OFFSET,
            source_shift_after=str(ONSET),
        )
    flagged = [s for s in snaps if s["drift"]["flag"]]
    assert flagged, [s["drift"]["psi_max"] for s in snaps]
    first = flagged[0]
    # Not before the shift began, and within the documented window after it (the snapshot's
    # reading count may run a few readings ahead of the drift ring: same tick, no lock).
    assert first["readings"] > ONSET
    assert first["readings"] - ONSET <= WINDOW
    assert all(not s["drift"]["flag"] for s in snaps if s["readings"] <= ONSET)
    last = snaps[-1]["drift"]
    assert last["state"] == "drift"
    assert last["psi_max_feature"] == "acc_z_mean"
    assert "acc_z_mean" in last["features_over"]
    assert last["psi_max"] >= last["psi_threshold"]
    assert "edge_agent_drift_flag 1" in text
    logged = [r.getMessage() for r in caplog.records if r.name == "edge_agent.scoring.drift"]
    assert len(logged) == 1, logged  # logged once when it rose, not on every tick
    assert "acc_z_mean" in logged[0]


def test_bundled_drift_references_are_up_to_date() -> None:
    """The [drift] tables in models/ are what scripts/drift_reference.py computes now."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "drift_reference.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
