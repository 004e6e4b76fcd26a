"""The agent's Prometheus metrics: the telemetry snapshot and two latency histograms, as text.

Served on ``/metrics`` (``telemetry.http_port``) and written to ``telemetry.textfile`` (for
node_exporter's textfile collector). Every family has ``# HELP`` and ``# TYPE``; counters end
in ``_total``; units are base units. The device is not in any metric name: Prometheus knows a
scraped agent by its target (``instance``), and ``edge_agent_info`` carries the device id and
the model as labels for the textfile case, where the target is the node. The list of
families, their types and the dashboards and alerts that use them: docs/observability.md.

The histogram buckets come from measured ranges (docs/BENCHMARKS.md, docs/cloud-endpoint.md,
AMD EPYC, 2 cores):

* decision latency (a reading's arrival to its decision): ONNX packs 0.13-0.38 ms p99 per
  reading, 5-6.5 ms for a micro-batch of 64; the LLM pack 25-145 ms per reading and ~2 s for
  a batch of 64. Buckets 50 µs .. 2.5 s, with an edge at 50 ms (the design budget).
* verdict round trip (an urgent hard case sent to its verdict at the device, on-time ones):
  1.3-2.1 ms through a local broker and the cloud pack, 17 ms in the hybrid benchmark,
  1-6 s through an LLM endpoint. Buckets 0.5 ms .. 10 s, with an edge at 2 s (the default
  ``router.deadline_ms``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from edge_agent.routing.router import Reconciler
from edge_agent.util.metrics import Exposition, Histogram, HistogramData

Snapshot = dict[str, Any]

DECISION_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
ROUND_TRIP_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)

P = "edge_agent"


def decision_histogram() -> Histogram:
    return Histogram(DECISION_BUCKETS_S)


def round_trip_histogram() -> Histogram:
    return Histogram(ROUND_TRIP_BUCKETS_S)


class RoundTrips:
    """The histogram of the verdicts' round trips, fed from the reconciler.

    The reconciler keeps the last round trips (on-time urgent verdicts, one each) in a bounded
    deque; the count of on-time verdicts says how many of its newest are new. More new ones
    than the deque holds (a burst past its bound between two reads): the oldest of them are
    not observed.
    """

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        self.histogram = round_trip_histogram()
        self._seen = 0
        self._lock = threading.Lock()

    def data(self) -> HistogramData:
        """The histogram, with the round trips of verdicts that came since the last call."""
        with self._lock:
            recent = list(self.reconciler.round_trips_ms)
            seen = self.reconciler.counters["verdicts_on_time"]
            new = min(seen - self._seen, len(recent))
            self._seen = seen
            for ms in recent[len(recent) - new :] if new > 0 else ():
                self.histogram.observe(ms / 1000.0)
            return self.histogram.data()


def _table(snap: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = snap.get(key)
    return value if isinstance(value, Mapping) else {}


def _counts(out: Exposition, snap: Snapshot) -> None:
    out.counter(f"{P}_readings_total", "Readings scored.", snap.get("readings"))
    out.counter(f"{P}_local_decisions_total", "Readings answered on the device.", snap.get("local"))
    out.labelled(
        f"{P}_readings_rejected_total",
        "counter",
        "Input refused before scoring, by reason.",
        "reason",
        _table(snap, "rejects"),
    )
    out.add(
        f"{P}_hard_cases_total",
        "counter",
        "Hard cases accepted into the outbox for the cloud, by tier.",
        [
            ({"tier": "urgent"}, snap.get("hard_urgent")),
            ({"tier": "batch"}, snap.get("hard_batch")),
        ],
    )
    out.counter(
        f"{P}_hard_cases_refused_total",
        "Hard cases the outbox or the link refused (full, too large, not writable).",
        snap.get("hard_refused"),
    )
    out.labelled(
        f"{P}_router_choices_total",
        "counter",
        "The router's tier choices for hard cases, by the rule that chose.",
        "rule",
        _table(snap, "router"),
    )
    out.add(
        f"{P}_urgent_verdicts_total",
        "counter",
        "Cloud verdicts for urgent hard cases, within or after the deadline.",
        [
            ({"timing": "on_time"}, snap.get("verdicts_on_time")),
            ({"timing": "late"}, snap.get("verdicts_late")),
        ],
    )
    out.counter(
        f"{P}_batch_verdicts_total",
        "Cloud verdicts for batch hard cases.",
        snap.get("verdicts_batch"),
    )
    out.counter(
        f"{P}_urgent_deadlines_missed_total",
        "Urgent hard cases whose deadline passed without a verdict (the local answer stood).",
        snap.get("deadline_missed"),
    )
    out.gauge(
        f"{P}_cloud_agreement_ratio",
        "Share of cloud verdicts that agreed with the local label (absent before any).",
        snap.get("agreement"),
    )


def _delivery(out: Exposition, snap: Snapshot) -> None:
    out.labelled(
        f"{P}_outbox_messages",
        "gauge",
        "Messages waiting in the durable outbox, by class.",
        "class",
        _table(snap, "outbox"),
    )
    out.gauge(f"{P}_outbox_bytes", "Bytes of messages in the outbox.", snap.get("outbox_bytes"))
    out.labelled(
        f"{P}_outbox_events_total",
        "counter",
        "Outbox events (put, acked, confirmed, expired, dropped, refused, ...) by class.",
        "event",
        _table(snap, "outbox_events"),
    )
    out.labelled(
        f"{P}_link_events_total",
        "counter",
        "MQTT link events (connects, disconnects, published, nacked, resent, ...).",
        "event",
        _table(snap, "link"),
    )
    out.gauge(f"{P}_broker_connected", "1 while connected to the broker.", snap.get("connected"))
    out.gauge(
        f"{P}_outbox_degraded",
        "1 while the outbox cannot be written (hard cases refused, telemetry dropped).",
        snap.get("degraded"),
    )


def _system(out: Exposition, snap: Snapshot) -> None:
    out.counter(
        f"{P}_process_cpu_seconds_total",
        "CPU time of the agent process (user + system).",
        snap.get("cpu_seconds"),
    )
    out.gauge(
        f"{P}_process_resident_memory_bytes", "Resident memory of the agent.", snap.get("rss_bytes")
    )
    out.gauge(f"{P}_process_threads", "Threads of the agent process.", snap.get("threads"))
    out.add(
        f"{P}_system_load_average",
        "gauge",
        "The machine's load average over 1, 5 and 15 minutes.",
        [({"minutes": m}, snap.get(f"load{m}")) for m in ("1", "5", "15")],
    )
    out.gauge(
        f"{P}_system_memory_available_bytes",
        "Memory available on the machine.",
        snap.get("mem_available_bytes"),
    )
    out.gauge(
        f"{P}_state_dir_free_bytes",
        "Free space of the file system holding the state directory.",
        snap.get("disk_free_bytes"),
    )
    out.labelled(
        f"{P}_temperature_celsius",
        "gauge",
        "Temperature sensors of the machine, where it has any.",
        "sensor",
        _table(snap, "temperatures_c"),
    )


def _drift(out: Exposition, d: Mapping[str, Any]) -> None:
    g = f"{P}_drift"
    out.gauge(f"{g}_enabled", "1 while drift monitoring runs.", d.get("enabled"))
    out.gauge(f"{g}_flag", "1 while input drift is flagged (docs/drift.md).", d.get("flag"))
    out.counter(f"{g}_flags_raised_total", "Times the drift flag rose.", d.get("flags_raised"))
    out.gauge(f"{g}_window_size", "Readings the drift statistics cover.", d.get("window"))
    out.gauge(f"{g}_window_readings", "Readings in the drift window now.", d.get("readings"))
    out.gauge(f"{g}_psi_threshold", "PSI at which the flag rises.", d.get("psi_threshold"))
    out.gauge(f"{g}_psi_max", "The largest feature PSI in the window.", d.get("psi_max"))
    out.labelled(
        f"{g}_psi",
        "gauge",
        "PSI per feature against the training reference.",
        "feature",
        _table(d, "psi"),
    )
    out.labelled(
        f"{g}_confidence_share",
        "gauge",
        "Share of the window's readings per confidence bucket.",
        "bucket",
        _table(d, "confidence"),
    )
    out.labelled(
        f"{g}_reference_confidence_share",
        "gauge",
        "Share per confidence bucket on the pack's reference windows.",
        "bucket",
        _table(d, "confidence_ref"),
    )
    out.gauge(
        f"{g}_confidence_psi",
        "PSI of the confidence histogram against the reference.",
        d.get("confidence_psi"),
    )
    out.gauge(f"{g}_hard_rate_ratio", "Share of the window routed hard.", d.get("hard_rate"))
    out.gauge(
        f"{g}_reference_hard_rate_ratio",
        "Share routed hard on the reference windows.",
        d.get("hard_rate_ref"),
    )


def _rollout(out: Exposition, r: Mapping[str, Any]) -> None:
    out.labelled(
        f"{P}_model_events_total",
        "counter",
        "Model release events on the device (received, staged, promoted, refused, ...).",
        "event",
        _table(r, "events"),
    )
    rows: list[tuple[dict[str, str], Any]] = []
    for trial in ("shadow", "probation"):
        for figure, value in sorted(_table(r, trial).items()):
            in_ms = figure.endswith("_ms") and isinstance(value, (int, float))
            name = figure[:-3] + "_seconds" if in_ms else figure
            rows.append(({"trial": trial, "figure": name}, value / 1000.0 if in_ms else value))
    out.add(
        f"{P}_rollout_trial",
        "gauge",
        "Figures of a model trial under way (shadow) or in its health window (probation).",
        rows,
    )


def agent_metrics(
    snap: Snapshot, device: str, decision: HistogramData, round_trip: HistogramData
) -> str:
    """The agent's exposition from one telemetry snapshot and the two histograms."""
    out = Exposition()
    out.gauge(
        f"{P}_info",
        "Always 1; the device id and the model serving, as labels.",
        1,
        {"device": device, "model": str(snap.get("model", ""))},
    )
    out.gauge(
        f"{P}_last_snapshot_timestamp_seconds",
        "Unix time of the telemetry snapshot these figures come from.",
        snap.get("time_unix"),
    )
    _counts(out, snap)
    out.histogram(
        f"{P}_decision_latency_seconds",
        "Time from a reading's arrival to its local decision.",
        [(None, decision)],
    )
    out.histogram(
        f"{P}_verdict_round_trip_seconds",
        "Time from an urgent hard case sent to its cloud verdict at the device (on-time ones).",
        [(None, round_trip)],
    )
    _delivery(out, snap)
    _system(out, snap)
    _drift(out, _table(snap, "drift"))
    _rollout(out, _table(snap, "rollout"))
    return out.text()
