from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from edge_agent.config import load_settings
from edge_agent.delivery import outbox as outbox_module
from edge_agent.delivery.outbox import SEQ_PER_RUN, ClassLimits, Cls, Outbox
from edge_agent.errors import OutboxFull
from edge_agent.models.pack import open_pack
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from edge_agent.wire.messages import HardCase
from tests.conftest import make_fake_pack, puback_env

U, B, T = Cls.URGENT, Cls.BATCH, Cls.TELEMETRY


def make(path: Path, rows: int = 100, total: int = 1 << 20, ttl: float = 3600.0) -> Outbox:
    limits = dict.fromkeys(Cls, ClassLimits(max_rows=rows, max_bytes=1 << 20, ttl_s=ttl))
    return Outbox(path / "outbox.db", limits, total)


def test_put_pending_ack_and_order(tmp_path: Path) -> None:
    ob = make(tmp_path)
    ids = [ob.put(B, f"d:{i}", "t/batch", b"x%d" % i) for i in range(5)]
    ob.put(U, "d:u", "t/hard", b"urgent")
    assert ob.depth() == {"urgent": 1, "batch": 5, "telemetry": 0}
    assert [m.key for m in ob.pending(B, 3)] == ["d:0", "d:1", "d:2"]
    assert [m.key for m in ob.pending(B, 3, skip={ids[0]})] == ["d:1", "d:2", "d:3"]
    assert ob.ack(ids[:2]) == 2
    assert ob.ack(ids[:2]) == 0  # already gone
    assert [m.key for m in ob.pending(B, 10)] == ["d:2", "d:3", "d:4"]
    assert ob.counters["acked_batch"] == 2
    ob.close()


def test_survives_reopen_and_sequence_never_repeats(tmp_path: Path) -> None:
    ob = make(tmp_path)
    first = [ob.next_seq() for _ in range(3)]
    ob.put(U, "d:1", "t", b"keep me")
    ob.close()
    ob2 = make(tmp_path)
    assert [m.payload for m in ob2.pending(U, 10)] == [b"keep me"]
    second = ob2.next_seq()
    assert second > max(first)
    assert second // SEQ_PER_RUN == first[0] // SEQ_PER_RUN + 1
    assert ob2.integrity_check() == "ok"


def test_telemetry_and_batch_drop_oldest_when_full(tmp_path: Path) -> None:
    ob = make(tmp_path, rows=3)
    for i in range(5):
        ob.put(T, f"t:{i}", "t", b"m")
        ob.put(B, f"b:{i}", "t", b"m")
    assert [m.key for m in ob.pending(T, 10)] == ["t:2", "t:3", "t:4"]
    assert [m.key for m in ob.pending(B, 10)] == ["b:2", "b:3", "b:4"]
    assert ob.counters["dropped_telemetry"] == 2
    assert ob.counters["dropped_batch"] == 2


def test_urgent_refuses_at_its_own_bound(tmp_path: Path) -> None:
    ob = make(tmp_path, rows=2)
    ob.put(U, "u:1", "t", b"m")
    ob.put(U, "u:2", "t", b"m")
    with pytest.raises(OutboxFull):
        ob.put(U, "u:3", "t", b"m")
    assert ob.counters["refused_urgent"] == 1
    assert [m.key for m in ob.pending(U, 10)] == ["u:1", "u:2"]


def test_urgent_evicts_telemetry_then_batch_then_refuses(tmp_path: Path) -> None:
    ob = make(tmp_path, total=1000)
    ob.put(T, "t:1", "t", b"x" * 300)
    ob.put(B, "b:1", "t", b"x" * 300)
    ob.put(B, "b:2", "t", b"x" * 300)
    ob.put(U, "u:1", "t", b"x" * 300)  # evicts telemetry
    assert ob.depth() == {"urgent": 1, "batch": 2, "telemetry": 0}
    assert ob.counters["evicted_telemetry"] == 1
    ob.put(U, "u:2", "t", b"x" * 300)  # evicts the oldest batch case
    assert [m.key for m in ob.pending(B, 10)] == ["b:2"]
    ob.put(U, "u:3", "t", b"x" * 300)
    with pytest.raises(OutboxFull):
        ob.put(U, "u:4", "t", b"x" * 300)
    assert ob.counters["evicted_batch"] == 2
    assert ob.counters["refused_urgent"] == 1
    assert ob.bytes_used() <= 1000


def test_put_many_refuses_items_one_by_one(tmp_path: Path) -> None:
    ob = make(tmp_path, rows=1)
    results = ob.put_many([(U, "u:1", "t", b"a"), (U, "u:2", "t", b"b"), (T, "t:1", "t", b"c")])
    assert isinstance(results[0], int)
    assert isinstance(results[1], OutboxFull)
    assert isinstance(results[2], int)


def test_expired_messages_are_never_returned_and_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ob = make(tmp_path, ttl=1.0)
    ob.put(U, "u:1", "t", b"old")
    # 1.1 s pass on the monotonic clock (the outbox's clock for TTLs), without waiting them.
    later = time.monotonic() + 1.1
    clock = SimpleNamespace(monotonic=lambda: later, time=time.time)
    monkeypatch.setattr(outbox_module, "time", clock)
    ob.put(U, "u:2", "t", b"new")
    assert [m.key for m in ob.pending(U, 10)] == ["u:2"]
    assert ob.counters["expired_urgent"] == 1
    assert ob.depth()["urgent"] == 1


def test_expiry_uses_wall_clock_after_a_reboot(tmp_path: Path) -> None:
    ob = make(tmp_path, ttl=3600)
    ob.put(U, "u:1", "t", b"m")
    ob.close()
    db = sqlite3.connect(tmp_path / "outbox.db")
    # Another boot, whose monotonic clock says "not expired" but wall clock says expired.
    db.execute("UPDATE messages SET boot_id = 'other-boot', expires_wall = 1.0")
    db.commit()
    db.close()
    ob2 = make(tmp_path)
    assert ob2.pending(U, 10) == []
    assert ob2.counters["expired_urgent"] == 1


def test_read_only_state_is_an_error_not_a_crash(tmp_path: Path) -> None:
    ob = make(tmp_path)
    ob.put(T, "t:1", "t", b"m")
    ob._db.execute("PRAGMA query_only = ON")  # simulates a store that refuses writes
    results = ob.put_many([(U, "u:1", "t", b"m"), (T, "t:2", "t", b"m")])
    assert all(not isinstance(r, int) for r in results)
    assert ob.counters["write_errors_urgent"] == 1
    assert ob.counters["dropped_telemetry"] == 1
    assert ob.depth() == {"urgent": 0, "batch": 0, "telemetry": 1}


def test_counters_survive_reopen(tmp_path: Path) -> None:
    ob = make(tmp_path / "o.db")
    assert ob.counter("readings_total") == 0
    ob.save_counter("readings_total", 1234)
    ob.close()
    assert make(tmp_path / "o.db").counter("readings_total") == 1234


def test_readings_total_in_hard_cases_keeps_counting_after_a_restart(tmp_path: Path) -> None:
    """The cloud's all-cloud figure uses the highest ``readings_total`` a device reported."""
    pack = make_fake_pack(tmp_path / "pack")
    settings = load_settings(None, env=puback_env(1, "t", tmp_path / "state"))
    line = b'{"values": [[0, 0.3, 0, 0], [0, 0, 0, 0]]}'  # confidence 0.3: a hard case
    totals = []
    for _ in range(2):
        agent = Agent(settings, Scorer.open(open_pack(pack)))
        agent.pipeline.process([line] * 5)
        handed = agent.link._queue.take()
        assert len(handed) == 5
        _, _, _, payload = handed[0]
        totals.append(msgspec.json.decode(payload, type=HardCase).readings_total)
        agent.close()
    assert totals == [1, 6]


def test_one_number_at_a_time_continues_the_groups_across_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``next_seq`` (a lone reading) and ``next_seqs`` (a group) draw from one sequence, in
    order, with no gap and no repeat, a new run started past ``SEQ_PER_RUN`` included."""
    monkeypatch.setattr(outbox_module, "SEQ_PER_RUN", 5)
    ob = make(tmp_path)
    got: list[int] = []
    for i in range(12):
        got += [ob.next_seq()] if i % 2 else ob.next_seqs(i % 3 + 1)
    ob.close()
    assert len(set(got)) == len(got)
    assert got == sorted(got)
    runs = [s // 5 for s in got]
    # Within a run consecutive; a new run when one is used up.
    for a, b, ra, rb in zip(got, got[1:], runs, runs[1:], strict=False):
        assert b == a + 1 if ra == rb else rb > ra
