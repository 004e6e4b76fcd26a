from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from edge_agent.cloud.books import Billed, Books
from edge_agent.cloud.intake import Answer, AnswerMemory
from edge_agent.cloud.ledger import CostLedger
from edge_agent.cloud.ledger_store import LedgerStore
from edge_agent.devtools.bench import BenchOptions
from edge_agent.devtools.costs import budgets, cost_section
from edge_agent.devtools.measure import stats
from edge_agent.errors import EdgeAgentError
from edge_agent.wire.messages import Tier


def test_stats_percentiles_and_throughput() -> None:
    s = stats([1.0] * 98 + [10.0, 20.0], cpu_s=0.05, wall_s=0.5)
    assert s["n"] == 100
    assert s["p50_ms"] == 1.0
    assert s["p99_ms"] == pytest.approx(10.1)
    assert s["throughput_per_s"] == 200.0
    assert s["cpu_ms_per_reading"] == pytest.approx(0.5)


def test_cost_arithmetic() -> None:
    opts = BenchOptions(
        price_sync_per_1k_tokens=0.04,
        price_sync_low=0.02,
        price_sync_high=0.06,
        batch_discount=0.5,
        tokens_per_reading=1000,
        readings_per_second=1.0,
    )
    cost = cost_section({"urgent_rate": 0.02, "batch_rate": 0.08}, opts)
    month = 30 * 86400
    d = cost["scenarios"]["default"]
    assert cost["readings_per_month"] == month
    assert d["all_cloud_sync"] == pytest.approx(month * 0.04)
    assert d["all_cloud_batch"] == pytest.approx(month * 0.02)
    assert d["hybrid"] == pytest.approx(month * (0.02 * 0.04 + 0.08 * 0.02))
    assert d["hybrid_vs_sync"] == pytest.approx(0.02 + 0.08 * 0.5)
    assert cost["scenarios"]["low"]["all_cloud_sync"] == pytest.approx(month * 0.02)
    assert cost["scenarios"]["high"]["all_cloud_sync"] == pytest.approx(month * 0.06)


def test_budget_verdicts() -> None:
    def s(p99: float, per_s: float = 0.0, mean: float | None = None) -> dict[str, float]:
        out = {"p50_ms": p99 / 2, "p95_ms": p99, "p99_ms": p99, "throughput_per_s": per_s}
        out["mean_ms"] = mean if mean is not None else p99 / 2
        return out

    pack = {
        "backend": "onnx",
        # raw run: p99 0.02 ms; 64 at a time 0.1 ms (640,000/s)
        "floor": {"single": s(0.02), "batched": s(0.1, 640_000, mean=0.1)},
        # JSON floor: p99 0.06 ms per line; 64 lines 2.0 ms
        "json_floor": {
            "single": s(0.06),
            "batched": s(2.0, 32_000, mean=2.0),
            "fastest_validated": "orjson, validated",
        },
        "naive": s(0.2),
        "agent": {
            "single": s(0.075),  # over 0.06 + 0.5 x 0.02 = 0.07: no
            "batched": s(2.0, 30_000, mean=2.09),  # <= 2.0 + 0.1: yes
            "frame": s(0.029),  # 1.45x the raw p99
            "frames_batched": s(0.2, 310_000),  # 640k / 310k = 2.06x: no
            "from_array": s(0.025),
            "from_array_batched": s(0.1, 400_000),
        },
    }
    results = {
        "packs": {"m@1": pack},
        "process": {"peak_rss_bytes": 100 * 2**20},
        "cold_start": {"ready_s": 2.0},
        "all_cloud": {"round_trip_excluding_cloud_model": {"p99_ms": 1.0}},
        "telemetry": {"p99_ratio": 1.05},
    }
    verdicts = {b["budget"]: b["pass"] for b in budgets(results)}
    assert verdicts["m@1: agent p99 per frame / raw run p99"] is True
    assert verdicts["m@1: raw batched throughput / agent micro-batched from frames"] is False
    assert verdicts["m@1: agent p99 per JSON line / (JSON floor p99 + 0.5 raw run p99)"] is False
    assert verdicts["m@1: agent x64 from JSON lines / (JSON floor x64 + raw run x64)"] is True
    assert verdicts["m@1: agent p99 / naive p99"] is True
    assert verdicts["ONNX agent peak RSS"] is True
    assert verdicts["cold start to READY=1 (ONNX)"] is False
    assert verdicts["hard-case round trip p99, excluding the cloud model"] is True
    assert verdicts["p99 with telemetry on / off"] is True
    pack["agent"]["single"] = s(0.069)  # type: ignore[index]
    pack["agent"]["frames_batched"] = s(0.2, 330_000)  # type: ignore[index]
    verdicts = {b["budget"]: b["pass"] for b in budgets(results)}
    assert all(verdicts[k] for k in verdicts if k.startswith("m@1")), verdicts


def test_cost_section_prices_measured_endpoint_tokens_from_a_ledger(tmp_path: Path) -> None:
    led = CostLedger(0.04, 0.5, 1000, price_prompt_per_1k=1.0, price_completion_per_1k=2.0)
    books = Books(led, AnswerMemory(10), Counter(), LedgerStore(tmp_path / "ledger.db", "w1"))
    books.store.load(led)  # type: ignore[union-attr]
    books.billed([Billed("d", Tier.URGENT, 300, 5, "k1", Answer("a", 1.0, "m"))])
    books.billed([Billed("d", Tier.URGENT, 100, 3, "k2", Answer("a", 1.0, "m"))])
    opts = BenchOptions(readings_per_second=1.0, ledger=tmp_path / "ledger.db")
    cost = cost_section({"urgent_rate": 0.1, "batch_rate": 0.0}, opts)
    month = 30 * 86400
    unit = 200 / 1000 * 1.0 + 4 / 1000 * 2.0
    assert cost["measured"]["mean_prompt_tokens"] == 200
    assert cost["measured"]["requests"] == 2
    assert cost["scenarios"]["measured"]["all_cloud_sync"] == pytest.approx(month * unit)
    assert cost["scenarios"]["measured"]["hybrid"] == pytest.approx(month * 0.1 * unit)
    LedgerStore(tmp_path / "empty.db", "w1").load(CostLedger(0.04, 0.5, 1000))
    with pytest.raises(EdgeAgentError, match="no endpoint request"):
        cost_section(
            {"urgent_rate": 0.1, "batch_rate": 0.0}, BenchOptions(ledger=tmp_path / "empty.db")
        )


def test_interleaved_times_every_path_its_count_in_turn() -> None:
    """Each path is called exactly its ``n`` times, in slices that take turns with the other
    paths' (not all of one, then all of the next), and a micro-batch's throughput is its
    readings over its mean time."""
    from edge_agent.devtools.measure import Spec, interleaved  # noqa: PLC0415

    calls: list[str] = []
    specs = {
        "a": Spec(lambda: calls.append("a"), 23),
        "b": Spec(lambda: calls.append("b"), 7, batch=64),
    }
    got = interleaved(specs, rounds=5)
    assert calls.count("a") == 23
    assert calls.count("b") == 7
    assert got["a"]["n"] == 23
    assert got["b"]["n"] == 7
    switches = sum(1 for x, y in itertools.pairwise(calls) if x != y)
    assert switches >= 8  # 5 rounds of a then b: at least 9 slices, so at least 8 switches
    assert got["b"]["batch"] == 64
    assert got["b"]["throughput_per_s"] == pytest.approx(64 / (got["b"]["mean_ms"] / 1000))


def test_budgets_take_the_median_of_the_rounds() -> None:
    """A budget's value is the median of its ratio round by round: one round where the
    machine slowed the agent's slice alone moves the pooled p99 over the limit, not the
    verdict; an agent slower in most rounds fails, and the pooled value is kept beside it."""
    from edge_agent.devtools.costs import by_rounds  # noqa: PLC0415

    def path(p99s: list[float]) -> dict[str, object]:
        rounds = [{"p99_ms": v, "mean_ms": v / 2, "throughput_per_s": 2000 / v} for v in p99s]
        return {"p99_ms": max(p99s), "mean_ms": sum(p99s) / len(p99s) / 2, "rounds": rounds}

    def frame_ratio(a: dict[str, float], f: dict[str, float]) -> float:
        return a["p99_ms"] / f["p99_ms"]

    raw = path([0.1] * 10)
    one_hiccup = path([0.13] * 9 + [0.4])
    value, pooled = by_rounds(frame_ratio, one_hiccup, raw)
    assert value == pytest.approx(1.3)
    assert pooled == pytest.approx(4.0)
    slower = path([0.13] * 4 + [0.16] * 6)
    assert by_rounds(frame_ratio, slower, raw)[0] == pytest.approx(1.6)
    # Without rounds (an older bench.json), or with rounds that do not pair up: pooled.
    assert by_rounds(frame_ratio, {"p99_ms": 0.2}, {"p99_ms": 0.1}) == (2.0, 2.0)
    short = path([0.1] * 9)
    assert by_rounds(frame_ratio, one_hiccup, short) == (4.0, 4.0)


def test_telemetry_budget_pairs_each_on_block_with_the_off_block_before_it() -> None:
    blocks = [{"off_p99_ms": 0.2, "on_p99_ms": 0.21}] * 9 + [{"off_p99_ms": 0.2, "on_p99_ms": 0.5}]
    got = budgets({"packs": {}, "telemetry": {"p99_ratio": 1.3, "blocks": blocks}})
    (tel,) = got
    assert tel["pass"] is True
    assert tel["value"] == pytest.approx(1.05)
    assert tel["pooled"] == pytest.approx(1.3)
    blocks[:6] = [{"off_p99_ms": 0.2, "on_p99_ms": 0.23}] * 6
    (tel,) = budgets({"packs": {}, "telemetry": {"p99_ratio": 1.05, "blocks": blocks}})
    assert tel["pass"] is False
