"""Telemetry: what the agent is doing and what it costs, as MQTT JSON and Prometheus text.

For each reading, the scoring loop only records its latency into a fixed ring
buffer and a histogram. Every ``telemetry.interval_s`` a snapshot is taken —
counters, the slow signals (psutil calls, percentiles, drift; refreshed at most
every ``telemetry.slow_interval_s``; ``snapshot.py``), rendering the Prometheus
text (``metrics.py``), writing the textfile — by the scoring loop between two
groups of readings while it runs, else by the telemetry thread
(``TelemetryThread``). Publishing hands the snapshot to the link's bounded queue;
the link thread encodes it and sends it at QoS 0 while connected, else keeps it
in the outbox's telemetry class, which drops its oldest when full
(``telemetry.qos``).

Metrics: process CPU and RSS, system load and memory, free disk of the state
directory, temperatures where the device has sensors; latency p50/p95/p99
over the last ``telemetry.latency_window`` readings (JSON; Prometheus gets
histograms); counters (readings,
rejects by reason, local, hard urgent/batch, refusals, verdicts on time /
late / missed, local-cloud agreement, outbox depth per class, drops,
reconnects); the ``drift`` section (drift.py: per-feature PSI against the
pack's training reference, confidence histogram, hard rate, the drift flag).
"""

from __future__ import annotations

import array
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edge_agent.util.files import Durability, atomic_write
from edge_agent.util.stats import percentiles

log = logging.getLogger(__name__)

Snapshot = dict[str, Any]


class LatencyWindow:
    """The last N latencies in milliseconds; ``record`` is O(1) and allocation-free.

    The ring is an ``array.array`` of doubles: storing a Python float into it costs a
    tenth of a numpy element write, on the scoring thread, and numpy reads it without a
    copy for the percentiles (telemetry thread).
    """

    def __init__(self, size: int) -> None:
        self._buf = array.array("d", bytes(8 * size))
        self._size = size
        self._n = 0

    def record(self, ms: float) -> None:
        self._buf[self._n % self._size] = ms
        self._n += 1

    def record_many(self, values: list[float]) -> None:
        """``record`` for each of a scored group's latencies, in order."""
        buf, size = self._buf, self._size
        start = self._n % size
        n = len(values)
        if start + n <= size:
            buf[start : start + n] = array.array("d", values)
        else:
            for i, v in enumerate(values):
                buf[(start + i) % size] = v
        self._n += n

    def percentiles(self) -> dict[str, float | None]:
        return percentiles(np.frombuffer(self._buf, dtype=np.float64)[: min(self._n, self._size)])

    @property
    def count(self) -> int:
        return self._n


def _temperatures() -> dict[str, float]:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return {}
    out: dict[str, float] = {}
    for chip, entries in sensors.items():
        for i, entry in enumerate(entries):
            out[f"{chip}_{entry.label or i}"] = float(entry.current)
    return out


class SystemProbe:
    """psutil readings of this process and the machine (telemetry thread).

    Each file psutil reads hands the interpreter to the scoring thread and back, and each
    handover can delay the reading being scored: the process's CPU times are read once per
    probe (the CPU share is worked out from them as ``Process.cpu_percent`` does), and a
    machine whose sensors gave no temperature when the agent started is not asked again.
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self._proc = psutil.Process()
        self._cpu_s = self._cpu_seconds()
        self._at = time.monotonic()
        self._sensors = bool(_temperatures())

    def _cpu_seconds(self) -> float:
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def read(self) -> Snapshot:
        mem = self._proc.memory_info()
        try:
            disk_free = shutil.disk_usage(self.state_dir).free
        except OSError:
            disk_free = -1
        load1, load5, load15 = os.getloadavg()
        cpu_s, now = self._cpu_seconds(), time.monotonic()
        elapsed = now - self._at
        # The share of one CPU since the last probe, in percent, as psutil rounds it.
        share = round((cpu_s - self._cpu_s) / elapsed * 100.0, 1) if elapsed > 0 else 0.0
        self._cpu_s, self._at = cpu_s, now
        return {
            "cpu_percent": share,
            "cpu_seconds": cpu_s,
            "rss_bytes": mem.rss,
            "threads": self._proc.num_threads(),
            "load1": load1,
            "load5": load5,
            "load15": load15,
            "mem_available_bytes": psutil.virtual_memory().available,
            "disk_free_bytes": disk_free,
            "temperatures_c": _temperatures() if self._sensors else {},
        }


def write_textfile(path: Path, text: str) -> None:
    """Write atomically (temp file + rename), for node_exporter's textfile collector."""
    atomic_write(path, text.encode(), Durability.RENAME)


class TelemetryThread:
    """Every ``interval_s``: take a snapshot, publish it, write the textfile.

    While the agent's scoring loop runs, it takes the snapshot itself, after the group of
    readings in which one falls due, and publishes it after the next (``maybe_tick``). A
    snapshot taken on this thread holds the interpreter while the scoring thread waits for
    it, and the scoring thread is then woken late: every snapshot delayed a reading
    (``edge-agent bench``, telemetry on vs off). This thread takes a snapshot the loop has
    let go ``GRACE`` of an interval overdue (nothing is scoring, or the source is stuck),
    keeping the period; while the loop keeps the beat, the thread only looks every
    ``max(interval_s, CHECK_MIN_S)``.
    """

    #: How overdue (in intervals) a snapshot is when this thread takes it: the loop, which
    #: looks after every group, comes first whenever it runs.
    GRACE = 0.5
    #: How often the thread looks whether the scoring loop still takes the snapshots, in
    #: intervals of at least a second: each look takes the interpreter for a moment too.
    CHECK_MIN_S = 1.0

    def __init__(
        self,
        interval_s: float,
        snapshot: Callable[[], Snapshot],
        publish: Callable[[Snapshot], None] | None,
        textfile: Path | None,
        render: Callable[[Snapshot], str] | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.snapshot = snapshot
        self.publish = publish
        self.textfile = textfile
        self.render = render
        self.latest: Snapshot = {}
        self.errors = 0  # textfile writes that failed
        self.failed = 0  # snapshots that raised (logged)
        self.by_loop = 0  # snapshots the scoring loop took (the rest: this thread, or stop)
        self._due = 0.0  # monotonic time of the next snapshot
        self._loop_beats = False  # the scoring loop took the last snapshot
        self._active = False
        self._taken: Snapshot | None = None  # the loop's snapshot, to send after its next group
        self._ticking = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-telemetry", daemon=True)

    def start(self) -> None:
        """Start ticking (again, after ``halt``)."""
        if self._thread.is_alive():
            return
        self._stop.clear()
        self._due = time.monotonic() + self.interval_s
        self._loop_beats = False
        self._active = True
        self._thread = threading.Thread(target=self._run, name="edge-agent-telemetry", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        """Stop ticking (``start`` resumes), without the last snapshot ``stop`` takes."""
        self._active = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._taken is not None:  # taken by the loop, not yet sent
            self._take(by_loop=True)

    def stop(self) -> None:
        self.halt()
        self.tick()  # one last snapshot, so the final numbers are published and written

    def maybe_tick(self) -> None:
        """The scoring loop, between groups: take the snapshot if one is due. The loop takes
        it in two steps, after two groups: the snapshot, then its publishing and textfile,
        so that neither group's readings wait for both."""
        if self._taken is not None or (self._active and time.monotonic() >= self._due):
            self._take(by_loop=True)

    def _take(self, *, by_loop: bool) -> None:
        if not self._ticking.acquire(blocking=False):
            return  # the other side is taking this one
        try:
            taken, self._taken = self._taken, None
            if taken is not None:
                self._send(taken)
                if by_loop:
                    return
                # The thread: the loop stopped right after a snapshot; the next one is due too.
            # The beat keeps its period (the thread takes a snapshot GRACE late); after a
            # stall longer than a period, it starts again from now.
            now, due = time.monotonic(), self._due + self.interval_s
            self._due = due if due > now else now + self.interval_s
            self._loop_beats = by_loop
            self.by_loop += by_loop
            if by_loop:
                self._taken = self._shot()
            else:
                self.tick()
        except Exception:  # a snapshot's bug must not stop scoring, nor later snapshots
            self.failed += 1
            if self.failed == 1 or self.failed % 100 == 0:
                log.exception("telemetry snapshot failed (%d so far)", self.failed)
        finally:
            self._ticking.release()

    def _run(self) -> None:
        check = max(self.interval_s, self.CHECK_MIN_S)
        late = self.GRACE * self.interval_s
        while True:
            wait = self._due + late - time.monotonic()
            if self._loop_beats:
                wait = max(wait, check)
            if self._stop.wait(max(wait, 0.0)):
                return
            if time.monotonic() >= self._due + late:
                self._take(by_loop=False)

    def tick(self) -> None:
        """Take a snapshot, publish it and write the textfile, at once."""
        self._send(self._shot())

    def _shot(self) -> Snapshot:
        snap = self.snapshot()
        snap["time_unix"] = time.time()
        self.latest = snap
        return snap

    def _send(self, snap: Snapshot) -> None:
        if self.publish is not None:
            self.publish(snap)
        if self.textfile is not None and self.render is not None:
            try:
                write_textfile(self.textfile, self.render(snap))
            except OSError as exc:
                self.errors += 1
                if self.errors == 1 or self.errors % 100 == 0:
                    log.warning("cannot write metrics textfile %s: %s", self.textfile, exc)
