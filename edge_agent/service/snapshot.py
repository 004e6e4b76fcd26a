"""A telemetry snapshot of an agent: its counters, always current, and the slow signals
(drift, percentiles, the system probe), taken again at most every
``telemetry.slow_interval_s``. The scoring loop takes it between two groups of readings
(``telemetry.TelemetryThread``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from edge_agent.util.stats import percentiles

if TYPE_CHECKING:
    from edge_agent.service.agent import Agent


def agent_snapshot(agent: Agent) -> dict[str, Any]:
    """Everything telemetry reports, as one JSON-able dict."""
    c, r = agent.pipeline.counts, agent.reconciler.counters
    slow = slow_signals(agent)
    lat = slow["latency"]
    snap: dict[str, Any] = {
        "model": agent.scorer.ref,
        "readings": c["local"] + c["hard"],
        "rejected": c["rejected"],
        "rejects": dict(agent.pipeline.rejects),
        "local": c["local"],
        "hard_urgent": agent.counters["hard_urgent"],
        "hard_batch": agent.counters["hard_batch"],
        "hard_refused": agent.counters["hard_refused_urgent"]
        + agent.counters["hard_refused_batch"],
        "verdicts_on_time": r["verdicts_on_time"],
        "verdicts_late": r["verdicts_late"],
        "verdicts_batch": r["verdicts_batch"],
        "deadline_missed": r["deadline_missed"],
        "agreement": agent.reconciler.agreement(),
        "latency_ms_p50": lat["p50"],
        "latency_ms_p95": lat["p95"],
        "latency_ms_p99": lat["p99"],
        "round_trip_ms_p50": slow["round_trip"]["p50"],
        "round_trip_ms_p99": slow["round_trip"]["p99"],
        "outbox": agent.outbox.depth(),
        "outbox_bytes": agent.outbox.bytes_used(),
        "outbox_events": dict(agent.outbox.counters),
        "link": dict(agent.link.counters),
        "connected": agent.link.connected.is_set(),
        # The outbox cannot be written (disk full, read-only): scoring goes on, hard cases
        # are refused (counted in link.store_failed_*), telemetry is dropped.
        "degraded": bool(agent.outbox.write_error),
        "reconnects": agent.link.counters["disconnects"],
        "router": dict(agent.router.counters),
        "routing": agent.learned.snapshot() if agent.learned is not None else {"policy": "fixed"},
        "alerts": dict(agent.alerts),
        "hard_audit": agent.counters["hard_audit"],
        "drift": slow["drift"],
        "rollout": agent.rollout.snapshot() if agent.rollout is not None else {},
    }
    snap.update(slow["probe"])
    return snap


def slow_signals(agent: Agent) -> dict[str, Any]:
    """The statistics over windows of readings (drift, the percentiles of latency and of
    round trips) and the system probe, taken again at most every
    ``telemetry.slow_interval_s``: they change over seconds and cost about a millisecond
    (drift ~0.45 ms, the probe ~0.13, the latency percentiles ~0.03 on an AMD EPYC), paid by
    the reading after which the snapshot is taken. The rest of a snapshot is counters,
    always current."""
    now = time.monotonic()
    slow = agent._slow  # made whole, then swapped in: the metrics server may read it too
    if slow is None or now - slow[0] >= agent.settings.telemetry.slow_interval_s:
        fresh = {"drift": agent.drift.snapshot(), "probe": agent.probe.read()}
        fresh["latency"] = agent.latency.percentiles()
        fresh["round_trip"] = percentiles(list(agent.reconciler.round_trips_ms), (50, 99))
        slow = agent._slow = (now, fresh)
    return slow[1]
