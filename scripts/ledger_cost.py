#!/usr/bin/env python3
"""What the durable cost ledger costs per verdict, next to the in-memory one, in one run.

For each way of keeping the ledger, the time the worker spends on the books of one answered
case (``Books.answered``: charge, remember the answer, and with a ledger file commit it):

* ``memory``: no ledger file, the in-memory ledger only (what the worker did between two
  writes of its old JSON file); the old file's write is added per case, amortised over the
  cases between two writes (every 30 s at ``--rate`` cases/s), from a measured write of a
  summary with ``--devices`` devices;
* ``sqlite normal`` / ``sqlite full``: one transaction per urgent case (the worker's
  default, ``cloud.ledger_sync``), and per batch chunk of ``--chunk`` cases;
* ``redis`` (with ``--redis URL``): one Lua script per urgent case / batch chunk.

Usage: python scripts/ledger_cost.py [--cases 5000] [--devices 300] [--rate 218] [--redis URL]
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from edge_agent.cloud.books import Books
from edge_agent.cloud.intake import Answer, AnswerMemory
from edge_agent.cloud.ledger import CostLedger
from edge_agent.cloud.ledger_store import LedgerStore, Store, open_store
from edge_agent.util.files import Durability, atomic_write
from edge_agent.wire.messages import Tier

OLD_WRITE_INTERVAL_S = 30.0
ANSWER = Answer("walking", 0.93, "basicmotions-cloud@1.0.0")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def per_case_us(books: Books, cases: int, devices: int, chunk: int, run: str) -> list[float]:
    """Microseconds per case, one sample per call (a call books ``chunk`` cases)."""
    samples = []
    tier = Tier.URGENT if chunk == 1 else Tier.BATCH
    for i in range(0, cases, chunk):
        device = f"dev-{i % devices}"
        answers = [(f"{run}:{i + j}", ANSWER) for j in range(chunk)]
        t0 = time.perf_counter_ns()
        books.answered(device, tier, answers)
        samples.append((time.perf_counter_ns() - t0) / 1e3 / chunk)
    return samples


def old_write_us(devices: int, folder: Path) -> float:
    """One write of the old JSON ledger file holding ``devices`` devices, in microseconds."""
    led = CostLedger(0.04, 0.5, 1500)
    for d in range(devices):
        led.observe(f"dev-{d}", 1000 + d)
        led.charge(f"dev-{d}", Tier.URGENT, 3)
        led.charge(f"dev-{d}", Tier.BATCH, 20)
    times = []
    for _ in range(20):
        t0 = time.perf_counter_ns()
        body = json.dumps(led.summary(), indent=1, sort_keys=True).encode() + b"\n"
        atomic_write(folder / "ledger.json", body, Durability.DATA)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--devices", type=int, default=300)
    ap.add_argument("--rate", type=float, default=218.0, help="cases/s, to amortise old writes")
    ap.add_argument("--chunk", type=int, default=64, help="cases per batch transaction")
    ap.add_argument("--redis", default="", help="also a Redis ledger at this URL (flushed!)")
    args = ap.parse_args()
    rows = []
    sizes: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_us = old_write_us(args.devices, folder)
        per_write = args.rate * OLD_WRITE_INTERVAL_S
        kinds = [("memory", None), ("sqlite normal", "normal"), ("sqlite full", "full")]
        if args.redis:
            kinds.append(("redis", "redis"))
        for name, sync in kinds:
            for chunk in (1, args.chunk):
                store: Store | None = None
                if sync == "redis":
                    import redis  # noqa: PLC0415 - only with --redis

                    redis.Redis.from_url(args.redis).flushall()
                    store = open_store(args.redis, "bench", "normal", 3600.0)
                elif sync is not None:
                    store = LedgerStore(folder / f"{sync}-{chunk}.db", "bench", sync)
                if store is not None:
                    store.load(CostLedger(0.04, 0.5, 1500))
                books = Books(CostLedger(0.04, 0.5, 1500), AnswerMemory(100_000), Counter(), store)
                per_case_us(books, min(500, args.cases), args.devices, chunk, "warm")
                samples = per_case_us(books, args.cases, args.devices, chunk, "run")
                extra = write_us / per_write if sync is None else 0.0
                rows.append((name, chunk, statistics.median(samples) + extra, extra, samples))
                if store is not None:
                    store.close()
                if sync in ("normal", "full"):
                    path = folder / f"{sync}-{chunk}.db"
                    with sqlite3.connect(path) as db:
                        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                        answers = db.execute("SELECT COUNT(*) FROM answered").fetchone()[0]
                    sizes.append(path.stat().st_size / answers)
    print(
        f"cost ledger per answered case — {cpu_name()}, {args.cases} cases, {args.devices} devices"
    )
    print(f"old JSON file write: {write_us:.0f} us, every {OLD_WRITE_INTERVAL_S:.0f} s")
    print(f"{'ledger':<14} {'cases/txn':>9} {'p50 us':>8} {'p99 us':>8}  note")
    for name, chunk, p50, extra, samples in rows:
        p99 = sorted(samples)[int(0.99 * (len(samples) - 1))] + extra
        note = f"incl. {extra:.2f} us amortised file write" if extra else ""
        print(f"{name:<14} {chunk:>9} {p50:>8.1f} {p99:>8.1f}  {note}")
    print(f"database size: {max(sizes):.0f} bytes per answered case")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
