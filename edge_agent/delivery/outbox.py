"""The durable outbox: an SQLite (WAL) queue of messages waiting for an acknowledgement.

A message is written here before it is published. Telemetry is deleted when
the broker acknowledges it with a success reason code (``ack``); a hard case,
by default (``link.confirm = "verdict"``), only when the cloud's verdict for
its idempotency key comes back (``confirm``), so that a broker that dies
holding it cannot lose it. Three classes, each with
its own bounds (rows and bytes), TTL and policy when full:

==========  ==========================================================
urgent      hard cases with a deadline. When the outbox's total bytes are
            exhausted it evicts telemetry, then batch cases (oldest first);
            at its own bound, or with nothing left to evict, it refuses
            (``OutboxFull``, counted, logged as an error).
batch       non-urgent hard cases. Full: drops its own oldest (counted);
            over the total it evicts telemetry first.
telemetry   metrics. Full: drops its own oldest (counted).
==========  ==========================================================

Hard cases are committed with ``synchronous=FULL`` (the WAL is fsynced before
``put`` returns, so an accepted hard case survives a crash or power cut);
telemetry with ``NORMAL``. ``outbox.hard_sync = "normal"`` trades the power-cut
guarantee for latency: the WAL then reaches the disk at checkpoints only, so
accepted hard cases still survive a process crash (SIGKILL) but the last ones
before a power cut may be lost; the fsync (milliseconds on many SD cards and
virtual disks) leaves the hard-case path. Messages past their TTL are deleted unsent and
counted. TTLs use the monotonic clock while the machine has not rebooted
(the kernel's boot id is stored with each row) and the wall clock across a
reboot. Sequence numbers for idempotency keys come from here too: every open
starts a new run, so a sequence number is never reused after a restart.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import OutboxError, OutboxFull

log = logging.getLogger(__name__)

SEQ_PER_RUN = 1_000_000_000


class Cls(enum.IntEnum):
    """Message classes, in drain priority order."""

    URGENT = 0
    BATCH = 1
    TELEMETRY = 2


#: Each class and its name in counters and telemetry (``depth``, on every snapshot).
_CLASS_NAMES = [(c, c.name.lower()) for c in Cls]


@dataclass(frozen=True, slots=True)
class ClassLimits:
    max_rows: int
    max_bytes: int
    ttl_s: float


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message, as handed to the link for publishing."""

    id: int
    cls: Cls
    key: str
    topic: str
    payload: bytes
    remaining_ttl_s: float


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cls INTEGER NOT NULL,
    key TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    expires_mono REAL NOT NULL,
    expires_wall REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_cls ON messages (cls, id);
CREATE INDEX IF NOT EXISTS messages_by_key ON messages (key);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
"""


class Outbox:
    """Thread-safe durable queue in ``<state_dir>/outbox.db``."""

    def __init__(
        self,
        path: Path,
        limits: dict[Cls, ClassLimits],
        max_total_bytes: int,
        *,
        hard_sync: str = "FULL",
    ) -> None:
        if hard_sync not in ("FULL", "NORMAL"):
            raise OutboxError(f"hard_sync must be FULL or NORMAL, not {hard_sync!r}")
        self.hard_sync = hard_sync
        self.path = path
        self.limits = limits
        self.max_total_bytes = max_total_bytes
        self.counters: Counter[str] = Counter()
        #: Why the last write transaction failed (disk full, read-only); "" once one succeeds.
        self.write_error = ""
        self._lock = threading.Lock()
        self._boot = _boot_id()
        self._rows = dict.fromkeys(Cls, 0)
        self._bytes = dict.fromkeys(Cls, 0)
        self._sync: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=10
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._set_sync("FULL")
            self._db.executescript(_SCHEMA)
            self.run = self._next_run()
            for cls, rows, size in self._db.execute(
                "SELECT cls, COUNT(*), COALESCE(SUM(size), 0) FROM messages GROUP BY cls"
            ):
                self._rows[Cls(cls)] = rows
                self._bytes[Cls(cls)] = size
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"{path}: cannot open the outbox: {exc}") from exc
        self._seq = 0
        self._seq_lock = threading.Lock()
        log.info("outbox %s open: run %d, %s", path, self.run, self.depth())

    # -- sequence numbers -------------------------------------------------------------

    def _next_run(self) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k = 'run'").fetchone()
        run = (row[0] if row else 0) + 1
        self._db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('run', ?)", (run,))
        return int(run)

    def counter(self, name: str) -> int:
        """A counter kept with the outbox across restarts (0 if never saved)."""
        with self._lock:
            try:
                row = self._db.execute("SELECT v FROM meta WHERE k = ?", (name,)).fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: cannot read counter {name}: {exc}") from exc
        return int(row[0]) if row else 0

    def save_counter(self, name: str, value: int) -> None:
        """Store a counter (not fsynced: after a crash it may be a little behind)."""
        with self._lock:
            try:
                self._set_sync("NORMAL")
                self._db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (name, value))
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: cannot save counter {name}: {exc}") from exc

    def next_seq(self) -> int:
        """A sequence number never used before on this state directory (``next_seqs(1)``,
        without the list: the scoring thread numbers each lone reading)."""
        with self._seq_lock:
            if self._seq + 1 < SEQ_PER_RUN:
                self._seq += 1
                return self.run * SEQ_PER_RUN + self._seq
        return self.next_seqs(1)[0]

    def next_seqs(self, n: int) -> list[int]:
        """``n`` sequence numbers never used before on this state directory, in order.

        The numbers have their own lock: the scoring thread never waits here for the link
        thread's writes (an fsync of ``hard_sync = "full"``), except to start a new run,
        once per ``SEQ_PER_RUN`` readings."""
        with self._seq_lock:
            if self._seq + n < SEQ_PER_RUN:  # the common case: no new run within the n
                first = self.run * SEQ_PER_RUN + self._seq + 1
                self._seq += n
                return list(range(first, first + n))
            out = []
            for _ in range(n):
                self._seq += 1
                if self._seq >= SEQ_PER_RUN:
                    with self._lock:
                        self.run = self._next_run()
                    self._seq = 1
                out.append(self.run * SEQ_PER_RUN + self._seq)
            return out

    # -- writing ----------------------------------------------------------------------

    def _set_sync(self, mode: str) -> None:
        if self._sync != mode:
            self._db.execute(f"PRAGMA synchronous={mode}")
            self._sync = mode

    def put(self, cls: Cls, key: str, topic: str, payload: bytes) -> int:
        """Store one message durably and return its id; raise OutboxFull or OutboxError."""
        (result,) = self.put_many([(cls, key, topic, payload)])
        if isinstance(result, OutboxError):
            raise result
        return result

    def put_many(self, items: list[tuple[Cls, str, str, bytes]]) -> list[int | OutboxError]:
        """Store several messages in one transaction (one fsync).

        Returns, per item, its row id or the OutboxError that refused it; a refusal
        of one item does not affect the others. If the transaction itself fails
        (disk full, read-only), every item gets that error.
        """
        results: list[int | OutboxError] = []
        stored: list[tuple[Cls, int]] = []
        hard = any(cls is not Cls.TELEMETRY for cls, _, _, _ in items)
        with self._lock:
            try:
                self._set_sync(self.hard_sync if hard else "NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    now_m, now_w = time.monotonic(), time.time()
                    for cls, key, topic, payload in items:
                        size = len(payload)
                        limits = self.limits[cls]
                        try:
                            if size > limits.max_bytes or size > self.max_total_bytes:
                                self._refuse(cls, f"a {size}-byte message is over the class bound")
                            self._make_room(cls, size)
                        except OutboxFull as full:
                            results.append(full)
                            continue
                        cur = self._db.execute(
                            "INSERT INTO messages (cls, key, topic, payload, size, boot_id,"
                            " expires_mono, expires_wall) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (
                                int(cls),
                                key,
                                topic,
                                payload,
                                size,
                                self._boot,
                                now_m + limits.ttl_s,
                                now_w + limits.ttl_s,
                            ),
                        )
                        self._rows[cls] += 1
                        self._bytes[cls] += size
                        stored.append((cls, len(results)))
                        results.append(int(cur.lastrowid or 0))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as exc:
                self.write_error = str(exc)
                error = OutboxError(f"{self.path}: cannot store messages: {exc}")
                for cls, _, _, _ in items:
                    self.counters[f"write_errors_{cls.name.lower()}"] += 1
                    if cls is Cls.TELEMETRY:
                        self.counters["dropped_telemetry"] += 1
                return [error for _ in items]
            self.write_error = ""
            for cls, _ in stored:
                self.counters[f"put_{cls.name.lower()}"] += 1
        return results

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:  # SQLite may have rolled back already (e.g. disk full)
            log.debug("rollback: %s", exc)
        self._reload_totals()

    def _refuse(self, cls: Cls, why: str) -> None:
        self.counters[f"refused_{cls.name.lower()}"] += 1
        log.error("outbox refused a %s message: %s", cls.name.lower(), why)
        raise OutboxFull(f"outbox refused a {cls.name.lower()} message: {why}")

    def _drop_oldest(self, victim: Cls, reason: str) -> bool:
        row = self._db.execute(
            "SELECT id, size FROM messages WHERE cls = ? ORDER BY id LIMIT 1", (int(victim),)
        ).fetchone()
        if row is None:
            return False
        self._db.execute("DELETE FROM messages WHERE id = ?", (row[0],))
        self._rows[victim] -= 1
        self._bytes[victim] -= row[1]
        self.counters[f"{reason}_{victim.name.lower()}"] += 1
        return True

    def _make_room(self, cls: Cls, size: int) -> None:
        limits = self.limits[cls]
        # The class's own bound.
        while self._rows[cls] + 1 > limits.max_rows or self._bytes[cls] + size > limits.max_bytes:
            if cls is Cls.URGENT:
                self._refuse(cls, f"urgent class at its bound ({self._rows[cls]} rows)")
            self._drop_oldest(cls, "dropped")
        # The outbox's total bound.
        order = {
            Cls.URGENT: [Cls.TELEMETRY, Cls.BATCH],
            Cls.BATCH: [Cls.TELEMETRY, Cls.BATCH],
            Cls.TELEMETRY: [Cls.TELEMETRY],
        }[cls]
        while sum(self._bytes.values()) + size > self.max_total_bytes:
            if not any(
                self._drop_oldest(v, "evicted" if v is not cls else "dropped") for v in order
            ):
                self._refuse(cls, "outbox total size reached and nothing left to evict")

    def _reload_totals(self) -> None:
        self._rows = dict.fromkeys(Cls, 0)
        self._bytes = dict.fromkeys(Cls, 0)
        for c, rows, size in self._db.execute(
            "SELECT cls, COUNT(*), COALESCE(SUM(size), 0) FROM messages GROUP BY cls"
        ):
            self._rows[Cls(c)] = rows
            self._bytes[Cls(c)] = size

    # -- reading and acknowledging ---------------------------------------------------

    def pending(
        self, cls: Cls, limit: int, skip: set[int] | frozenset[int] = frozenset()
    ) -> list[Message]:
        """Up to ``limit`` oldest messages of ``cls`` not in ``skip``; expired ones are
        deleted, counted and not returned."""
        now_m, now_w = time.monotonic(), time.time()
        out: list[Message] = []
        expired: list[tuple[int, int]] = []
        with self._lock:
            if not self._rows[cls]:
                # Nothing stored: no query (the link asks every class after each PUBACK, and
                # each query hands the interpreter to and fro with the scoring thread).
                return out
            try:
                after = -1
                while True:  # again past expired rows, so that they never hide live ones
                    want = limit - len(out) + len(skip)
                    rows = self._db.execute(
                        "SELECT id, key, topic, payload, size, boot_id, expires_mono, expires_wall"
                        " FROM messages WHERE cls = ? AND id > ? ORDER BY id LIMIT ?",
                        (int(cls), after, want),
                    ).fetchall()
                    for mid, key, topic, payload, size, boot, exp_m, exp_w in rows:
                        after = mid
                        if mid in skip:
                            continue
                        remaining = exp_m - now_m if boot == self._boot else exp_w - now_w
                        if remaining <= 0:
                            expired.append((mid, size))
                            continue
                        if len(out) < limit:
                            out.append(Message(mid, cls, key, topic, bytes(payload), remaining))
                    if len(out) >= limit or len(rows) < want:
                        break
                if expired:
                    self._set_sync("NORMAL")
                    self._db.executemany(
                        "DELETE FROM messages WHERE id = ?", [(m,) for m, _ in expired]
                    )
                    self._rows[cls] -= len(expired)
                    self._bytes[cls] -= sum(s for _, s in expired)
                    self.counters[f"expired_{cls.name.lower()}"] += len(expired)
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: cannot read the outbox: {exc}") from exc
        if expired:
            log.warning("%d %s messages passed their TTL unsent", len(expired), cls.name.lower())
        return out

    def ack(self, ids: list[int]) -> int:
        """Delete acknowledged messages; returns how many were still there."""
        if not ids:
            return 0
        with self._lock:
            try:
                self._set_sync("NORMAL")
                gone = 0
                for mid in ids:
                    row = self._db.execute(
                        "DELETE FROM messages WHERE id = ? RETURNING cls, size", (mid,)
                    ).fetchone()
                    if row is not None:
                        gone += 1
                        c = Cls(row[0])
                        self._rows[c] -= 1
                        self._bytes[c] -= row[1]
                        self.counters[f"acked_{c.name.lower()}"] += 1
            except sqlite3.Error as exc:
                raise OutboxError(
                    f"{self.path}: cannot delete acknowledged messages: {exc}"
                ) from exc
        return gone

    def confirm(self, keys: list[str]) -> list[int]:
        """Delete the hard cases (urgent or batch) with these idempotency keys, because the
        cloud answered them; returns the ids of the rows that were still there."""
        if not keys:
            return []
        gone: list[int] = []
        with self._lock:
            try:
                self._set_sync("NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for key in keys:
                        for mid, c, size in self._db.execute(
                            "DELETE FROM messages WHERE key = ? AND cls IN (?, ?)"
                            " RETURNING id, cls, size",
                            (key, int(Cls.URGENT), int(Cls.BATCH)),
                        ).fetchall():
                            gone.append(int(mid))
                            self._rows[Cls(c)] -= 1
                            self._bytes[Cls(c)] -= size
                            self.counters[f"confirmed_{Cls(c).name.lower()}"] += 1
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: cannot delete confirmed messages: {exc}") from exc
        return gone

    def depth(self) -> dict[str, int]:
        """Rows per class, e.g. ``{"urgent": 0, "batch": 3, "telemetry": 1}``."""
        rows = self._rows
        return {name: rows[c] for c, name in _CLASS_NAMES}

    def bytes_used(self) -> int:
        return sum(self._bytes.values())

    def integrity_check(self) -> str:
        with self._lock:
            row = self._db.execute("PRAGMA integrity_check").fetchone()
        return str(row[0])

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("outbox checkpoint at close failed: %s", exc)
            self._db.close()
