"""The bench's network options: profile names and the endpoint tier's measured-latency file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.devtools.netproxy import NetProxy, NetworkProfile
from edge_agent.devtools.network import endpoint_latency, honoured
from edge_agent.errors import EdgeAgentError


def test_the_endpoint_file_is_the_round_trip_scripts_json(tmp_path: Path) -> None:
    good = tmp_path / "endpoint.json"
    good.write_text(json.dumps({"cases": 12, "worker_ms_p50": 1570.1, "worker_ms_p99": 1984.4}))
    assert endpoint_latency(good) == {
        "file": str(good),
        "cases": 12,
        "p50_ms": 1570.1,
        "p99_ms": 1984.4,
    }
    bad = tmp_path / "ledger.json"
    bad.write_text(json.dumps({"pricing": {}}))
    with pytest.raises(EdgeAgentError, match="worker_ms_p50"):
        endpoint_latency(bad)
    with pytest.raises(EdgeAgentError, match="not the JSON"):
        endpoint_latency(tmp_path / "missing.json")


def test_a_profile_honours_the_deadlines_its_p99_fits_under() -> None:
    assert honoured(68.0, [50.0, 100.0, 2000.0]) == [100.0, 2000.0]
    assert honoured(None, [50.0]) == []


def test_the_loss_model_pays_one_rto_per_loss_doubling_on_repeats() -> None:
    """With every segment lost the draw would never end; at 50% each further loss doubles
    the timeout (RFC 6298 back-off) up to 120 s; the floor is Linux's 200 ms."""
    net = NetworkProfile("half", 10.0, loss=0.5)
    assert net.rto_ms == 200.0
    assert NetworkProfile("far", 600.0, jitter_ms=20.0).rto_ms == 680.0
    proxy = NetProxy(1, net, seed=3)  # never started: only the model is used
    draws = [proxy.one_way_s(100) * 1000.0 for _ in range(400)]
    proxy.stop()
    allowed = {5.0 + sum(min(200.0 * 2**i, 120_000.0) for i in range(k)) for k in range(40)}
    assert all(min(abs(d - a) for a in allowed) < 1e-6 for d in draws)
    share_lost = sum(d > 5.0 for d in draws) / len(draws)
    assert 0.4 < share_lost < 0.6
    assert proxy.losses >= sum(d > 5.0 for d in draws)
