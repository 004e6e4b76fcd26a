"""The bench's network section and the demo's ``--network``: a real mosquitto, the real agent
and cloud worker, the device's connection through the delay proxy (kept short: ~10 s)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_agent.devtools.bench import BenchOptions
from edge_agent.devtools.demo import run_demo
from edge_agent.devtools.demo_report import render
from edge_agent.devtools.localbroker import Mosquitto
from edge_agent.devtools.measure import load_lines, windows_of
from edge_agent.devtools.network import network_lines, network_section, parse_profiles
from edge_agent.errors import ConfigError
from edge_agent.models.pack import BUNDLED_TEST_DATA
from edge_agent.util.progress import Progress

pytestmark = pytest.mark.integration


def test_the_bench_reports_edge_cloud_and_hybrid_latency_per_profile(
    broker: Mosquitto, tmp_path: Path
) -> None:
    progress = Progress(2, None)
    x = windows_of(load_lines(BUNDLED_TEST_DATA))
    opts = BenchOptions(quick=True, network="loopback,wired")
    net = network_section(opts, x, broker.port, tmp_path, progress)
    loop, wired = net["profiles"]["loopback"], net["profiles"]["wired"]
    for e in (loop, wired):
        assert e["proxy_connections"] >= 2  # the all-cloud client and the agent's link
    # All-cloud pays the network: at least wired's RTT less its jitter, far more than loopback.
    assert wired["sync"]["p50_ms"] >= 20.0 - 1.0
    assert wired["sync"]["p50_ms"] > loop["sync"]["p50_ms"] + 15.0
    assert wired["sync"]["lost"] == 0
    assert wired["sync"]["n"] >= 8
    # Edge decisions do not touch the network; hybrid readings are all there, some waited.
    for e in (loop, wired):
        h = e["hybrid"]
        assert h["drained"]
        assert h["readings"] == 160
        assert h["edge"]["p50_ms"] < 10.0
        assert h["urgent"] >= 1
        assert h["round_trip"]["n"] >= 1
        assert 0 < h["waited_share"] < 0.5
        assert net["deadlines_ms"][-1] in e["honoured_ms"]  # router.deadline_ms (2000 ms)
    assert wired["hybrid"]["round_trip"]["p50_ms"] >= 19.0
    assert wired["hybrid"]["latency"]["p99_ms"] >= 19.0  # the urgent ones waited
    lines = "\n".join(network_lines({"network": net}))
    assert "loopback (0 ms RTT)" in lines
    assert "wired (20 ms RTT ± 1 ms)" in lines
    assert "urgent deadlines honoured" in lines


def test_unknown_profile_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown network profile 'wifi'"):
        parse_profiles("wired,wifi")
    assert parse_profiles("none") == []


def test_the_demo_runs_its_loop_over_a_network_profile() -> None:
    args = SimpleNamespace(
        data=str(BUNDLED_TEST_DATA),
        loops=3,
        rate_hz=200.0,
        noise=3.0,
        seed=0,
        readings_per_second=1.0,
        policy="fixed",
        warmup_loops=0,
        warmup_data=str(BUNDLED_TEST_DATA.parent / "train.jsonl"),
        plot=None,
        keep=False,
        quiet=True,
        network="wired",
    )
    with tempfile.TemporaryDirectory():
        summary = run_demo(args, None)
    assert summary["network"]["profile"] == "wired"
    assert summary["network"]["proxy_connections"] >= 1  # the agent's link went through it
    rtt = summary["policies"]["fixed"]["cloud_round_trip_ms"]
    assert rtt["n"] >= 1
    assert rtt["p50"] >= 19.0  # 20 ms RTT less 1 ms of jitter at most
    text = render(summary)
    assert "network between device and broker: wired" in text
    assert "cloud RTT p50/p99" in text
    assert "wired)" in text
