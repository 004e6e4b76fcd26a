"""The cost ledger on disk: every answered case recorded before its verdict goes out.

A SQLite database in WAL mode (``cloud.ledger_path``) with three tables:

* ``answered`` — one row per (device, idempotency key) the cloud answered: the tier it was
  charged in, when, and the answer itself. The primary key makes a charge idempotent: a case
  that is already there is not charged again, and a re-sent copy is answered from the row
  (so a worker that was killed after recording an answer but before its verdict reached the
  device does not score, nor charge, the copy the device sends again).
* ``usage`` — the ledger's figures per UTC day and device (cases, tokens, spend, endpoint
  calls), updated in the same transaction as the ``answered`` rows they count.
* ``devices`` — the highest ``readings_total`` each device reported (the all-cloud
  counterfactual).

One transaction per urgent case, one per batch chunk (or per finished group of endpoint
requests); it is committed before the verdict is published. With ``cloud.ledger_sync =
"normal"`` a commit survives the worker's crash or SIGKILL (the WAL is in the operating
system's hands); ``"full"`` also fsyncs it, so it survives a power cut, at the cost of one
fsync per transaction. Workers on one host may share one ledger file (SQLite locks it; a
writer waits up to ``BUSY_TIMEOUT_S``): a case is then charged once whichever of them answers
it. Workers on different hosts need a file each (SQLite over a network file system is not
safe) and do not see each other's answers.

``answered`` rows are kept ``cloud.answers_keep_s`` (longer than a device keeps a case in its
outbox, so that every copy it can still send is recognised) and then pruned; the figures in
``usage`` are kept ``LEDGER_KEEP_DAYS`` days. A ledger file of the earlier JSON format found
at the path is imported and kept beside it as ``<path>.v1.json``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edge_agent.cloud.intake import Answer
from edge_agent.cloud.ledger import LEDGER_KEEP_DAYS, CostLedger, Usage
from edge_agent.errors import ConfigError, LedgerError
from edge_agent.wire.messages import Tier

log = logging.getLogger(__name__)

#: Longest wait for another worker's write transaction on a shared ledger file.
BUSY_TIMEOUT_S = 10.0
#: The first bytes of every SQLite database file.
_SQLITE_MAGIC = b"SQLite format 3\x00"
STORE_SCHEMA = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS answered (
    device TEXT NOT NULL,
    key TEXT NOT NULL,
    tier TEXT NOT NULL,
    at REAL NOT NULL,
    label TEXT NOT NULL,
    confidence REAL NOT NULL,
    model TEXT NOT NULL,
    worker TEXT NOT NULL,
    PRIMARY KEY (device, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answered_at ON answered (at);
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    device TEXT NOT NULL,
    urgent INTEGER NOT NULL DEFAULT 0,
    batch INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    spend_urgent REAL NOT NULL DEFAULT 0,
    spend_batch REAL NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    readings_total INTEGER NOT NULL
) WITHOUT ROWID;
"""

FIELDS = (
    "urgent",
    "batch",
    "tokens",
    "spend_urgent",
    "spend_batch",
    "calls",
    "prompt_tokens",
    "completion_tokens",
)
_ADD_USAGE = """
INSERT INTO usage (day, device, urgent, batch, tokens, spend_urgent, spend_batch, calls,
                   prompt_tokens, completion_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, device) DO UPDATE SET
    urgent = urgent + excluded.urgent,
    batch = batch + excluded.batch,
    tokens = tokens + excluded.tokens,
    spend_urgent = spend_urgent + excluded.spend_urgent,
    spend_batch = spend_batch + excluded.spend_batch,
    calls = calls + excluded.calls,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""
_READ_USAGE = """
SELECT day, device, urgent, batch, tokens, spend_urgent, spend_batch, calls, prompt_tokens,
       completion_tokens
FROM usage
"""


@dataclass(frozen=True, slots=True)
class Charge:
    """One thing to record: a case answered and what it costs, or a billed request.

    ``key``/``answer``: the case answered (both None for an endpoint request whose reply was
    no answer). ``billed``: the cost is a request the endpoint billed, so it counts even when
    the case was already answered elsewhere (only the case count is then left out); an
    estimate for a case scored by the cloud pack counts only the first time.
    """

    device: str
    tier: Tier
    usage: Usage
    key: str | None = None
    answer: Answer | None = None
    billed: bool = False


class Store(Protocol):
    """Where the ledger is kept: this SQLite file, or Redis (``ledger_redis.py``)."""

    path: Any

    def load(self, ledger: CostLedger) -> None: ...
    def answer(self, device: str, key: str) -> Answer | None: ...
    def record(
        self, charges: list[Charge], readings: dict[str, int], at: dt.datetime | None = None
    ) -> list[Usage]: ...
    def prune(self, answers_keep_s: float, keep_days: int = LEDGER_KEEP_DAYS) -> int: ...
    def close(self) -> None: ...


def is_redis(where: str | os.PathLike[str]) -> bool:
    """``cloud.ledger_path`` names a Redis server rather than a file."""
    return str(where).startswith(("redis://", "rediss://", "unix://"))


def open_store(path: str, worker: str, sync: str, answers_keep_s: float) -> Store:
    """The ledger's store that ``cloud.ledger_path`` names (raises LedgerError/ConfigError)."""
    if is_redis(path):
        store: Store = _redis().RedisLedgerStore(path, worker, answers_keep_s)
        return store
    return LedgerStore(path, worker, sync)


def _redis() -> Any:
    """``ledger_redis``, imported only when the ledger is in Redis (extra ``cloud-redis``)."""
    try:
        from edge_agent.cloud import ledger_redis  # noqa: PLC0415 - an optional extra
    except ImportError as exc:
        raise ConfigError(
            "cloud.ledger_path names Redis, but redis-py is not installed:"
            " pip install 'edge-agent[cloud-redis]'"
        ) from exc
    return ledger_redis


class LedgerStore:
    """The ledger's SQLite file; see the module docstring. Thread-safe."""

    def __init__(self, path: str | os.PathLike[str], worker: str, sync: str = "normal") -> None:
        self.path = Path(path)
        self.worker = worker
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._move_old_format()
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot open the cost ledger: {exc}") from exc
        self._db = self._connect(sync)

    def _connect(self, sync: str) -> sqlite3.Connection:
        """Open the file, in WAL mode, with the schema. Two workers opening a new ledger at
        the same moment can see "database is locked" at once, whatever the busy timeout (the
        switch to WAL and the schema take the write lock before the busy handler may wait):
        the opening is tried again until ``BUSY_TIMEOUT_S``."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            db: sqlite3.Connection | None = None
            try:
                db = sqlite3.connect(
                    str(self.path),
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=BUSY_TIMEOUT_S,
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
                db.executescript(_SCHEMA)
                db.execute(
                    "INSERT OR IGNORE INTO meta (k, v) VALUES ('schema', ?)", (str(STORE_SCHEMA),)
                )
            except sqlite3.Error as exc:
                if db is not None:
                    db.close()
                locked = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
                if not locked or time.monotonic() > deadline:
                    raise LedgerError(f"{self.path}: cannot open the cost ledger: {exc}") from exc
                time.sleep(0.02 + 0.08 * random.random())  # noqa: S311 - spreading retries
                continue
            return db

    def _move_old_format(self) -> None:
        """A JSON ledger (the earlier format) at the path: kept aside, imported by ``load``."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
        if head == _SQLITE_MAGIC or not head:
            return
        aside = self.path.with_name(self.path.name + ".v1.json")
        if aside.exists():
            aside = self.path.with_name(f"{self.path.name}.v1.{int(time.time())}.json")
        os.replace(self.path, aside)
        log.warning("the cost ledger %s was in the old JSON format: moved to %s", self.path, aside)

    # -- start-up ---------------------------------------------------------------------------

    def load(self, ledger: CostLedger) -> None:
        """Add the stored figures to ``ledger`` (after importing an old JSON ledger, if any)
        and store its prices (those in force, for ``summary_of``)."""
        for old in sorted(self.path.parent.glob(self.path.name + ".v1*.json")):
            self._import_v1(old)  # once per file (a crash between moving and importing: now)
        with self._lock:
            _load(self._db, ledger, self.path)
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO meta (k, v) VALUES ('pricing', ?)",
                (json.dumps(ledger.pricing(), sort_keys=True),),
            )

    def _import_v1(self, old: Path) -> None:
        """Store the figures of a JSON ledger moved aside in the database, once: a marker in
        the same transaction says it was imported."""
        marker = f"imported:{old.name}"
        with self._lock:
            done = self._db.execute("SELECT 1 FROM meta WHERE k = ?", (marker,)).fetchone()
        if done:
            return
        scratch = CostLedger(1.0, 0.5, 1)
        try:
            scratch.restore(old.read_bytes())
        except (OSError, ValueError) as exc:
            log.error("the old cost ledger %s is not readable (%s); not imported", old, exc)
            return
        with self._transaction() as db:
            db.execute("INSERT INTO meta (k, v) VALUES (?, ?)", (marker, str(time.time())))
            for day, by_device in scratch.days().items():
                for device, usage in by_device.items():
                    db.execute(_ADD_USAGE, (day, device, *_values(usage)))
            for device, readings in scratch.readings_totals().items():
                _observe(db, device, readings)
        log.info("imported the old JSON cost ledger %s into %s", old, self.path)

    # -- the hot path -----------------------------------------------------------------------

    def answer(self, device: str, key: str) -> Answer | None:
        """The answer already recorded for this case, if any."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT label, confidence, model FROM answered WHERE device = ? AND key = ?",
                    (device, key),
                ).fetchone()
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: cannot read the cost ledger: {exc}") from exc
        return None if row is None else Answer(row[0], float(row[1]), row[2])

    def record(
        self, charges: list[Charge], readings: dict[str, int], at: dt.datetime | None = None
    ) -> list[Usage]:
        """Record ``charges`` and the devices' ``readings`` totals in one transaction.

        Returns, per charge, what was actually added: ``Usage()`` for a case already charged
        (and not a billed request); the request's cost without the case for a billed request
        whose case was already answered. Raises LedgerError when the write failed (then
        nothing was recorded).
        """
        when = at if at is not None else dt.datetime.now(dt.UTC)
        day = CostLedger.day_of(when)
        stamp = when.timestamp()
        added: list[Usage] = []
        with self._transaction() as db:
            for c in charges:
                fresh = True
                if c.key is not None and c.answer is not None:
                    cur = db.execute(
                        "INSERT OR IGNORE INTO answered"
                        " (device, key, tier, at, label, confidence, model, worker)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            c.device,
                            c.key,
                            str(c.tier),
                            stamp,
                            c.answer.label,
                            c.answer.confidence,
                            c.answer.model,
                            self.worker,
                        ),
                    )
                    fresh = cur.rowcount == 1
                usage = c.usage if fresh else without_cases(c.usage) if c.billed else Usage()
                if usage != Usage():
                    db.execute(_ADD_USAGE, (day, c.device, *_values(usage)))
                added.append(usage)
            for device, total in readings.items():
                _observe(db, device, total)
        return added

    def prune(self, answers_keep_s: float, keep_days: int = LEDGER_KEEP_DAYS) -> int:
        """Forget answers older than ``answers_keep_s`` and figures older than ``keep_days``
        days; returns the number of answers forgotten."""
        now = dt.datetime.now(dt.UTC)
        oldest_day = CostLedger.day_of(now - dt.timedelta(days=keep_days - 1))
        with self._transaction() as db:
            gone = db.execute(
                "DELETE FROM answered WHERE at < ?", (now.timestamp() - answers_keep_s,)
            ).rowcount
            db.execute("DELETE FROM usage WHERE day < ?", (oldest_day,))
        return int(gone)

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                with contextlib.suppress(sqlite3.Error):
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                raise LedgerError(f"{self.path}: cannot write the cost ledger: {exc}") from exc


def _load(db: sqlite3.Connection, ledger: CostLedger, path: Path) -> None:
    try:
        for day, device, *values in db.execute(_READ_USAGE).fetchall():
            ledger.apply(device, Usage(**dict(zip(FIELDS, values, strict=True))), day)
        for device, readings in db.execute("SELECT device, readings_total FROM devices"):
            ledger.observe(device, int(readings))
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot read the cost ledger: {exc}") from exc


def summary_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The summary (``CostLedger.summary``) of a ledger file, at the prices the worker that
    wrote it last started with; the file is only read. A JSON ledger of the earlier format is
    returned as it is. Raises LedgerError when it is neither."""
    if is_redis(path):
        summary: dict[str, Any] = _redis().redis_summary(str(path))
        return summary
    where = Path(path)
    try:
        with where.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
        if head != _SQLITE_MAGIC:
            data = json.loads(where.read_bytes())
        else:
            data = None
            db = sqlite3.connect(f"{where.resolve().as_uri()}?mode=ro", uri=True)
    except (OSError, ValueError, sqlite3.Error) as exc:
        raise LedgerError(f"{where}: not a cost ledger: {exc}") from exc
    if data is not None:
        if not isinstance(data, dict) or "pricing" not in data:
            raise LedgerError(f"{where}: not a cost ledger (JSON without prices)")
        return data
    try:
        row = db.execute("SELECT v FROM meta WHERE k = 'pricing'").fetchone()
        if row is None:
            raise LedgerError(f"{where}: the cost ledger holds no prices yet")
        ledger = CostLedger.from_pricing(json.loads(row[0]))
        _load(db, ledger, where)
    except (sqlite3.Error, ValueError, TypeError) as exc:
        raise LedgerError(f"{where}: not a cost ledger: {exc}") from exc
    finally:
        db.close()
    return ledger.summary()


def _values(u: Usage) -> tuple[int | float, ...]:
    return tuple(getattr(u, f) for f in FIELDS)


def without_cases(u: Usage) -> Usage:
    return Usage(
        tokens=u.tokens,
        spend_urgent=u.spend_urgent,
        spend_batch=u.spend_batch,
        calls=u.calls,
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
    )


def _observe(db: sqlite3.Connection, device: str, readings_total: int) -> None:
    db.execute(
        "INSERT INTO devices (device, readings_total) VALUES (?, ?) ON CONFLICT (device)"
        " DO UPDATE SET readings_total = MAX(readings_total, excluded.readings_total)",
        (device, readings_total),
    )
