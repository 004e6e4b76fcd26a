"""The whole loop with real parts: agent (default pack) → mosquitto → cloud worker → verdicts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import load_settings
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.ingest.sources.replay import ReplaySource
from edge_agent.models.pack import resolve
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from edge_agent.wire.messages import Verdict
from tests.conftest import TEST_JSONL, settings_env

pytestmark = pytest.mark.integration


def test_hard_cases_go_out_and_verdicts_come_back(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    env = settings_env(
        broker.port,
        topic_prefix,
        tmp_path / "state",
        router_cooldown_s="0",
        router_max_urgent_per_minute="100000",
        router_urgent_below="0.9",
        link_batch_max_wait_s="0.2",
    )
    settings = load_settings(None, env=env)
    worker = CloudWorker(settings)
    worker.start()
    assert worker.ready.wait(10)
    scorer = Scorer.open(resolve())
    lines: list[dict] = []
    verdicts: list[Verdict] = []
    lock = threading.Lock()

    def emit(data: bytes) -> None:
        with lock:
            lines.extend(json.loads(x) for x in data.splitlines())

    agent = Agent(settings, scorer, emit=emit)
    agent.reconciler.listeners.append(verdicts.append)
    # Noise at twice each channel's std makes a good share of the windows hard.
    source = ReplaySource(
        str(TEST_JSONL),
        settings.input.max_line_bytes,
        rate_hz=0,
        loops=5,
        noise=2.0,
        seed=7,
        batch=64,
    )
    try:
        assert agent.run(source, exit_when_drained=True, drain_timeout_s=30) == 0
    finally:
        worker.stop()
    decisions = [x for x in lines if "label" in x]
    hard = [d for d in decisions if d["route"] == "hard"]
    assert len(decisions) == 200
    assert hard, "noise at 2x std should produce hard cases"
    urgent = {d["key"] for d in hard if d["tier"] == "urgent"}
    batch = {d["key"] for d in hard if d["tier"] == "batch"}
    answered = {v.key for v in verdicts}
    assert urgent | batch == answered  # every hard case got exactly its verdict back
    c = agent.reconciler.counters
    assert c["verdicts_on_time"] == len(urgent)
    assert c["verdicts_batch"] == len(batch)
    assert c["deadline_missed"] == 0
    assert worker.counters["urgent_scored"] == len(urgent)
    assert worker.counters["batch_cases_scored"] == len(batch)
    assert agent.reconciler.agreement() is not None
    rtt = sorted(agent.reconciler.round_trips_ms)
    assert len(rtt) == len(urgent)
    print(
        f"\nround trip over {len(rtt)} urgent cases: p50 {rtt[len(rtt) // 2]:.2f} ms,"
        f" p99 {rtt[min(len(rtt) - 1, int(0.99 * len(rtt)))]:.2f} ms"
    )
    total = worker.ledger.summary()["total"]
    assert (total["urgent"], total["batch"]) == (len(urgent), len(batch))
    assert total["readings_total"] <= 200
    assert 0 < total["spend"] < total["all_cloud_sync"]
