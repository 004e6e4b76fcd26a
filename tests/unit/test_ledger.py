"""The cloud cost ledger: tier prices, per device and UTC day, the all-cloud counterfactual."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from edge_agent.cloud.ledger import CostLedger
from edge_agent.cloud.worker import CloudWorker
from edge_agent.config import load_settings

DAY1 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
DAY2 = dt.datetime(2026, 11, 28, 0, 30, tzinfo=dt.UTC)


def ledger(price: float = 0.04, discount: float = 0.5, tokens: int = 1500) -> CostLedger:
    return CostLedger(
        price_sync_per_1k_tokens=price, batch_discount=discount, tokens_per_reading=tokens
    )


def test_unit_prices_urgent_and_batch() -> None:
    led = ledger()
    # 1500 tokens at 0.04 per 1k = 0.06 per urgent case; half that in a batch.
    assert led.unit_price("urgent") == pytest.approx(0.06)
    assert led.unit_price("batch") == pytest.approx(0.03)
    assert ledger(discount=0.0).unit_price("batch") == pytest.approx(0.06)
    assert ledger(discount=1.0).unit_price("batch") == 0.0
    assert ledger(price=0.0).unit_price("urgent") == 0.0


def test_charge_returns_cost_and_counts_tokens() -> None:
    led = ledger(price=0.02, discount=0.25, tokens=1000)
    assert led.charge("dev-a", "urgent", at=DAY1) == pytest.approx(0.02)
    assert led.charge("dev-a", "batch", cases=4, at=DAY1) == pytest.approx(4 * 0.02 * 0.75)
    dev = led.summary()["devices"]["dev-a"]
    assert (dev["urgent"], dev["batch"], dev["tokens"]) == (1, 4, 5000)
    assert dev["spend_urgent"] == pytest.approx(0.02)
    assert dev["spend_batch"] == pytest.approx(0.06)
    assert dev["spend"] == pytest.approx(0.08)


def test_grouping_per_device_and_utc_day() -> None:
    led = ledger()
    led.charge("dev-a", "urgent", at=DAY1)
    led.charge("dev-a", "urgent", at=DAY2)
    led.charge("dev-a", "batch", cases=10, at=DAY2)
    led.charge("dev-b", "batch", cases=2, at=DAY1)
    # 23:30 in UTC-2 is already the next UTC day.
    minus_two = dt.timezone(dt.timedelta(hours=-2))
    led.charge("dev-b", "urgent", at=dt.datetime(2026, 11, 27, 23, 30, tzinfo=minus_two))
    days = led.summary()["days"]
    assert sorted(days) == ["2026-11-27", "2026-11-28"]
    assert days["2026-11-27"]["dev-a"]["urgent"] == 1
    assert days["2026-11-27"]["dev-b"] == {
        "urgent": 0,
        "batch": 2,
        "tokens": 3000,
        "calls": 0,  # endpoint requests billed (none: the cloud pack's estimate)
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "spend_urgent": 0.0,
        "spend_batch": pytest.approx(0.06),
        "spend": pytest.approx(0.06),
    }
    assert days["2026-11-28"]["dev-a"]["batch"] == 10
    assert days["2026-11-28"]["dev-a"]["spend"] == pytest.approx(0.06 + 10 * 0.03)
    assert days["2026-11-28"]["dev-b"]["urgent"] == 1
    total = led.summary()["total"]
    assert (total["urgent"], total["batch"], total["devices"]) == (3, 12, 2)
    assert total["spend"] == pytest.approx(3 * 0.06 + 12 * 0.03)


def test_counterfactual_all_cloud_from_readings_total() -> None:
    led = ledger()
    led.observe("dev-a", 500)
    led.observe("dev-a", 1000)
    led.observe("dev-a", 700)  # a late batch case carries an older count: the highest counts
    led.charge("dev-a", "urgent", cases=3, at=DAY1)
    led.charge("dev-a", "batch", cases=20, at=DAY1)
    dev = led.summary()["devices"]["dev-a"]
    assert dev["readings_total"] == 1000
    # Every reading as a synchronous cloud call: 1000 * 0.06; every reading in a batch: * 0.5.
    assert dev["all_cloud_sync"] == pytest.approx(60.0)
    assert dev["all_cloud_batch"] == pytest.approx(30.0)
    hybrid = 3 * 0.06 + 20 * 0.03
    assert dev["spend"] == pytest.approx(hybrid)
    assert dev["saved_vs_all_cloud_sync"] == pytest.approx(60.0 - hybrid)
    assert dev["saved_vs_all_cloud_batch"] == pytest.approx(30.0 - hybrid)


def test_counterfactual_never_below_what_was_scored() -> None:
    led = ledger()
    led.charge("quiet", "urgent", cases=5, at=DAY1)  # a device that reported no readings_total
    led.observe("busy", 200)
    led.charge("busy", "batch", cases=2, at=DAY1)
    summary = led.summary()
    assert summary["devices"]["quiet"]["readings_priced"] == 5
    assert summary["devices"]["quiet"]["all_cloud_sync"] == pytest.approx(5 * 0.06)
    assert summary["devices"]["quiet"]["saved_vs_all_cloud_sync"] == pytest.approx(0.0)
    total = summary["total"]
    assert total["readings_total"] == 200
    assert total["readings_priced"] == 205
    assert total["all_cloud_sync"] == pytest.approx(205 * 0.06)
    assert total["all_cloud_batch"] == pytest.approx(205 * 0.03)
    assert total["spend"] == pytest.approx(5 * 0.06 + 2 * 0.03)


def old_json_ledger(path: Path, led: CostLedger) -> None:
    """A ledger file as the worker wrote it before the ledger's database (the JSON summary)."""
    path.write_text(json.dumps(led.summary(), indent=1, sort_keys=True) + "\n")


def test_the_old_json_format_is_read_back() -> None:
    led = ledger()
    led.observe("dev-a", 42)
    led.charge("dev-a", "urgent", at=DAY1)
    led.charge("dev-a", "batch", cases=3, at=DAY2)
    again = ledger()
    again.restore(json.dumps(led.summary()).encode())
    again.charge("dev-a", "urgent", at=DAY2)
    dev = again.summary()["devices"]["dev-a"]
    assert (dev["urgent"], dev["batch"], dev["readings_total"]) == (2, 3, 42)
    assert dev["spend"] == pytest.approx(2 * 0.06 + 3 * 0.03)


def test_restore_refuses_garbage() -> None:
    led = ledger()
    for bad in (b"not json", b"[]", b'{"v": 99}', b'{"v":1,"days":{"d":{"x":{"urgent":"many"}}}}'):
        with pytest.raises(ValueError, match="ledger"):
            led.restore(bad)
    assert led.summary()["total"]["urgent"] == 0


def test_old_days_are_dropped() -> None:
    led = CostLedger(0.04, 0.5, 1500, keep_days=2)
    for day in range(1, 5):
        led.charge("dev", "urgent", at=dt.datetime(2026, 1, day, tzinfo=dt.UTC))
    assert sorted(led.summary()["days"]) == ["2026-01-03", "2026-01-04"]


def test_from_settings_uses_the_cloud_section() -> None:
    settings = load_settings(
        None,
        env={
            "EDGE_AGENT_CLOUD_PRICE_SYNC_PER_1K_TOKENS": "0.1",
            "EDGE_AGENT_CLOUD_BATCH_DISCOUNT": "0.4",
            "EDGE_AGENT_CLOUD_TOKENS_PER_READING": "2000",
        },
    )
    led = CostLedger.from_settings(settings.cloud, settings.endpoint)
    assert led.unit_price("urgent") == pytest.approx(0.2)
    assert led.unit_price("batch") == pytest.approx(0.12)


@pytest.mark.parametrize(
    ("price", "discount", "tokens"),
    [(-1.0, 0.5, 1), (float("nan"), 0.5, 1), (1.0, 1.5, 1), (1.0, 0.5, 0)],
)
def test_invalid_prices_are_refused(price: float, discount: float, tokens: int) -> None:
    with pytest.raises(ValueError, match="must"):
        CostLedger(price, discount, tokens)


def test_worker_migrates_an_old_json_ledger_and_continues_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    env = {"EDGE_AGENT_CLOUD_LEDGER_PATH": str(path)}
    saved = ledger()
    saved.observe("dev-a", 10)
    saved.charge("dev-a", "urgent", cases=2, at=DAY1)
    old_json_ledger(path, saved)
    before = path.read_text()

    worker = CloudWorker(load_settings(None, env=env))  # no broker: nothing connects yet
    assert worker.ledger.summary()["devices"]["dev-a"]["urgent"] == 2
    assert worker.ledger.summary()["devices"]["dev-a"]["readings_total"] == 10
    assert (tmp_path / "ledger.json.v1.json").read_text() == before  # kept, not lost
    assert path.read_bytes().startswith(b"SQLite format 3")
    worker.stop()

    again = CloudWorker(load_settings(None, env=env))  # imported once, not at every start
    assert again.ledger.summary()["devices"]["dev-a"]["urgent"] == 2
    again.stop()


def test_worker_moves_an_unreadable_ledger_aside_and_starts_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("{ torn write")
    fresh = CloudWorker(load_settings(None, env={"EDGE_AGENT_CLOUD_LEDGER_PATH": str(path)}))
    assert fresh.ledger.summary()["total"]["urgent"] == 0
    assert (tmp_path / "ledger.json.v1.json").read_text() == "{ torn write"
    fresh.stop()


def test_an_old_ledger_moved_aside_before_a_crash_is_imported_at_the_next_start(
    tmp_path: Path,
) -> None:
    """The worker died between moving the JSON ledger aside and importing it: the next start
    imports it, and only once."""
    saved = ledger()
    saved.charge("dev-a", "urgent", cases=3, at=DAY1)
    old_json_ledger(tmp_path / "ledger.db.v1.json", saved)
    env = {"EDGE_AGENT_CLOUD_LEDGER_PATH": str(tmp_path / "ledger.db")}
    for _ in range(2):
        worker = CloudWorker(load_settings(None, env=env))
        assert worker.ledger.summary()["devices"]["dev-a"]["urgent"] == 3
        worker.stop()
