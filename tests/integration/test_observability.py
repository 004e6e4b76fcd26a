"""A real Prometheus (Debian's) scraping an agent, its textfile through node_exporter and two
cloud workers: every output is promtool-clean, every target is up, every PromQL expression of
the fleet dashboard returns data, the alert rules load, and the fleet's figures summed from
the workers' metrics are the workers' own figures."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import load_settings
from edge_agent.models.pack import open_pack
from edge_agent.scoring.scorer import Scorer
from tests.broker import Mosquitto, free_port
from tests.integration.test_sources import Harness
from tests.prometheus import DASHBOARDS, NodeExporter, Prometheus, check_metrics

pytestmark = pytest.mark.integration

#: Traffic runs until Prometheus scraped every target this often (a rate needs two scrapes
#: inside its window; histogram_quantile needs observations between two), at most MAX_S.
SCRAPES = 4
MAX_S = 60.0


def dashboard_exprs(node: Any) -> list[str]:
    """Every ``expr`` in a Grafana dashboard JSON, wherever it sits."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in dashboard_exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in dashboard_exprs(v)]
    return []


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def value(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def wait_scraped(prom: Prometheus, targets: int) -> None:
    """Until each of ``targets`` targets was scraped SCRAPES times (counted by Prometheus)."""
    deadline = time.monotonic() + MAX_S
    while time.monotonic() < deadline:
        counts = [float(r["value"][1]) for r in prom.query("count_over_time(up[5m])")]
        if len(counts) == targets and min(counts) >= SCRAPES:
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not scrape every target {SCRAPES} times in {MAX_S} s")


def _feed(port: int, stop: threading.Event) -> None:
    """Readings over UDP, ~150/s: 1 in 10 urgent hard, 1 in 10 batch hard, one bad line."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"{bad", ("127.0.0.1", port))
        i = 0
        while not stop.is_set():
            conf = 0.3 if i % 10 == 0 else 0.6 if i % 10 == 5 else 0.95
            line = json.dumps({"id": i, "values": [[i % 3, conf, 0, 0], [0, 0, 0, 0]]})
            s.sendto(line.encode(), ("127.0.0.1", port))
            i += 1
            time.sleep(1 / 150)


@pytest.fixture
def fleet(broker: Mosquitto, topic_prefix: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An agent (fake pack, UDP input, /metrics and a textfile) and two workers, all with
    metrics on free loopback ports."""
    udp = free_port()
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    h = Harness(
        broker,
        topic_prefix,
        tmp_path / "agent",
        source_kind="udp",
        source_path=f"127.0.0.1:{udp}",
        telemetry_interval_s="0.5",
        telemetry_http_port=str(free_port()),
        telemetry_textfile=str(textfiles / "edge_agent.prom"),
        router_cooldown_s="0",
        router_max_urgent_per_minute="100000",
        link_batch_max_wait_s="0.5",
    )
    pack = h.settings.model.pack
    workers = []
    for name in ("w1", "w2"):
        env = {
            "EDGE_AGENT_MQTT_PORT": str(broker.port),
            "EDGE_AGENT_MQTT_TOPIC_PREFIX": topic_prefix,
            "EDGE_AGENT_CLOUD_PACK": pack,
            "EDGE_AGENT_CLOUD_GROUP": "pool",
            "EDGE_AGENT_CLOUD_WORKER_ID": name,
            "EDGE_AGENT_CLOUD_METRICS_PORT": str(free_port()),
        }
        workers.append(CloudWorker(load_settings(None, env=env), Scorer.open(open_pack(pack))))
    node = NodeExporter(tmp_path / "node")
    try:
        for w in workers:
            w.start()
        for w in workers:
            assert w.ready.wait(10), w.last_error
        h.thread.start()
        node.start(textfiles)
        yield {"agent": h, "workers": workers, "udp": udp, "node": node}
    finally:
        node.stop()
        h.stop()
        for w in workers:
            w.stop()


def test_prometheus_scrapes_the_fleet_and_the_dashboard_queries_return_data(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    h: Harness = fleet["agent"]
    workers: list[CloudWorker] = fleet["workers"]
    agent_port = h.settings.telemetry.http_port
    worker_ports = [w.cloud.metrics_port for w in workers]
    prom = Prometheus(tmp_path / "prometheus").start(
        {
            "edge-agent": [f"127.0.0.1:{agent_port}"],
            "edge-agent-textfile": [f"127.0.0.1:{fleet['node'].port}"],
            "edge-cloud": [f"127.0.0.1:{p}" for p in worker_ports],
        },
        [DASHBOARDS / "alerts.yml"],
    )
    stop = threading.Event()
    feeder = threading.Thread(target=_feed, args=(fleet["udp"], stop), daemon=True)
    try:
        feeder.start()
        wait_scraped(prom, 4)
        stop.set()
        feeder.join(5)
        # Every output the project serves is promtool-clean.
        textfile = (tmp_path / "textfiles" / "edge_agent.prom").read_text()
        for text in [scrape(agent_port), textfile, *(scrape(p) for p in worker_ports)]:
            checked = check_metrics(text)
            assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")
        assert set(prom.targets_up().values()) == {"up"}, prom.targets_up()

        exprs = dashboard_exprs(json.loads((DASHBOARDS / "fleet.json").read_text()))
        assert len(exprs) >= 12
        empty = {}
        for expr in exprs:
            result = prom.query(expr)
            values = [float(r["value"][1]) for r in result]
            if not result or not all(math.isfinite(v) for v in values):
                empty[expr] = result
        assert not empty, empty

        # One device, counted once though Prometheus reads it twice (/metrics and textfile).
        devices = (
            "edge_agent_broker_connected * on (job, instance) group_left (device) edge_agent_info"
        )
        assert value(prom, f"count(max by (device) ({devices}) == 1)") == 1
        assert value(prom, "sum(edge_cloud_ready)") == 2

        rules = prom.api("rules")["groups"]
        loaded = {r["name"]: r["health"] for g in rules for r in g["rules"]}
        assert set(loaded) == {
            "EdgeDeviceOffline",
            "EdgeOutboxGrowing",
            "EdgeDriftFlagged",
            "EdgeVerdictsLate",
            "EdgeCloudWorkerDown",
        }
        assert set(loaded.values()) == {"ok"}, loaded

        # Traffic stopped: after two more scrapes the fleet's sums are the workers' figures.
        time.sleep(2.5)
        scored = sum(
            w.counters["urgent_scored"] + w.counters["batch_cases_scored"] for w in workers
        )
        assert scored > 0
        assert all(w.counters["urgent_scored"] > 0 for w in workers), "one worker got nothing"
        assert value(prom, "sum(edge_cloud_cases_scored_total)") == scored
        assert value(prom, "sum(edge_cloud_ledger_cases_total)") == sum(
            w.metrics.since.usage().cases for w in workers
        )
        assert value(prom, 'sum(edge_cloud_ledger_cases_total{tier="urgent"})') == sum(
            w.counters["urgent_scored"] for w in workers
        )
        # The agent's own figures arrive the same through /metrics and through the textfile.
        direct = value(prom, 'edge_agent_readings_total{job="edge-agent"}')
        via_file = value(prom, 'edge_agent_readings_total{job="edge-agent-textfile"}')
        assert direct == via_file == h.agent.counters["readings"]
        assert value(prom, "sum(edge_agent_decision_latency_seconds_count)") >= direct
        on_time = h.agent.reconciler.counters["verdicts_on_time"]
        assert on_time > 0
        assert value(prom, 'edge_agent_verdict_round_trip_seconds_count{job="edge-agent"}') == (
            on_time
        )
    finally:
        stop.set()
        prom.stop()
