"""The cost ledger's database: a charge recorded once per case, in one transaction with its
figures, read back at start, shared by workers on one host, pruned, and read by operators."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cloud.books import Billed, Books
from edge_agent.cloud.intake import Answer, AnswerMemory
from edge_agent.cloud.ledger import CostLedger, Usage
from edge_agent.cloud.ledger_store import Charge, LedgerStore, open_store, summary_of
from edge_agent.errors import LedgerError
from edge_agent.wire.messages import Tier
from tests.redis_server import RedisServer

DAY = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
A = Answer("walking", 0.93, "cloud@1")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the ledger is kept: a SQLite file, or a (flushed) Redis server."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    server: RedisServer = request.getfixturevalue("redis_server")
    server.flush()
    return server.url


def ledger() -> CostLedger:
    return CostLedger(0.04, 0.5, 1500, price_prompt_per_1k=0.0025, price_completion_per_1k=0.01)


def books(path: Path | str, worker: str = "w1") -> Books:
    store = open_store(str(path), worker, "normal", 3600.0)
    b = Books(ledger(), AnswerMemory(100), Counter(), store)
    store.load(b.ledger)
    return b


def test_a_case_is_charged_once_and_its_answer_kept(where: str) -> None:
    led = ledger()
    store = open_store(where, "w1", "normal", 3600.0)
    usage = led.case_usage(Tier.URGENT)
    first = store.record([Charge("dev-a", Tier.URGENT, usage, "k1", A)], {"dev-a": 50}, DAY)
    again = store.record([Charge("dev-a", Tier.URGENT, usage, "k1", A)], {}, DAY)
    other_device = store.record([Charge("dev-b", Tier.URGENT, usage, "k1", A)], {}, DAY)
    assert first == [usage]
    assert again == [Usage()]  # already charged: nothing added
    assert other_device == [usage]  # keys are per device
    assert store.answer("dev-a", "k1") == A
    assert store.answer("dev-a", "k2") is None
    store.close()

    reread = ledger()
    open_store(where, "w2", "normal", 3600.0).load(reread)
    dev = reread.summary()["devices"]["dev-a"]
    assert (dev["urgent"], dev["tokens"], dev["readings_total"]) == (1, 1500, 50)
    assert dev["spend"] == pytest.approx(0.06)


def test_a_billed_request_counts_even_when_its_case_was_answered_elsewhere(where: str) -> None:
    b1, b2 = books(where, "w1"), books(where, "w2")
    b1.billed([Billed("dev-a", Tier.URGENT, 100, 5, "k1", A)])
    # A second worker asked the endpoint for the same case before it saw the first answer:
    # the endpoint billed that request too, but the case is one case.
    b2.billed([Billed("dev-a", Tier.URGENT, 120, 5, "k1", A)])
    reread = ledger()
    open_store(where, "w3", "normal", 3600.0).load(reread)
    dev = reread.summary()["devices"]["dev-a"]
    assert (dev["urgent"], dev["calls"], dev["prompt_tokens"]) == (1, 2, 220)
    assert dev["spend"] == pytest.approx((220 * 0.0025 + 10 * 0.01) / 1000)
    assert b2.ledger.summary()["devices"]["dev-a"]["urgent"] == 0  # as the database added it


def test_workers_sharing_the_ledger_answer_each_others_cases_without_charging(
    where: str,
) -> None:
    b1, b2 = books(where, "w1"), books(where, "w2")
    b1.answered("dev-a", Tier.BATCH, [("k1", A), ("k2", A)])
    assert b2.known("dev-a", "k1") == A  # the re-sent copy reached the other worker
    assert b2.counters["answered_from_ledger"] == 1
    b2.answered("dev-a", Tier.BATCH, [("k2", A)])  # scored there anyway: charged once
    assert b2.counters["charged_already"] == 1
    total = summary_of(where)["total"]
    assert (total["batch"], total["urgent"]) == (2, 0)
    assert total["spend"] == pytest.approx(2 * 0.03)


def test_nothing_is_added_in_memory_when_the_database_refuses(tmp_path: Path) -> None:
    b = books(tmp_path / "l.db")
    b.observe("dev-a", 7)
    blocker = sqlite3.connect(tmp_path / "l.db", timeout=0)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
    assert isinstance(b.store, LedgerStore)  # the SQLite store
    b.store._db.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(LedgerError, match="cannot write the cost ledger"):
        b.answered("dev-a", Tier.URGENT, [("k1", A)])
    assert b.ledger.summary()["total"]["urgent"] == 0
    assert b.memory.get("dev-a", "k1") is None  # not remembered: it was not answered
    blocker.rollback()
    b.answered("dev-a", Tier.URGENT, [("k1", A)])
    assert summary_of(tmp_path / "l.db")["devices"]["dev-a"]["readings_total"] == 7


def test_old_answers_are_pruned_and_figures_kept(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "l.db", "w1")
    usage = ledger().case_usage(Tier.URGENT)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    store.record([Charge("dev-a", Tier.URGENT, usage, "old", A)], {}, old)
    store.record([Charge("dev-a", Tier.URGENT, usage, "new", A)], {})
    assert store.prune(answers_keep_s=3600) == 1
    assert store.answer("dev-a", "old") is None
    assert store.answer("dev-a", "new") == A
    reread = ledger()
    store.load(reread)
    assert reread.summary()["total"]["urgent"] == 2


def test_summary_of_reads_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    b = books(path)
    b.observe("dev-a", 900)
    b.answered("dev-a", Tier.URGENT, [("k1", A)])
    b.store.close()  # type: ignore[union-attr]
    path.chmod(0o444)
    summary = summary_of(path)
    assert summary["devices"]["dev-a"]["urgent"] == 1
    assert summary["devices"]["dev-a"]["all_cloud_sync"] == pytest.approx(900 * 0.06)
    assert summary == b.ledger.summary()


def test_unusable_paths_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(LedgerError, match="cannot open the cost ledger"):
        LedgerStore(tmp_path / "folder", "w1")
    (tmp_path / "junk").write_bytes(b"\x00\x01 not a ledger")
    with pytest.raises(LedgerError, match="not a cost ledger"):
        summary_of(tmp_path / "junk")
    with pytest.raises(LedgerError, match="not a cost ledger"):
        summary_of(tmp_path / "missing.db")


def test_workers_opening_a_new_ledger_at_once_all_open_it(tmp_path: Path) -> None:
    """Two or more workers started together on a new ledger file: each opens it (seen in CI:
    "database is locked" at once, whatever the busy timeout, while another connection
    switched the new file to WAL and wrote the schema)."""
    import multiprocessing  # noqa: PLC0415

    ctx = multiprocessing.get_context("fork")
    for round_ in range(15):
        path = tmp_path / f"ledger-{round_}.db"
        start = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_after, args=(start, path, f"w{i}")) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], round_


def _open_after(start: Any, path: Path, worker: str) -> None:
    start.wait()
    LedgerStore(path, worker).close()
