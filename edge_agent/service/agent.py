"""The agent: readings in, local decisions out at once, hard cases to the cloud.

Wiring: source → ``ScorePipeline`` (validate, score; micro-batched by what
arrived together) → ``Router`` (tier) → ``Link.submit`` (durable outbox, then
MQTT). The scoring loop never waits on the network or the disk: hard cases
and telemetry go to the link thread through a bounded queue, and the link
thread stores them (one fsync per group) before it publishes. Telemetry snapshots
are taken by the scoring loop between two groups (by the telemetry thread while
the loop is idle; ``telemetry.py``) and encoded and published by the link
thread. Cloud verdicts come back on the link thread and are reconciled.

Threads: main (source + scoring + routing + watchdog), link, telemetry, and
the optional loopback ``/metrics`` server. systemd is told ``READY=1`` once
the model is loaded and warm and the outbox is open; ``WATCHDOG=1`` is sent
from the main loop only while the loop turns and the link thread is alive.

SIGTERM/SIGINT: stop taking input, finish the group being scored, store what
was accepted, close the outbox cleanly, exit 0. ``--exit-when-drained`` stops
once the source is exhausted, the outbox is empty and every urgent case has
its verdict or has passed its deadline (or the drain timeout passes: exit 3).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from edge_agent.config import Settings
from edge_agent.delivery.link import Link
from edge_agent.delivery.outbox import Cls
from edge_agent.errors import EdgeAgentError, OutboxError
from edge_agent.ingest.readings import Reading
from edge_agent.ingest.sources import Source
from edge_agent.models.store import ModelStore
from edge_agent.rollout.machine import Rollout
from edge_agent.routing.router import Reconciler, Router
from edge_agent.scoring.backends.base import FloatArray
from edge_agent.scoring.drift import DriftMonitor
from edge_agent.scoring.pipeline import ScorePipeline
from edge_agent.scoring.scorer import Decision, Route, Scorer
from edge_agent.service.metrics import RoundTrips, agent_metrics, decision_histogram
from edge_agent.service.snapshot import agent_snapshot
from edge_agent.service.telemetry import LatencyWindow, SystemProbe, TelemetryThread
from edge_agent.service.wiring import learned_policy, open_outbox
from edge_agent.util.metrics import MetricsServer
from edge_agent.util.systemd import Heartbeat, Notifier, Watchdog
from edge_agent.wire.messages import (
    SCHEMA_VERSION,
    Alert,
    HardCase,
    LocalDecision,
    ModelEvent,
    Tier,
    Topics,
    encoder,
)

log = logging.getLogger(__name__)

#: ``run --exit-when-drained`` gave up waiting: messages are still in the outbox (kept there).
EXIT_DRAIN_TIMEOUT = 3


class Agent:
    """One device's agent: a scorer, a router, an outbox, a link and telemetry."""

    def __init__(
        self,
        settings: Settings,
        scorer: Scorer,
        *,
        emit: Callable[[bytes], None] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.device = settings.device_id
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.counters: Counter[str] = Counter()
        self.alerts: Counter[str] = Counter()  #: alerts by reason
        self._emit = emit
        self._emit_lock = threading.Lock()
        self._stop_requested = ""
        self.outbox = open_outbox(settings)
        #: Readings scored on this state directory before this run (``readings_total`` in hard
        #: cases keeps counting across restarts; the cloud's all-cloud figure relies on it).
        self._readings_before = self.outbox.counter("readings_total")
        self._counts_saved_at = time.monotonic()
        self.learned = learned_policy(settings)
        self.router = Router(settings.router, learned=self.learned)
        self.reconciler = Reconciler(settings.router)
        if self.learned is not None:
            self.reconciler.listeners.append(self.learned.on_verdict)
        self._drift_flag = False
        self.rollout: Rollout | None = None
        if settings.rollout.enabled:
            self.rollout = Rollout(
                settings,
                ModelStore(settings.device.state_dir, settings.model.store_dir),
                scorer,
                report=self._report_model,
            )
            self.reconciler.listeners.append(self.rollout.on_verdict)
        self.link = Link(
            settings,
            self.outbox,
            self.device,
            model=scorer.ref,
            on_verdict=self.reconciler.on_verdict,
            on_stored=self._on_stored if emit is not None else None,
            on_command=self.rollout.submit if self.rollout is not None else None,
        )
        self.pipeline = ScorePipeline(
            scorer,
            settings.input.max_line_bytes,
            settings.model.max_batch,
            on_decisions=self.route_many,
            act_one=self.act_one,
            act_many=self.act_many,
            next_seqs=self.outbox.next_seqs,
            next_seq=self.outbox.next_seq,
        )
        t = settings.telemetry
        self.latency = LatencyWindow(t.latency_window)
        self.decision_seconds = decision_histogram()
        self.round_trips = RoundTrips(self.reconciler)
        self.drift = DriftMonitor(scorer.pack, settings.drift)
        self.probe = SystemProbe(settings.device.state_dir)
        self._slow: tuple[float, dict[str, Any]] | None = None
        self.telemetry = TelemetryThread(
            t.interval_s,
            self.snapshot,
            self._publish_telemetry if t.publish else None,
            Path(t.textfile) if t.textfile else None,
            self.prometheus,
        )
        self.metrics = MetricsServer(t.http_port, self._scraped) if t.http_port else None
        self.notifier = notifier or Notifier()
        self.heartbeat = Heartbeat("scoring loop")
        self.watchdog = Watchdog(
            self.notifier, [self.heartbeat.fresh(10.0), lambda: self.link.healthy]
        )

    # -- routing (main thread) --------------------------------------------------------

    def route(self, d: Decision) -> tuple[str, str] | None:
        """Count, watch and route one decision; a hard case goes to the link. Returns its
        tier and idempotency key (None for a local decision)."""
        return self.route_many([d], d.reading.values[np.newaxis])[0]

    def act_one(self, reading: Reading) -> bool:
        """Score one reading, count, watch and route it; True when it went hard. The latency
        path (the pipeline hands it each reading that arrived alone): a ``Decision`` is made
        only for a reading that needs more than to be counted, i.e. a hard one, or any while
        the learned policy routes or a rollout's trial or probation watches."""
        scorer = self.scorer
        assessed = scorer.assess_one(reading)
        if assessed is None:  # the backend has no single-window path, or it is busy
            decisions, x = scorer.score_with_input([reading])
            self.route_many(decisions, x)
            return decisions[0].route == Route.HARD
        _, c, code, _, ms = assessed
        self.latency.record(ms)
        self.decision_seconds.observe(ms * 1e-3)
        self.drift.record(reading.values, c, code != 0)
        readings = self.counters["readings"] = self.counters["readings"] + 1
        rollout = self.rollout
        watched = rollout is not None and (rollout.shadow is not None or rollout.health is not None)
        if not code and not watched and self.learned is None:
            return False
        d = scorer.decision(reading, assessed)
        if watched and rollout is not None:
            rollout.observe(d)
        if not code and self.learned is None:
            return False
        self._dispatch(d, readings)
        return d.route == Route.HARD

    def act_many(self, readings: list[Reading]) -> int:
        """``act_one`` for a group the pipeline hands over whole (nobody reads the decisions):
        scored, counted and watched once per group, a ``Decision`` made only for a reading
        that needs one; how many went hard."""
        x, best, conf, code, z, ms = self.scorer.assess_many(readings)
        hard = code != 0
        before = self._book(x, ms, conf, hard.tolist())
        rollout, learned = self.rollout, self.learned is not None
        watched = rollout is not None and (rollout.shadow is not None or rollout.health is not None)
        went, codes = 0, code.tolist()
        for i in range(len(readings)) if watched or learned else np.flatnonzero(hard).tolist():
            d = self.scorer.decision(readings[i], (best[i], conf[i], codes[i], z[i], ms[i]))
            if watched and rollout is not None:
                rollout.observe(d)
            if codes[i] or learned:
                self._dispatch(d, before + i + 1)
            went += d.route == Route.HARD
        return went

    def route_many(self, decisions: list[Decision], x: FloatArray) -> list[tuple[str, str] | None]:
        """``route`` for a scored group, in order, whose stacked input is ``x``; the scoring
        loop's callback. The bookkeeping is done once per group, and under the fixed policy a
        local decision needs nothing more (the router would keep it local)."""
        local = [d.route == Route.LOCAL for d in decisions]
        latencies, conf = [d.latency_ms for d in decisions], [d.confidence for d in decisions]
        before = self._book(x, latencies, conf, [not v for v in local])
        rollout = self.rollout
        if rollout is not None and (rollout.shadow is not None or rollout.health is not None):
            for d in decisions:
                rollout.observe(d)
        plain = self.learned is None
        return [
            None if plain and is_local else self._dispatch(d, before + i + 1)
            for i, (d, is_local) in enumerate(zip(decisions, local, strict=True))
        ]

    def _book(self, x: FloatArray, ms: list[float], conf: list[float], hard: list[bool]) -> int:
        """A scored group's records: latencies, the drift ring, the readings counter (whose
        value before the group it returns)."""
        self.latency.record_many(ms)
        self.decision_seconds.observe_many(ms, 1e-3)
        self.drift.record_many(x, conf, hard)
        before = self.counters["readings"]
        self.counters["readings"] += len(ms)
        return before

    def _dispatch(self, d: Decision, readings: int) -> tuple[str, str] | None:
        """The router's plan for one decision, the ``readings``-th of this run: local, an
        alert, or a hard case to the link."""
        plan = self.router.plan(d)
        key = f"{self.device}:{d.reading.seq}"
        if plan.action == "alert":
            self._alert(d, key)
            return "alert", key
        if plan.action == "local" or plan.tier is None:
            d.route = Route.LOCAL
            return None
        d.route, d.reason, tier = Route.HARD, plan.reason, plan.tier
        urgent = tier == Tier.URGENT
        case = HardCase(
            v=SCHEMA_VERSION,
            key=key,
            device=self.device,
            seq=d.reading.seq,
            values=d.reading.values.tolist(),
            local=LocalDecision(d.label, d.confidence, d.reason, d.model),
            tier=tier,
            id=d.reading.id,
            deadline_ms=self.settings.router.deadline_ms if urgent else None,
            readings_total=self._readings_before + readings,
        )
        payload = encoder.encode(case)  # ids came from JSON, values are finite: always encodable
        cls = Cls.URGENT if urgent else Cls.BATCH
        topic = self.topics.hard(self.device) if urgent else self.topics.batch(self.device)
        if self.link.submit(cls, key, topic, payload):
            self.counters[f"hard_{tier}"] += 1
            if plan.reason == "audit":
                self.counters["hard_audit"] += 1
            self.reconciler.expect(key, d.label, tier)
            if self.learned is not None and plan.stratum:
                self.learned.expect(key, plan.stratum, d.label)
        else:
            self.counters[f"hard_refused_{tier}"] += 1
        return tier, key

    def _alert(self, d: Decision, key: str) -> None:
        """Report a reading no cloud model can fix on the alert topic (and in telemetry)."""
        self.counters["alerts"] += 1
        reason = d.reason or ""
        self.alerts[reason] += 1
        alert = Alert(
            v=SCHEMA_VERSION,
            key=key,
            device=self.device,
            seq=d.reading.seq,
            reason=reason,
            local=LocalDecision(d.label, d.confidence, d.reason, d.model),
            id=d.reading.id,
        )
        if not self.link.submit(
            Cls.TELEMETRY, key, self.topics.alert(self.device), encoder.encode(alert)
        ):
            self.counters["alerts_refused"] += 1

    def _report_model(self, event: ModelEvent) -> None:
        self.counters["model_events"] += 1
        key = f"{self.device}:m{self.counters['model_events']}-{time.monotonic_ns()}"
        topic = self.topics.model_events(self.device)
        self.link.submit(Cls.TELEMETRY, key, topic, encoder.encode(event))

    def _process(self, group: list[Any]) -> bytes:
        """Score one group; a model on probation that fails is rolled back and the group
        scored again by the model before it."""
        try:
            return self.pipeline.process(group)
        except EdgeAgentError as exc:
            if self.rollout is None or not self.rollout.scoring_failed(exc):
                raise
        self._apply_rollout()
        return self.pipeline.process(group)

    def _apply_rollout(self) -> None:
        if self.rollout is None:
            return
        scorer = self.rollout.apply()
        if scorer is None:
            scorer = self.rollout.live
            if scorer is self.scorer:
                return
        self.scorer = scorer
        self.pipeline.scorer = scorer
        self.drift = DriftMonitor(scorer.pack, self.settings.drift)
        self._slow = None
        self._drift_flag = False
        if self.learned is not None:
            # What the cloud thought of the old model's answers says nothing of the new one's
            # (a promotion; a rollback swaps the model too and resets the same way).
            self.learned.reset("promotion")
        self.link.set_model(scorer.ref)
        log.info("now serving %s", scorer.ref)

    def _on_stored(self, tier: str, key: str) -> None:
        if tier == "telemetry":
            return
        self._write(b'{"accepted":"%s","tier":"%s"}\n' % (key.encode(), tier.encode()))

    def _write(self, data: bytes) -> None:
        if self._emit is not None and data:
            with self._emit_lock:
                self._emit(data)

    # -- telemetry (the scoring loop; the telemetry thread while it is idle) ------------

    def _publish_telemetry(self, snap: dict[str, Any]) -> None:
        key = f"{self.device}:t{int(snap.get('time_unix', time.time()) * 1000)}"
        device = self.device
        # Made and encoded by the link thread (``submissions.Payload``), not by the scoring
        # loop: nothing changes a snapshot once taken.
        self.link.submit(
            Cls.TELEMETRY,
            key,
            self.topics.telemetry(device),
            lambda: encoder.encode({"v": SCHEMA_VERSION, "device": device, **snap}),
        )

    def prometheus(self, snap: dict[str, Any]) -> str:
        """The Prometheus text of a snapshot and the latency histograms (``metrics.py``)."""
        seconds = self.decision_seconds.data()
        return agent_metrics(snap, self.device, seconds, self.round_trips.data())

    def _scraped(self) -> str:
        """What ``/metrics`` answers: the Prometheus text of the latest snapshot."""
        return self.prometheus(self.telemetry.latest or self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """Everything telemetry reports, as one JSON-able dict (``snapshot.py``)."""
        return agent_snapshot(self)

    def status_line(self) -> str:
        c = self.pipeline.counts
        lat = self.latency.percentiles()
        p99 = f"{lat['p99']:.2f} ms" if lat["p99"] is not None else "-"
        link = "connected" if self.link.connected.is_set() else "offline"
        degraded = self.outbox.write_error
        return (
            f"{c['local'] + c['hard']} readings, {c['hard']} hard, {c['rejected']} rejected;"
            f" p99 {p99}; broker {link}; outbox {sum(self.outbox.depth().values())}"
            + (f"; DEGRADED: outbox not writable ({degraded})" if degraded else "")
            + ("; DRIFT (see telemetry drift block)" if self.drift.flag else "")
        )

    # -- running (main thread) --------------------------------------------------------

    def run(
        self, source: Source, *, exit_when_drained: bool = False, drain_timeout_s: float = 30.0
    ) -> int:
        """Score what the source yields until it ends or SIGTERM; returns an exit code."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {
                sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
            }
        # Decision lines are encoded only for someone to read them (``run --decisions``).
        self.pipeline.output = self._emit is not None
        self.link.start()
        if self.rollout is not None:
            self.rollout.start()
        self.telemetry.start()
        if self.metrics is not None:
            self.metrics.start()
        self.notifier.ready(self.status_line())
        code = 0
        next_status = time.monotonic() + self.settings.telemetry.status_interval_s
        try:
            ended = False
            for group in source.groups():
                if group:
                    self._write(self._process(group))
                self._apply_rollout()
                self._tick()
                if self._stop_requested:
                    break
                if time.monotonic() >= next_status:
                    self.notifier.status(self.status_line())
                    next_status = time.monotonic() + self.settings.telemetry.status_interval_s
            else:
                ended = True
            if ended and exit_when_drained:
                if not self.drain(drain_timeout_s):
                    code = EXIT_DRAIN_TIMEOUT
            elif ended:
                log.info("source ended; still delivering until stopped")
                while not self._stop_requested:
                    self._tick()
                    time.sleep(0.25)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.notifier.stopping(self.status_line())
            source.close()
            self.close()
        if self._stop_requested:
            log.info("stopped by %s", self._stop_requested)
        return code

    def _tick(self) -> None:
        if time.monotonic() - self._counts_saved_at >= self.settings.telemetry.interval_s:
            self._save_counts()
        self.heartbeat.beat()
        self.telemetry.maybe_tick()
        self.reconciler.sweep()
        self.watchdog.maybe_ping()
        flag = self.drift.flag
        rose = flag and not self._drift_flag
        if rose and self.learned is not None and self.settings.router.reset_on_drift:
            self.learned.reset("drift")
        self._drift_flag = flag

    def _save_counts(self) -> None:
        self._counts_saved_at = time.monotonic()
        try:
            self.outbox.save_counter(
                "readings_total", self._readings_before + self.counters["readings"]
            )
        except OutboxError as exc:  # read-only or full: the count restarts lower, nothing else
            log.debug("%s", exc)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_requested = signal.Signals(signum).name

    def request_stop(self, reason: str = "request") -> None:
        """Stop as SIGTERM would (for embedding the agent in a thread)."""
        self._stop_requested = reason

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything is published and every urgent case is answered or overdue."""
        self.link.flush_batches()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop_requested:
            self._tick()
            if self.link.idle() and self.reconciler.waiting_urgent() == 0:
                return True
            time.sleep(0.01)
        log.warning(
            "drain ended before everything was delivered: outbox %s, %d in flight",
            self.outbox.depth(),
            self.link.inflight(),
        )
        return False

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self.telemetry.halt()
        self._slow = None  # the last snapshot takes everything afresh
        self.telemetry.stop()
        if self.rollout is not None:
            self.rollout.stop()
        self.link.stop()
        self.reconciler.sweep()
        self._save_counts()
        self.outbox.close()
        self.notifier.close()

    def summary(self) -> dict[str, Any]:
        snap = dict(self.telemetry.latest or self.snapshot())
        snap.pop("temperatures_c", None)
        return snap


def stdout_writer(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
