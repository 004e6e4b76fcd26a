"""What the worker knows of the cases it answered and what they cost: its answer memory, its
cost ledger, and (with ``cloud.ledger_path``) the ledger's database, kept in step.

The order is the promise: a case's charge is committed to the database *before* its verdict
is published, and added to the in-memory ledger only as the database recorded it. So a worker
killed at any moment leaves no answered case uncharged (its verdict never went out unless its
charge was on disk), and no case charged twice (the database refuses a second charge of the
same device and key, and a re-sent copy is answered from what it recorded).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from edge_agent.cloud.intake import Answer, AnswerMemory
from edge_agent.cloud.ledger import CostLedger, Usage
from edge_agent.cloud.ledger_store import Charge, Store, open_store
from edge_agent.config import CloudSettings
from edge_agent.errors import LedgerError
from edge_agent.wire.messages import Tier

log = logging.getLogger(__name__)


class Billed(NamedTuple):
    """One finished endpoint request: its case, its reply's tokens, its answer (None: no
    answer). ``reported``: the reply carried a ``usage``; without one the answer is recorded
    (so a re-sent copy is not asked for again) but nothing is charged."""

    device: str
    tier: Tier
    prompt_tokens: int
    completion_tokens: int
    key: str
    answer: Answer | None
    reported: bool = True


@dataclass
class Books:
    """The answer memory, the cost ledger and the ledger's database (optional) of one worker."""

    ledger: CostLedger
    memory: AnswerMemory
    counters: Counter[str]
    store: Store | None = None
    _readings: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        cloud: CloudSettings,
        worker_id: str,
        ledger: CostLedger,
        memory: AnswerMemory,
        counters: Counter[str],
    ) -> Books:
        """The books of a worker: with ``cloud.ledger_path``, its database opened and its
        figures loaded into ``ledger``; raises LedgerError when it cannot be opened."""
        if not cloud.ledger_path:
            return cls(ledger, memory, counters)
        store = open_store(cloud.ledger_path, worker_id, cloud.ledger_sync, cloud.answers_keep_s)
        books = cls(ledger, memory, counters, store)
        try:
            store.load(ledger)
        except LedgerError:
            store.close()
            raise
        books.prune(cloud.answers_keep_s)
        return books

    def prune(self, answers_keep_s: float) -> None:
        """Forget answers older than ``answers_keep_s`` (no-op without a database)."""
        if self.store is None:
            return
        try:
            gone = self.store.prune(answers_keep_s)
        except LedgerError as exc:
            self.counters["ledger_write_failed"] += 1
            log.error("%s", exc)
            return
        if gone:
            log.info("forgot %d answers older than %.0f s", gone, answers_keep_s)

    def known(self, device: str, key: str) -> Answer | None:
        """The answer already given to this case, from memory or from the ledger's database
        (a case some worker answered earlier, then crashed before the device heard of it)."""
        answer = self.memory.get(device, key)
        if answer is None and self.store is not None:
            answer = self.store.answer(device, key)
            if answer is not None:
                self.counters["answered_from_ledger"] += 1
                self.memory.put(device, key, answer)
        return answer

    def observe(self, device: str, readings_total: int) -> None:
        """A device's readings count, recorded with its next charge."""
        self.ledger.observe(device, readings_total)
        if self.store is not None and readings_total > self._readings.get(device, -1):
            self._readings[device] = readings_total

    def answered(self, device: str, tier: Tier, answers: list[tuple[str, Answer]]) -> None:
        """Cases scored by the cloud pack: charge each (once) and remember its answer.

        Raises LedgerError when the database could not record them; then nothing was charged
        and the caller must not answer them.
        """
        usage = self.ledger.case_usage(tier)
        self._record(
            [Charge(device, tier, usage, key, answer) for key, answer in answers],
        )
        for key, answer in answers:
            self.memory.put(device, key, answer)

    def billed(self, requests: list[Billed]) -> None:
        """Endpoint requests finished: record what they cost and the answers they gave.
        Raises LedgerError as ``answered`` does."""
        charges = []
        for b in requests:
            answered = b.answer is not None
            usage = (
                self.ledger.request_usage(
                    b.tier, b.prompt_tokens, b.completion_tokens, answered=answered
                )
                if b.reported
                else Usage()
            )
            key = b.key if answered else None
            charges.append(Charge(b.device, b.tier, usage, key, b.answer, billed=b.reported))
        self._record(charges)

    def _record(self, charges: list[Charge]) -> None:
        if not charges:
            return
        if self.store is None:
            added = [c.usage for c in charges]
        else:
            readings, self._readings = self._readings, {}
            try:
                added = self.store.record(charges, readings)
            except BaseException:
                for device, total in readings.items():  # recorded with the next charge
                    self._readings[device] = max(total, self._readings.get(device, -1))
                raise
        for c, usage in zip(charges, added, strict=True):
            if usage != Usage():
                self.ledger.apply(c.device, usage)
            elif c.key is not None and c.usage != Usage():
                self.counters["charged_already"] += 1
