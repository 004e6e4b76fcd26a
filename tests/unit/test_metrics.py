"""The Prometheus exposition of the agent and the cloud worker, checked by Debian's promtool,
and the alert rules checked and unit-tested by promtool."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.cloud.intake import Answer
from edge_agent.cloud.ledger import Usage
from edge_agent.cloud.metrics import LedgerSince
from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import load_settings
from edge_agent.models.pack import open_pack
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.metrics import agent_metrics, decision_histogram, round_trip_histogram
from edge_agent.service.telemetry import SystemProbe
from edge_agent.util.metrics import Exposition, Histogram
from edge_agent.wire.messages import Tier
from tests.conftest import make_fake_pack
from tests.prometheus import DASHBOARDS, check_metrics, promtool

FULL_SNAPSHOT = {
    "model": "basicmotions-int8@1.1.0",
    "readings": 1200,
    "rejected": 3,
    "rejects": {"malformed_json": 2, "non_finite": 1},
    "local": 1100,
    "hard_urgent": 20,
    "hard_batch": 80,
    "hard_refused": 0,
    "verdicts_on_time": 18,
    "verdicts_late": 1,
    "verdicts_batch": 80,
    "deadline_missed": 2,
    "agreement": 0.95,
    "latency_ms_p50": 0.2,
    "latency_ms_p95": 0.3,
    "latency_ms_p99": 0.4,
    "round_trip_ms_p50": 1.2,
    "round_trip_ms_p99": 2.0,
    "outbox": {"urgent": 1, "batch": 4, "telemetry": 0},
    "outbox_bytes": 4096,
    "outbox_events": {"put_urgent": 20, "acked_telemetry": 9},
    "link": {"connects": 1, "disconnects": 0, "published_urgent": 20},
    "connected": True,
    "degraded": False,
    "reconnects": 0,
    "router": {"urgent": 20, "batch_by_policy": 80},
    "drift": {
        "enabled": True,
        "state": "drift",
        "flag": True,
        "flags_raised": 1,
        "reasons": ["feature_psi"],
        "window": 200,
        "readings": 200,
        "psi_threshold": 0.6,
        "psi_max": 1.27,
        "psi_max_feature": "acc_z_mean",
        "features_over": ["acc_z_mean"],
        "psi": {"acc_z_mean": 1.27, "acc_x_mean": 0.1},
        "confidence": {"0.00-0.50": 0.1, "0.99-1.00": 0.9},
        "confidence_ref": {"0.00-0.50": 0.05, "0.99-1.00": 0.95},
        "confidence_psi": 0.02,
        "hard_rate": 0.1,
        "hard_rate_ref": 0.05,
    },
    "rollout": {
        "events": {"received": 1, "shadow": 1},
        "shadow": {"readings": 50, "agreement": 0.98, "p99_ms": 0.4, "errors": 0},
        "probation": {},
    },
    "cpu_percent": 3.0,
    "cpu_seconds": 1.5,
    "rss_bytes": 88_000_000,
    "threads": 5,
    "load1": 0.5,
    "load5": 0.4,
    "load15": 0.3,
    "mem_available_bytes": 10**10,
    "disk_free_bytes": 10**11,
    "temperatures_c": {"k10temp_Tctl": 48.5},
    "time_unix": 1795864393.7,
}


def _families(text: str) -> dict[str, str]:
    """Family name -> type, from the ``# TYPE`` lines."""
    return {
        m.group(1): m.group(2) for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)
    }


def test_exposition_writes_help_and_type_and_refuses_bad_families() -> None:
    out = Exposition()
    out.counter("x_events_total", 'Events "quoted"\nand a new line.', 3, {"why": 'a"b\\c\nd'})
    out.gauge("x_nothing", "Left out: no value.", None)
    out.gauge("x_nan", "Left out: NaN.", math.nan)
    text = out.text()
    assert text.splitlines() == [
        '# HELP x_events_total Events "quoted"\\nand a new line.',
        "# TYPE x_events_total counter",
        'x_events_total{why="a\\"b\\\\c\\nd"} 3',
    ]
    assert check_metrics(text).returncode == 0
    with pytest.raises(ValueError, match="_total"):
        out.counter("x_events", "A counter without _total.", 1)
    with pytest.raises(ValueError, match="twice"):
        out.counter("x_events_total", "Again.", 1)


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.002, 0.01, 0.5, 3.0):
        h.observe(v)
    d = h.data()
    assert d.cumulative == (2, 4, 4, 6)  # le=0.001 holds 0.001 itself
    assert d.count == 6
    assert d.sum == pytest.approx(3.5135)
    out = Exposition()
    out.histogram("x_latency_seconds", "A latency.", [({"tier": "urgent"}, d)])
    lines = out.text().splitlines()
    assert 'x_latency_seconds_bucket{tier="urgent",le="0.001"} 2' in lines
    assert 'x_latency_seconds_bucket{tier="urgent",le="+Inf"} 6' in lines
    assert 'x_latency_seconds_count{tier="urgent"} 6' in lines
    with pytest.raises(ValueError, match="increasing"):
        Histogram((0.1, 0.01))


def test_agent_exposition_is_promtool_clean() -> None:
    decision, round_trip = decision_histogram(), round_trip_histogram()
    for v in (0.0002, 0.0003, 0.03):
        decision.observe(v)
    round_trip.observe(0.0015)
    text = agent_metrics(FULL_SNAPSHOT, "dev-7", decision.data(), round_trip.data())
    result = check_metrics(text)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    families = _families(text)
    assert families["edge_agent_decision_latency_seconds"] == "histogram"
    assert families["edge_agent_verdict_round_trip_seconds"] == "histogram"
    assert len(families) == text.count("# HELP ")
    for name, kind in families.items():
        assert (kind == "counter") == name.endswith("_total"), name
        assert not any(part in name for part in ("_ms", "p99", "dev-7")), name
    lines = set(text.splitlines())
    assert 'edge_agent_info{device="dev-7",model="basicmotions-int8@1.1.0"} 1' in lines
    assert 'edge_agent_decision_latency_seconds_bucket{le="0.00025"} 1' in lines
    assert 'edge_agent_decision_latency_seconds_bucket{le="0.05"} 3' in lines
    assert "edge_agent_verdict_round_trip_seconds_count 1" in lines
    assert 'edge_agent_hard_cases_total{tier="urgent"} 20' in lines
    assert 'edge_agent_rollout_trial{trial="shadow",figure="p99_seconds"} 0.0004' in lines


def _worker(tmp_path: Path, **extra: str) -> CloudWorker:
    pack = make_fake_pack(tmp_path / "pack")
    env = {"EDGE_AGENT_CLOUD_PACK": str(pack), "EDGE_AGENT_CLOUD_WORKER_ID": "w1"}
    env.update({f"EDGE_AGENT_{k.upper()}": v for k, v in extra.items()})
    return CloudWorker(load_settings(None, env=env), Scorer.open(open_pack(pack)))


def test_worker_exports_only_its_own_charges(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.db"
    first = _worker(tmp_path, cloud_ledger_path=str(ledger_path))
    first.books.observe("d1", 500)
    first.books.answered("d1", Tier.URGENT, [("d1:1", Answer("a", 0.9, "m@1"))])
    first.stop()
    # A second worker on the same ledger file loads what the first charged: its metrics
    # count only what it charges itself, so a sum over workers counts each case once.
    w = _worker(tmp_path, cloud_ledger_path=str(ledger_path))
    assert w.ledger.totals()["d1"].urgent == 1
    w.books.observe("d2", 40)
    answers = [(f"d2:{i}", Answer("b", 0.8, "m@1")) for i in range(3)]
    w.books.answered("d2", Tier.BATCH, answers)
    w.verdicts.latency[Tier.URGENT].observe(0.0012)
    text = w.metrics.text()
    w.stop()
    result = check_metrics(text)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    lines = set(text.splitlines())
    unit = 1500 / 1000 * 0.04  # tokens_per_reading / 1000 x price_sync_per_1k_tokens
    assert {
        'edge_cloud_ledger_cases_total{tier="urgent"} 0',
        'edge_cloud_ledger_cases_total{tier="batch"} 3',
        "edge_cloud_ledger_tokens_total 4500",
        f'edge_cloud_case_price{{tier="urgent"}} {unit!r}',
        'edge_cloud_device_readings_total{device="d1"} 500',
        'edge_cloud_device_readings_total{device="d2"} 40',
        'edge_cloud_verdict_latency_seconds_count{tier="urgent"} 1',
        'edge_cloud_info{worker="w1",group="cloud",backend="pack"} 1',
    } <= lines
    cost = next(x for x in lines if x.startswith('edge_cloud_ledger_cost_total{tier="batch"}'))
    assert float(cost.split()[-1]) == pytest.approx(3 * unit * 0.5)
    for name, kind in _families(text).items():
        assert (kind == "counter") == name.endswith("_total"), name


class _ShrinkingLedger:
    """Stands in for CostLedger.totals(): its figures drop, as when old days expire."""

    def __init__(self) -> None:
        self.figures = {"d1": Usage(urgent=5, tokens=7500)}

    def totals(self) -> dict[str, Usage]:
        return self.figures


def test_worker_ledger_counters_never_go_back(tmp_path: Path) -> None:
    ledger = _ShrinkingLedger()
    since = LedgerSince(ledger)  # type: ignore[arg-type]
    ledger.figures = {"d1": Usage(urgent=8, tokens=12000)}
    assert since.usage() == Usage(urgent=3, tokens=4500)
    ledger.figures = {"d1": Usage(urgent=1, tokens=1500)}  # days expired
    assert since.usage() == Usage(urgent=3, tokens=4500)
    w = _worker(tmp_path, cloud_metrics_devices="false")
    w.books.observe("d1", 10)
    assert "edge_cloud_device_readings_total" not in w.metrics.text()
    w.stop()


def test_alert_rules_check_and_unit_tests() -> None:
    checked = promtool("check", "rules", str(DASHBOARDS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "5 rules found" in checked.stdout
    tested = promtool("test", "rules", "alerts_test.yml", cwd=DASHBOARDS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_a_group_observed_at_once_is_counted_as_one_by_one() -> None:
    """``Histogram.observe_many`` and ``LatencyWindow.record_many`` (the agent's per-group
    bookkeeping) keep exactly what observing each value alone keeps, across the ring's wrap."""
    from edge_agent.service.metrics import decision_histogram  # noqa: PLC0415
    from edge_agent.service.telemetry import LatencyWindow  # noqa: PLC0415

    rng = np.random.default_rng(5)
    one, many = decision_histogram(), decision_histogram()
    w_one, w_many = LatencyWindow(50), LatencyWindow(50)
    for size in (1, 3, 7, 8, 64, 13, 40):
        ms = (rng.gamma(2.0, 0.2, size) * rng.choice([1, 10, 1000], size)).tolist()
        ms[0] = one.bounds[size % len(one.bounds)] * 1e3  # a value exactly on a bound
        for v in ms:
            one.observe(v * 1e-3)
            w_one.record(v)
        many.observe_many(ms, 1e-3)
        w_many.record_many(ms)
    assert many.data().cumulative == one.data().cumulative
    assert many.data().sum == pytest.approx(one.data().sum, rel=1e-12)
    assert w_many.count == w_one.count
    assert w_many.percentiles() == w_one.percentiles()
    # Values exactly on the bounds (``observe`` counts a value equal to a bound in that bucket).
    exact_one, exact_many = decision_histogram(), decision_histogram()
    on_bounds = list(exact_one.bounds) * 2
    for v in on_bounds:
        exact_one.observe(v)
    exact_many.observe_many(on_bounds)
    assert exact_many.data().cumulative == exact_one.data().cumulative


def test_the_probe_gives_the_process_cpu_share_since_the_last_probe(tmp_path: Path) -> None:
    """The CPU share is worked out from the probe's own CPU times (one read of them per
    probe): about 100 while this thread spins between two probes, about 0 while it sleeps.
    The bounds are wide: CPU times come in clock ticks (10 ms) and the machine may be busy."""
    probe = SystemProbe(str(tmp_path))
    before = probe._cpu_seconds()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass
    if probe._cpu_seconds() == before:
        # qemu-user (scripts/arm_check.sh) answers /proc/self/stat with CPU times of 0.
        pytest.skip("this platform reports no CPU time for the process")
    busy = probe.read()
    time.sleep(0.5)
    idle = probe.read()
    assert 50.0 <= busy["cpu_percent"] <= 150.0
    assert 0.0 <= idle["cpu_percent"] <= 20.0
    assert idle["cpu_seconds"] >= busy["cpu_seconds"] >= 0.4
    assert busy["rss_bytes"] > 0
    assert isinstance(busy["temperatures_c"], dict)
