"""Who takes the telemetry snapshots: the scoring loop while it runs (``maybe_tick``
after each group), the telemetry thread when the loop stops coming by.

The bounds are wide on purpose: they check who ticks and that the period holds, not how
fast a busy machine wakes a thread."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from edge_agent.service.telemetry import TelemetryThread

INTERVAL_S = 0.05


class _Taker:
    """A snapshot function that writes down which thread called it, and when."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, float]] = []
        self.fail = fail

    def __call__(self) -> dict[str, Any]:
        self.calls.append((threading.current_thread().name, time.monotonic()))
        if self.fail:
            raise ValueError("a snapshot's bug")
        return {"n": len(self.calls)}


def _loop(telemetry: TelemetryThread, seconds: float) -> None:
    """A scoring loop whose groups take about a millisecond."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.001)
        telemetry.maybe_tick()


def test_the_loop_takes_every_snapshot_while_it_runs_and_the_thread_when_it_stops() -> None:
    taker = _Taker()
    telemetry = TelemetryThread(INTERVAL_S, taker, None, None)
    main = threading.current_thread().name
    telemetry.start()
    try:
        _loop(telemetry, 1.0)
        by_loop = list(taker.calls)
        # The loop came by every millisecond: the thread never took one (it would have
        # taken a snapshot only GRACE of an interval overdue).
        assert {name for name, _ in by_loop} == {main}
        assert telemetry.by_loop == len(by_loop)
        assert 10 <= len(by_loop) <= 21, len(by_loop)
        # The loop stops coming by: the thread looks within CHECK_MIN_S and takes over,
        # each snapshot an interval after the one before.
        time.sleep(TelemetryThread.CHECK_MIN_S + 0.8)
        by_thread = taker.calls[len(by_loop) :]
        assert {name for name, _ in by_thread} == {"edge-agent-telemetry"}
        assert len(by_thread) >= 5, len(by_thread)
        gaps = [b - a for (_, a), (_, b) in itertools.pairwise(by_thread)]
        assert min(gaps) >= 0.5 * INTERVAL_S, gaps
        # And the loop, back, takes the beat over again.
        before = len(taker.calls)
        _loop(telemetry, 0.5)
        last = [name for name, _ in taker.calls[before:]][-3:]
        assert last == [main] * 3, taker.calls[before:]
    finally:
        telemetry.halt()
    halted = len(taker.calls)
    _loop(telemetry, 0.2)
    assert len(taker.calls) == halted, "halted telemetry took a snapshot"


def test_a_snapshot_that_raises_is_counted_and_does_not_reach_the_scoring_loop() -> None:
    taker = _Taker(fail=True)
    telemetry = TelemetryThread(INTERVAL_S, taker, None, None)
    telemetry.start()
    try:
        _loop(telemetry, 0.5)  # would raise out of the loop if maybe_tick let it through
    finally:
        telemetry.halt()
    assert telemetry.failed == len(taker.calls) >= 5


def test_the_loop_publishes_its_snapshot_after_the_next_group_and_halt_sends_a_taken_one() -> None:
    taker = _Taker()
    sent: list[dict[str, Any]] = []
    telemetry = TelemetryThread(3600.0, taker, sent.append, None)  # the thread never ticks
    telemetry.start()
    try:
        telemetry._due = 0.0  # one is due now
        telemetry.maybe_tick()  # after a group: the snapshot
        assert (len(taker.calls), sent) == (1, [])
        assert telemetry.latest["n"] == 1
        telemetry.maybe_tick()  # after the next: its publishing
        assert [s["n"] for s in sent] == [1]
        telemetry.maybe_tick()  # nothing due
        telemetry._due = 0.0
        telemetry.maybe_tick()
        assert (len(taker.calls), len(sent)) == (2, 1)
    finally:
        telemetry.halt()
    assert [s["n"] for s in sent] == [1, 2], "a snapshot taken before halt was not sent"
    assert all("time_unix" in s for s in sent)


def test_the_thread_sends_a_snapshot_the_loop_left_and_takes_the_next_with_it() -> None:
    """The loop stops right after the first step of a snapshot: the thread sends it when it
    takes over, and takes the next one (due as well) at once, not a look later."""
    taker = _Taker()
    sent: list[tuple[int, float]] = []
    telemetry = TelemetryThread(0.2, taker, lambda s: sent.append((s["n"], time.monotonic())), None)
    telemetry.start()
    try:
        telemetry._due = 0.0
        telemetry.maybe_tick()  # the loop's first step, and then no more groups
        end = time.monotonic() + 2 * TelemetryThread.CHECK_MIN_S + 1.0
        while len(sent) < 2 and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        telemetry.halt()
    assert [n for n, _ in sent[:2]] == [1, 2], sent
    assert sent[1][1] - sent[0][1] < 0.5 * TelemetryThread.CHECK_MIN_S, sent
