"""A candidate model on trial: after the self-test on its golden inputs (``scoring/golden.py``),
the shadow phase beside the live model, then the health window after promotion.

``Bounds`` are the limits of one trial (the release's ``[rollout]`` table, else the config);
``Shadow`` and ``Health`` only count and compare — the state machine (``machine.py``) decides.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from edge_agent.config import RolloutSettings
from edge_agent.errors import EdgeAgentError
from edge_agent.ingest.readings import Reading
from edge_agent.models.pack import ModelPack
from edge_agent.scoring.scorer import Decision, Route, Scorer
from edge_agent.util.stats import percentile
from edge_agent.wire.messages import Verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Bounds:
    shadow_readings: int
    min_agreement: float
    max_hard_rate_increase: float
    max_p99_ms: float
    max_cloud_agreement_drop: float
    min_cloud_verdicts: int
    health_readings: int
    health_max_hard_rate_increase: float
    health_max_error_rate: float

    @classmethod
    def of(cls, pack: ModelPack, cfg: RolloutSettings) -> Bounds:
        own = pack.manifest.rollout
        values = {}
        for name in cls.__slots__:
            mine = getattr(own, name) if own is not None else None
            values[name] = mine if mine is not None else getattr(cfg, name)
        return cls(**values)


def _p99(xs: list[float] | deque[float]) -> float:
    return percentile(xs, 99) or 0.0


class Shadow:
    """The candidate scores what the live model scored, on its own thread, off the hot path."""

    def __init__(self, candidate: Scorer, bounds: Bounds, queue_size: int) -> None:
        self.candidate = candidate
        self.bounds = bounds
        self._queue: queue.Queue[tuple[Reading, str, bool]] = queue.Queue(queue_size)
        self.seen = 0
        self.agree = 0
        self.live_hard = 0
        self.cand_hard = 0
        self.errors = 0
        self.skipped = 0
        self.latencies_ms: list[float] = []
        # Cloud verdicts for readings both models scored: seq -> label, both ways round, since
        # a verdict may come before or after the shadow got to its reading.
        self._lock = threading.Lock()
        self._scored: OrderedDict[int, tuple[str, str]] = OrderedDict()  # candidate, live
        self._verdicts: OrderedDict[int, str] = OrderedDict()
        self.cloud = 0
        self.cloud_agree_candidate = 0
        self.cloud_agree_live = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-shadow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, d: Decision) -> None:
        """Called on the scoring thread for every live decision; never blocks."""
        try:
            self._queue.put_nowait((d.reading, d.label, d.route == Route.HARD))
        except queue.Full:
            self.skipped += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set() and self.seen < self.bounds.shadow_readings:
            try:
                reading, live_label, live_hard = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            t0 = time.perf_counter_ns()
            try:
                (d,) = self.candidate.score([reading])
            except EdgeAgentError as exc:
                self.errors += 1
                log.warning("candidate failed on a shadow reading: %s", exc)
                continue
            finally:
                self.seen += 1
            self.latencies_ms.append((time.perf_counter_ns() - t0) / 1e6)
            self._match(reading.seq, d.label, live_label)
            self.agree += d.label == live_label
            self.live_hard += live_hard
            self.cand_hard += d.route == Route.HARD
        self.done.set()

    def on_verdict(self, v: Verdict) -> None:
        """A cloud verdict (link thread): compare it with both models' answers."""
        if v.no_verdict is not None or not v.label:
            return
        with self._lock:
            both = self._scored.pop(v.seq, None)
            if both is None:
                self._verdicts[v.seq] = v.label
                while len(self._verdicts) > 10_000:
                    self._verdicts.popitem(last=False)
                return
            self._count_cloud(v.label, *both)

    def _match(self, seq: int, candidate: str, live: str) -> None:
        with self._lock:
            label = self._verdicts.pop(seq, None)
            if label is not None:
                self._count_cloud(label, candidate, live)
                return
            self._scored[seq] = (candidate, live)
            while len(self._scored) > 10_000:
                self._scored.popitem(last=False)

    def _count_cloud(self, cloud: str, candidate: str, live: str) -> None:
        self.cloud += 1
        self.cloud_agree_candidate += candidate == cloud
        self.cloud_agree_live += live == cloud

    def figures(self) -> dict[str, Any]:
        n = max(1, self.seen)
        c = max(1, self.cloud)
        return {
            "cloud_verdicts": self.cloud,
            "cloud_agreement_candidate": round(self.cloud_agree_candidate / c, 4),
            "cloud_agreement_live": round(self.cloud_agree_live / c, 4),
            "readings": self.seen,
            "agreement": round(self.agree / n, 4),
            "hard_rate_live": round(self.live_hard / n, 4),
            "hard_rate_candidate": round(self.cand_hard / n, 4),
            "p99_ms": round(_p99(self.latencies_ms), 3),
            "errors": self.errors,
            "skipped": self.skipped,
        }

    def verdict(self) -> str:
        """ "" when the candidate stayed within its bounds, else why not."""
        f, b = self.figures(), self.bounds
        if self.errors:
            return f"{self.errors} scoring errors in shadow"
        if f["agreement"] < b.min_agreement:
            return f"agreement {f['agreement']} with the live model < {b.min_agreement}"
        if f["hard_rate_candidate"] > f["hard_rate_live"] + b.max_hard_rate_increase:
            return (
                f"hard-case rate {f['hard_rate_candidate']} > live {f['hard_rate_live']}"
                f" + {b.max_hard_rate_increase}"
            )
        if f["p99_ms"] > b.max_p99_ms:
            return f"p99 {f['p99_ms']} ms > {b.max_p99_ms} ms"
        if (
            self.cloud >= b.min_cloud_verdicts
            and f["cloud_agreement_candidate"]
            < f["cloud_agreement_live"] - b.max_cloud_agreement_drop
        ):
            return (
                f"agrees with the cloud's verdicts on {f['cloud_agreement_candidate']} of"
                f" {self.cloud} hard cases, the live model on {f['cloud_agreement_live']}"
            )
        return ""


@dataclass(slots=True)
class Health:
    """The probation of a promoted model, fed from the scoring thread."""

    bounds: Bounds
    baseline_hard_rate: float
    seen: int = 0
    hard: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    def observe(self, d: Decision) -> None:
        self.seen += 1
        self.hard += d.route == Route.HARD
        self.latencies_ms.append(d.latency_ms)

    def finished(self) -> bool:
        return self.seen + self.errors >= self.bounds.health_readings

    def verdict(self) -> str:
        b = self.bounds
        n = max(1, self.seen + self.errors)
        if self.errors / n > b.health_max_error_rate:
            return f"{self.errors} scoring errors in {n} readings"
        rate = self.hard / max(1, self.seen)
        if rate > self.baseline_hard_rate + b.health_max_hard_rate_increase:
            return (
                f"hard-case rate {rate:.3f} > {self.baseline_hard_rate:.3f} (before)"
                f" + {b.health_max_hard_rate_increase}"
            )
        p99 = _p99(self.latencies_ms)
        if p99 > b.max_p99_ms:
            return f"p99 {p99:.2f} ms > {b.max_p99_ms} ms"
        return ""

    def figures(self) -> dict[str, Any]:
        return {
            "readings": self.seen,
            "errors": self.errors,
            "hard_rate": round(self.hard / max(1, self.seen), 4),
            "p99_ms": round(_p99(self.latencies_ms), 3),
        }
