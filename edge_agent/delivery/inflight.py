"""The link's book of what it sent and has not yet forgotten (link thread only; no I/O).

* in flight: publishes awaiting their PUBACK, by MQTT message id, with their outbox rows;
* awaiting: hard cases the broker took, awaiting the cloud's verdict, by outbox row, with the
  connection ("generation") the broker took them on — a broker that drops that connection
  may have died holding them, so they are sent again at once on the next one;
* held: rows not to be sent again before a time (a refused publish, no subscriber yet, a
  verdict not come within ``link.confirm_timeout_s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.delivery.outbox import Cls


@dataclass(slots=True)
class Inflight:
    ids: list[int]
    cls: Cls


class Book:
    """See the module docstring; ``clock`` is the monotonic clock (injected in tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.inflight: dict[int, Inflight] = {}
        self.held: dict[int, float] = {}  #: row id -> monotonic time it may be retried
        self.awaiting: dict[int, int] = {}  #: row id -> generation the broker took it on
        self.generation = 0

    def connected(self) -> None:
        """A new connection: what is taken from now on is taken on it."""
        self.generation += 1

    def sent(self, mid: int, ids: list[int], cls: Cls) -> None:
        self.inflight[mid] = Inflight(ids, cls)

    def acknowledged(self, mid: int) -> Inflight | None:
        """The broker's PUBACK for ``mid``: its entry (None: not ours, or of a lost link)."""
        return self.inflight.pop(mid, None)

    def hold(self, ids: list[int], pause_s: float) -> None:
        retry_at = self.clock() + pause_s
        for row in ids:
            self.held[row] = retry_at

    def await_verdict(self, ids: list[int], timeout_s: float) -> None:
        """The broker took these hard cases; a verdict settles them, else they go again."""
        self.awaiting.update(dict.fromkeys(ids, self.generation))
        self.hold(ids, timeout_s)

    def lost(self) -> int:
        """The connection is lost: forget what was in flight (it is still in the outbox and
        is replayed) and hold for an immediate resend what the broker took on it. Returns
        how many rows were in flight."""
        replayed = sum(len(f.ids) for f in self.inflight.values())
        self.inflight.clear()
        now = self.clock()
        for row, generation in self.awaiting.items():
            if generation == self.generation:
                self.held[row] = now
        return replayed

    def settled(self, rows: list[int]) -> list[Cls]:
        """The cloud answered these rows: forget them. Returns the classes of those whose
        verdict overtook the broker's PUBACK (published, with nothing left to wait for)."""
        overtaken: list[Cls] = []
        for row in rows:
            if self.awaiting.pop(row, None) is not None:
                self.held.pop(row, None)
                continue
            for entry in self.inflight.values():
                if row in entry.ids:
                    entry.ids.remove(row)
                    overtaken.append(entry.cls)
                    break
        return overtaken

    def release_due(self) -> tuple[bool, int]:
        """Release held rows whose time has come: (any released, how many of them were
        awaiting a verdict that did not come — they are sent again)."""
        now = self.clock()
        if not self.held or min(self.held.values()) > now:
            return False, 0
        unconfirmed = 0
        for row in [k for k, t in self.held.items() if t <= now]:
            del self.held[row]
            if self.awaiting.pop(row, None) is not None:
                unconfirmed += 1
        return True, unconfirmed

    def busy(self) -> set[int]:
        """Rows not to be read from the outbox now (in flight or held)."""
        return {row for f in self.inflight.values() for row in f.ids} | set(self.held)

    def next_due(self) -> list[float]:
        """Times at which held rows come due (at most 1000 of them, for the loop's timeout)."""
        return list(self.held.values())[:1000]
