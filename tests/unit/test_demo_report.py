"""The demo's side-by-side table and risk-coverage plot, from a summary."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from edge_agent.devtools.demo_report import render, risk_coverage, write_risk_coverage


def test_risk_coverage_ranks_by_confidence() -> None:
    # 10 readings: the two least confident are the wrong ones.
    points = [(0.99 - i / 100, True) for i in range(8)] + [(0.5, False), (0.4, False)]
    curve = risk_coverage(points)
    assert curve[-1] == [1.0, 0.2]
    assert all(r == 0.0 for c, r in curve if c <= 0.8)
    assert [c for c, _ in curve] == sorted(c for c, _ in curve)


def _run(policy: str, escalated: int) -> dict[str, Any]:
    return {
        "policy": policy,
        "readings": 400,
        "local": 400 - escalated,
        "urgent": 1,
        "batch": escalated - 1,
        "alerts": 0,
        "escalated": escalated,
        "audit": 2 if policy == "learned" else 0,
        "share_local": (400 - escalated) / 400,
        "local_latency_ms": {"p50": 0.4, "p99": 1.2},
        "accuracy": {
            "edge_only": 0.99,
            "hybrid": 0.99,
            "hybrid_any_verdict": 0.9825,
            "cloud_only": 0.9825,
            "local_answers": 0.995,
        },
        "risk_coverage": [[0.5, 0.0], [1.0, 0.01]],
        "monthly_cost_usd": {
            "readings_per_second": 1.0,
            "all_cloud_sync": 155520.0,
            "all_cloud_batch": 77760.0,
            "hybrid": 1000.0 * escalated,
        },
        "warmup": {
            "readings": 1200 if policy == "learned" else 0,
            "data": "train.jsonl",
            "seed": 1,
            "escalated": 700,
            "cost_usd": 21.0,
            "verdict_wait_s": 0.1,
        },
        "routing": {"policy": policy}
        if policy == "fixed"
        else {
            "policy": "learned",
            "alpha": 0.05,
            "delta": 0.05,
            "bound_local_corrections": 0.048,
            "strata": {"conf:0-0.5": {"plan": "value"}, "conf:0.999-1": {"plan": "local"}},
        },
    }


def test_render_and_plot_show_both_policies(tmp_path: Path) -> None:
    runs = {"fixed": _run("fixed", 234), "learned": _run("learned", 46)}
    summary = {
        "readings": 400,
        "noise": 3.0,
        "policies": runs,
        "elapsed_s": 9.0,
        "models": {"edge": "e@1", "cloud": "c@1"},
        "plot": str(tmp_path / "rc.svg"),
    }
    text = render(summary)
    assert "fixed policy" in text
    assert "learned policy" in text
    assert "234 (urgent 1, batch 233)" in text
    assert "warm-up (learned): 1200 readings" in text
    assert "at most 4.80% of local answers" in text
    assert "conf:0-0.5 (value)" in text
    assert "conf:0.999-1" not in text
    write_risk_coverage(tmp_path / "rc.svg", runs, 3.0)
    svg = ET.parse(tmp_path / "rc.svg").getroot()  # well-formed
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{ns}circle")) == 2
    assert len(svg.findall(f"{ns}polyline")) == 1
