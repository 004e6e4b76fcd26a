"""Promises of docs/reliability.md about the outbox and the link's bounds, each checked on the
code a device runs: the outbox opened from settings, the link and the agent that wire it.

* a state directory that is read-only at start: ``OutboxError`` naming the path;
* ``outbox.hard_sync``: the ``synchronous`` pragma in force when a hard case is committed;
* TTLs on the monotonic clock, whatever the wall clock does;
* the bounds ``outbox.<class>_max_bytes``, ``link.max_payload_bytes``, ``link.submit_queue``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_agent.config import Settings, load_settings
from edge_agent.delivery import outbox as outbox_module
from edge_agent.delivery.link import Link
from edge_agent.delivery.outbox import ClassLimits, Cls, Outbox
from edge_agent.errors import OutboxError, OutboxFull
from edge_agent.models.pack import open_pack
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from edge_agent.service.wiring import open_outbox
from tests.conftest import make_fake_pack, puback_env
from tests.storage import read_only_dir

U, B, T = Cls.URGENT, Cls.BATCH, Cls.TELEMETRY


def settings_for(state: Path, **extra: str) -> Settings:
    return load_settings(None, env=puback_env(1, "t", state, **extra))


# -- a read-only state directory at start ------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["empty", "with-an-outbox"])
def test_a_state_dir_read_only_at_start_is_an_outbox_error_naming_the_path(
    tmp_path: Path, existing: bool
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    settings = settings_for(state)
    if existing:  # a device that ran before: an outbox with a message, closed cleanly
        ob = open_outbox(settings)
        ob.put(U, "d:1", "t", b"kept")
        ob.close()
    with read_only_dir(state) as how, pytest.raises(OutboxError) as err:
        open_outbox(settings)
    assert str(state / "outbox.db") in str(err.value), (how, err.value)
    assert "cannot open the outbox" in str(err.value)
    if existing:  # nothing was lost by the failed start
        ob = open_outbox(settings)
        assert [m.payload for m in ob.pending(U, 10)] == [b"kept"]
        ob.close()


# -- outbox.hard_sync ----------------------------------------------------------------------


def synchronous_in_force(ob: Outbox) -> int:
    """SQLite's ``synchronous`` setting on the outbox's own connection: 2 FULL, 1 NORMAL."""
    with ob._lock:
        return int(ob._db.execute("PRAGMA synchronous").fetchone()[0])


@pytest.mark.parametrize(("hard_sync", "pragma"), [("full", 2), ("normal", 1)])
def test_hard_sync_sets_the_pragma_in_force_when_hard_cases_are_committed(
    tmp_path: Path, hard_sync: str, pragma: int
) -> None:
    """Read back from SQLite, not from our own attribute: ``outbox.hard_sync`` (the
    ``EDGE_AGENT_OUTBOX_HARD_SYNC`` variable here) decides how a hard case is committed;
    telemetry is always committed with NORMAL."""
    traced: list[str] = []
    ob = open_outbox(settings_for(tmp_path / "state", outbox_hard_sync=hard_sync))
    ob._db.set_trace_callback(traced.append)
    try:
        for cls in (U, B):
            ob.put(T, f"t:{cls}", "t", b"telemetry")
            assert synchronous_in_force(ob) == 1
            traced.clear()
            ob.put(cls, f"h:{cls}", "t", b"hard case")
            assert synchronous_in_force(ob) == pragma, (hard_sync, cls)
            # ... and it was in force for the transaction that stored the hard case: it was
            # not changed between BEGIN and COMMIT.
            begin, commit = traced.index("BEGIN IMMEDIATE"), traced.index("COMMIT")
            assert not any("synchronous" in s.lower() for s in traced[begin:commit])
        # A group with a hard case in it is committed the hard way, telemetry included.
        ob.put_many([(T, "t:x", "t", b"m"), (U, "h:x", "t", b"m")])
        assert synchronous_in_force(ob) == pragma
    finally:
        ob._db.set_trace_callback(None)
        ob.close()


# -- TTLs and the wall clock ---------------------------------------------------------------


class Clocks:
    """The two clocks the outbox reads, set by the test."""

    def __init__(self) -> None:
        self.mono = 1_000.0
        self.wall = 1_800_000_000.0

    def module(self) -> SimpleNamespace:
        return SimpleNamespace(monotonic=lambda: self.mono, time=lambda: self.wall)


def test_ttls_use_the_monotonic_clock_across_wall_clock_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NTP steps the wall clock by a day forward, then two days back; the machine does not
    reboot. A message's TTL counts monotonic seconds only: it neither expires early on the
    forward step nor lives longer after the backward one."""
    clocks = Clocks()
    monkeypatch.setattr(outbox_module, "time", clocks.module())
    limits = dict.fromkeys(Cls, ClassLimits(max_rows=100, max_bytes=1 << 20, ttl_s=60.0))
    ob = Outbox(tmp_path / "outbox.db", limits, 1 << 20)
    ob.put(U, "u:1", "t", b"m")
    clocks.wall += 86_400.0  # a day forward: by the wall clock the message is long expired
    clocks.mono += 10.0
    (msg,) = ob.pending(U, 10)
    assert msg.remaining_ttl_s == pytest.approx(50.0)
    clocks.wall -= 2 * 86_400.0  # two days back: by the wall clock it has two days to live
    clocks.mono += 49.0
    assert [m.remaining_ttl_s for m in ob.pending(U, 10)] == [pytest.approx(1.0)]
    clocks.mono += 1.5
    assert ob.pending(U, 10) == []
    assert ob.counters["expired_urgent"] == 1
    assert ob.depth()["urgent"] == 0
    ob.close()


# -- bounds --------------------------------------------------------------------------------


def test_per_class_max_bytes_urgent_refuses_batch_and_telemetry_drop_their_oldest(
    tmp_path: Path,
) -> None:
    settings = settings_for(
        tmp_path / "state",
        outbox_urgent_max_bytes="1000",
        outbox_batch_max_bytes="1000",
        outbox_telemetry_max_bytes="1000",
    )
    ob = open_outbox(settings)
    for cls in (U, B, T):
        for i in range(2):
            ob.put(cls, f"{cls.name.lower()}:{i}", "t", b"x" * 400)
    with pytest.raises(OutboxFull):
        ob.put(U, "urgent:2", "t", b"x" * 400)  # 1200 bytes would be over the bound
    ob.put(B, "batch:2", "t", b"x" * 400)
    ob.put(T, "telemetry:2", "t", b"x" * 400)
    assert [m.key for m in ob.pending(U, 10)] == ["urgent:0", "urgent:1"]
    assert [m.key for m in ob.pending(B, 10)] == ["batch:1", "batch:2"]
    assert [m.key for m in ob.pending(T, 10)] == ["telemetry:1", "telemetry:2"]
    assert (ob.counters["refused_urgent"], ob.counters["dropped_batch"]) == (1, 1)
    assert ob.counters["dropped_telemetry"] == 1
    # One message larger than its class's bound is refused whatever the class (nothing to
    # drop could make room), and what was stored stays.
    for cls in (U, B, T):
        with pytest.raises(OutboxFull):
            ob.put(cls, "huge", "t", b"x" * 1001)
    assert ob.depth() == {"urgent": 2, "batch": 2, "telemetry": 2}
    assert (ob.counters["refused_batch"], ob.counters["refused_telemetry"]) == (1, 1)
    ob.close()


def test_link_refuses_payloads_over_max_payload_bytes_and_submissions_over_the_queue(
    tmp_path: Path,
) -> None:
    settings = settings_for(
        tmp_path / "state", link_max_payload_bytes="2048", link_submit_queue="3"
    )
    ob = open_outbox(settings)
    link = Link(settings, ob, "dev1")  # not started: nothing takes from the queue
    assert not link.submit(T, "t:big", "t", b"x" * 2049)
    assert link.counters["refused_too_large_telemetry"] == 1
    assert [link.submit(U, f"u:{i}", "t", b"x" * 2048) for i in range(4)] == [True] * 3 + [False]
    assert link.counters["refused_queue_full_urgent"] == 1
    assert len(link._queue) == 3
    ob.close()


def test_a_body_made_on_the_link_thread_is_refused_there_as_submit_refuses_one(
    tmp_path: Path,
) -> None:
    """A telemetry snapshot is handed over as what encodes it (``submissions.Payload``): too
    large once made, or raising, it is counted and logged on the link thread, and the
    messages around it go on, in order."""
    settings = settings_for(tmp_path / "state", link_max_payload_bytes="2048")
    ob = open_outbox(settings)
    link = Link(settings, ob, "dev1")  # not started: the test takes from the queue

    def broken() -> bytes:
        raise TypeError("not JSON-able")

    assert link.submit(T, "t:1", "t", lambda: b"1" * 10)
    assert link.submit(T, "t:big", "t", lambda: b"x" * 2049)  # known only once made
    assert link.submit(T, "t:bug", "t", broken)
    assert link.submit(T, "t:2", "t", b"2")
    assert [(key, body) for _, key, _, body in link._queue.take()] == [
        ("t:1", b"1" * 10),
        ("t:2", b"2"),
    ]
    assert link.counters["refused_too_large_telemetry"] == 1
    assert link.counters["refused_unencodable_telemetry"] == 1
    assert len(link._queue) == 0
    ob.close()


def test_the_agent_keeps_scoring_when_the_submit_queue_is_full_and_counts_the_refusals(
    tmp_path: Path,
) -> None:
    """What an operator sees: every reading gets its decision, and the hard cases the link
    could not take are counted (``hard_refused`` and ``link.refused_queue_full_*`` in
    telemetry). The link thread is not started, so nothing empties the queue."""
    settings = settings_for(
        tmp_path / "state",
        link_submit_queue="5",
        router_cooldown_s="0",
        router_max_urgent_per_minute="100000",
    )
    agent = Agent(settings, Scorer.open(open_pack(make_fake_pack(tmp_path / "pack"))))
    lines = [
        json.dumps({"id": i, "values": [[0, 0.3, 0, 0], [0, 0, 0, 0]]}).encode() for i in range(8)
    ]
    try:
        decisions = agent.pipeline.process(lines)
        assert decisions.count(b'"route":"hard"') == 8
        snap = agent.snapshot()
        assert snap["hard_urgent"] == 5
        assert snap["hard_refused"] == 3
        assert snap["link"]["refused_queue_full_urgent"] == 3
        assert len(agent.link._queue) == 5
    finally:
        agent.close()
