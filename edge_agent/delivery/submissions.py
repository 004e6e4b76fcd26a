"""The hand-over of messages from any thread (the scoring loop, rollout, telemetry) to the
link thread: bounded, never blocking, every refusal counted and logged.

A deque, not a ``queue.Queue``: nobody blocks on it (the link thread sleeps in ``select``
and is woken by its waker), and a Queue's lock and condition cost a telemetry snapshot
handed over by the scoring loop ~18 us at p50 there, a deque ~9 us (AMD EPYC; the loop
hands it over between two readings, the model's run having just used the caches).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable

from edge_agent.delivery.outbox import Cls

log = logging.getLogger(__name__)

#: A message's body as ``Submissions.put`` takes it: its bytes, or what makes them, called
#: on the link thread. A telemetry snapshot is encoded there: on the scoring loop its
#: encoding cost ~34 us at p50 against ~6 us alone (AMD EPYC, as above).
Payload = bytes | Callable[[], bytes]
Submitted = tuple[Cls, str, str, bytes]  # class, idempotency key, topic, body


class Submissions:
    """At most ``size`` messages waiting for the link thread (submitters racing past the
    length check can overfill it by one each); bodies over ``max_bytes`` are refused."""

    def __init__(self, size: int, max_bytes: int, counters: Counter[str]) -> None:
        self._items: deque[tuple[Cls, str, str, Payload]] = deque()
        self.size = size
        self.max_bytes = max_bytes
        self.counters = counters

    def __len__(self) -> int:
        return len(self._items)

    def put(self, cls: Cls, key: str, topic: str, payload: Payload) -> bool:
        """Any thread: False (counted, logged) if full or its body is too large."""
        if not callable(payload) and not self._fits(cls, key, payload):
            return False
        if len(self._items) >= self.size:
            self.counters[f"refused_queue_full_{cls.name.lower()}"] += 1
            log.error("link queue full: %s message %s refused", cls.name.lower(), key)
            return False
        self._items.append((cls, key, topic, payload))
        return True

    def take(self, limit: int = 1000) -> list[Submitted]:
        """The link thread (the only one taking): up to ``limit`` messages in order, their
        bodies made. A body that cannot be made, or is too large, is refused as ``put``
        refuses one; a snapshot's bug never ends the link thread."""
        out: list[Submitted] = []
        items = self._items
        while items and len(out) < limit:
            cls, key, topic, payload = items.popleft()
            if callable(payload):
                try:
                    payload = payload()
                except Exception:
                    self.counters[f"refused_unencodable_{cls.name.lower()}"] += 1
                    log.exception("message %s could not be encoded", key)
                    continue
                if not self._fits(cls, key, payload):
                    continue
            out.append((cls, key, topic, payload))
        return out

    def _fits(self, cls: Cls, key: str, payload: bytes) -> bool:
        if len(payload) <= self.max_bytes:
            return True
        self.counters[f"refused_too_large_{cls.name.lower()}"] += 1
        log.error("message %s of %d bytes is over link.max_payload_bytes", key, len(payload))
        return False
