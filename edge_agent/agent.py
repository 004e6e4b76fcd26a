"""The agent: readings in, local decisions out at once, hard cases to the cloud.

Wiring: JSON lines → ``ScorePipeline`` (validate, score) → ``Router`` (tier) →
``Link.submit`` (durable outbox, then MQTT). The scoring loop never waits on
the network or the disk: hard cases go to the link thread through a bounded
queue, and the link thread stores them (one fsync per group) before it
publishes. Cloud verdicts come back on the link thread and are reconciled.

``edge-agent run`` drives this; ``--exit-when-drained`` stops once the source
is exhausted, the outbox is empty and every urgent case has its verdict or
has passed its deadline (or the drain timeout passes).
"""

from __future__ import annotations

import logging
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from .config import Settings
from .link import Link
from .messages import SCHEMA_VERSION, HardCase, LocalDecision, Topics, encoder
from .outbox import ClassLimits, Cls, Outbox
from .pipeline import ScorePipeline
from .router import URGENT, Reconciler, Router
from .scorer import Decision, Scorer
from .sources.lines import chunked_lines

log = logging.getLogger(__name__)


#: ``run --exit-when-drained`` gave up waiting: messages are still in the outbox (kept there).
EXIT_DRAIN_TIMEOUT = 3


class _StopRequested(Exception):
    """Raised in the main thread by the SIGTERM/SIGINT handler to end intake."""


def open_outbox(settings: Settings) -> Outbox:
    o = settings.outbox
    limits = {
        Cls.URGENT: ClassLimits(o.urgent_max_rows, o.urgent_max_bytes, o.urgent_ttl_s),
        Cls.BATCH: ClassLimits(o.batch_max_rows, o.batch_max_bytes, o.batch_ttl_s),
        Cls.TELEMETRY: ClassLimits(o.telemetry_max_rows, o.telemetry_max_bytes, o.telemetry_ttl_s),
    }
    return Outbox(Path(settings.device.state_dir) / "outbox.db", limits, o.max_total_bytes)


class Agent:
    """One device's agent: a scorer, a router, an outbox and a link."""

    def __init__(
        self,
        settings: Settings,
        scorer: Scorer,
        *,
        emit: Callable[[bytes], None] | None = None,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.device = settings.device_id
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.counters: Counter[str] = Counter()
        self._emit = emit
        self._emit_lock = threading.Lock()
        self.outbox = open_outbox(settings)
        self.router = Router(settings.router)
        self.reconciler = Reconciler(settings.router)
        self.link = Link(
            settings,
            self.outbox,
            self.device,
            model=scorer.ref,
            on_verdict=self.reconciler.on_verdict,
            on_stored=self._on_stored if emit is not None else None,
        )
        self.pipeline = ScorePipeline(
            scorer,
            settings.input.max_line_bytes,
            settings.model.max_batch,
            on_decision=self._route,
            next_seq=self.outbox.next_seq,
        )

    # -- routing ----------------------------------------------------------------------

    def _route(self, d: Decision) -> tuple[str, str] | None:
        self.counters["readings"] += 1
        if d.route != "hard":
            return None
        tier = self.router.tier(d)
        key = f"{self.device}:{d.reading.seq}"
        urgent = tier == URGENT
        case = HardCase(
            v=SCHEMA_VERSION,
            key=key,
            device=self.device,
            seq=d.reading.seq,
            values=d.reading.values.tolist(),
            local=LocalDecision(d.label, d.confidence, d.reason, d.model),
            tier="urgent" if urgent else "batch",
            id=d.reading.id,
            deadline_ms=self.settings.router.deadline_ms if urgent else None,
            readings_total=self.counters["readings"],
        )
        payload = encoder.encode(case)  # ids came from JSON, values are finite: always encodable
        cls = Cls.URGENT if urgent else Cls.BATCH
        topic = self.topics.hard(self.device) if urgent else self.topics.batch(self.device)
        if self.link.submit(cls, key, topic, payload):
            self.counters[f"hard_{tier}"] += 1
            self.reconciler.expect(key, d.label, tier)
        else:
            self.counters[f"hard_refused_{tier}"] += 1
        return tier, key

    def _on_stored(self, tier: str, key: str) -> None:
        self._write(b'{"accepted":"%s","tier":"%s"}\n' % (key.encode(), tier.encode()))

    def _write(self, data: bytes) -> None:
        if self._emit is not None and data:
            with self._emit_lock:
                self._emit(data)

    # -- running ----------------------------------------------------------------------

    def run(
        self, fd: int, *, exit_when_drained: bool = False, drain_timeout_s: float = 30.0
    ) -> int:
        """Score lines from ``fd`` until end of input (or SIGTERM); returns an exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        self.link.start()
        stopped = False
        code = 0
        try:
            for group in chunked_lines(fd, self.settings.input.max_line_bytes):
                self._write(self.pipeline.process(group))
                self.reconciler.sweep()
            if exit_when_drained and not self.drain(drain_timeout_s):
                code = EXIT_DRAIN_TIMEOUT
        except _StopRequested:
            stopped = True
            log.info("stop requested: intake closed, storing what was accepted")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
        if stopped:
            log.info("stopped")
        return code

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        raise _StopRequested(signal.Signals(signum).name)

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything is published and every urgent case is answered or overdue."""
        self.link.flush_batches()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.reconciler.sweep()
            if self.link.idle() and self.reconciler.waiting_urgent() == 0:
                return True
            time.sleep(0.01)
        log.warning(
            "drain timeout after %.0f s: outbox %s, %d in flight",
            timeout_s,
            self.outbox.depth(),
            self.link.inflight(),
        )
        return False

    def close(self) -> None:
        self.link.stop()
        self.reconciler.sweep()
        self.outbox.close()

    def summary(self) -> dict[str, Any]:
        c, r, link = self.pipeline.counts, self.reconciler.counters, self.link.counters
        rtt = sorted(self.reconciler.round_trips_ms)
        return {
            "readings": c["local"] + c["hard"],
            "rejected": c["rejected"],
            "rejects": dict(self.pipeline.rejects),
            "local": c["local"],
            "hard_urgent": self.counters["hard_urgent"],
            "hard_batch": self.counters["hard_batch"],
            "hard_refused": self.counters["hard_refused_urgent"]
            + self.counters["hard_refused_batch"],
            "published": {k[10:]: v for k, v in link.items() if k.startswith("published_")},
            "verdicts_on_time": r["verdicts_on_time"],
            "verdicts_late": r["verdicts_late"],
            "deadline_missed": r["deadline_missed"],
            "verdicts_batch": r["verdicts_batch"],
            "agreement": self.reconciler.agreement(),
            "round_trip_ms_p50": statistics.median(rtt) if rtt else None,
            "round_trip_ms_p99": rtt[min(len(rtt) - 1, int(0.99 * len(rtt)))] if rtt else None,
            "outbox": self.outbox.depth(),
            "reconnects": link["disconnects"],
            "router": dict(self.router.counters),
        }


def stdout_writer(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
