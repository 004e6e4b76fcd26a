"""The link's book of what it sent (delivery/inflight.py): pure, with an injected clock."""

from __future__ import annotations

from edge_agent.delivery.inflight import Book
from edge_agent.delivery.outbox import Cls


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_lost_connection_replays_what_was_in_flight_and_resends_what_the_broker_took() -> None:
    clock = Clock()
    book = Book(clock)
    book.connected()
    book.sent(1, [10, 11], Cls.BATCH)  # in flight: no PUBACK yet
    book.sent(2, [12], Cls.URGENT)
    entry = book.acknowledged(2)
    assert entry is not None
    assert entry.ids == [12]
    book.await_verdict(entry.ids, timeout_s=30.0)  # the broker took it: wait for the verdict
    assert book.busy() == {10, 11, 12}
    assert book.release_due() == (False, 0)
    assert book.lost() == 2  # rows 10 and 11 go again from the outbox
    assert book.inflight == {}
    # Row 12 was taken on the lost connection: due at once, counted as unconfirmed.
    assert book.release_due() == (True, 1)
    assert book.busy() == set()


def test_a_verdict_settles_a_row_and_one_before_its_puback_counts_as_published() -> None:
    book = Book(Clock())
    book.connected()
    book.sent(1, [20, 21], Cls.URGENT)
    entry = book.acknowledged(1)
    assert entry is not None
    book.await_verdict([20], timeout_s=30.0)
    book.sent(2, [22], Cls.BATCH)
    # 20 awaited its verdict; 22's verdict overtook the broker's PUBACK.
    assert book.settled([20, 22]) == [Cls.BATCH]
    assert book.awaiting == {}
    assert book.held == {}
    assert book.inflight[2].ids == []


def test_held_rows_come_due_at_their_time_and_old_connections_are_not_resent() -> None:
    clock = Clock()
    book = Book(clock)
    book.connected()
    book.await_verdict([30], timeout_s=5.0)
    book.connected()  # a new connection: 30 was taken on the previous one
    book.hold([31], pause_s=1.0)
    assert book.lost() == 0
    assert book.held == {30: 105.0, 31: 101.0}  # the new connection's loss does not touch 30
    clock.t = 101.0
    assert book.release_due() == (True, 0)
    assert book.busy() == {30}
    clock.t = 105.0
    assert book.release_due() == (True, 1)  # 30 never got its verdict: sent again
    assert book.next_due() == []
