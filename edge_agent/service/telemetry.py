"""Telemetry: what the agent is doing and what it costs, as MQTT JSON and Prometheus text.

The scoring loop only records latencies into a fixed ring buffer (a numpy
array write) and a histogram (two additions); everything else — psutil calls,
percentiles, encoding, publishing, rendering the Prometheus text (``metrics.py``)
and writing the textfile — happens on the telemetry thread at
``telemetry.interval_s``. Publishing goes through the link's bounded queue; the
link sends a snapshot at QoS 0 while connected, else keeps it in the outbox's
telemetry class, which drops its oldest when full (``telemetry.qos``).

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
    """Every ``interval_s``: take a snapshot, publish it, write the textfile."""

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
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-telemetry", daemon=True)

    def start(self) -> None:
        """Start ticking (again, after ``halt``)."""
        if self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edge-agent-telemetry", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        """Stop ticking (``start`` resumes), without the last snapshot ``stop`` takes."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def stop(self) -> None:
        self.halt()
        self.tick()  # one last snapshot, so the final numbers are published and written

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def tick(self) -> None:
        snap = self.snapshot()
        snap["time_unix"] = time.time()
        self.latest = snap
        if self.publish is not None:
            self.publish(snap)
        if self.textfile is not None and self.render is not None:
            try:
                write_textfile(self.textfile, self.render(snap))
            except OSError as exc:
                self.errors += 1
                if self.errors == 1 or self.errors % 100 == 0:
                    log.warning("cannot write metrics textfile %s: %s", self.textfile, exc)
