"""The cloud worker's Prometheus metrics (``cloud.metrics_port``): its counters, its verdict
latency and what its cost ledger charged, in a form Prometheus can add up across workers.

Every counter here counts what *this worker process* did since it started: the cases it
scored, the verdicts it sent, the tokens and money its charges recorded. A worker's ledger
may hold more (the ledger's database, loaded at start, can be shared by several workers and
outlives restarts), so the ledger families are this process's charges — the ledger's totals
now minus its totals when the worker started. A fleet's figure over any window is then a
plain sum over the workers, e.g. ``sum(increase(edge_cloud_ledger_cost_total[1d]))``, and a
restarted worker is a counter reset that ``rate``/``increase`` handle.

The all-cloud counterfactual is not additive that way: a device's ``readings_total`` is a
level that every worker its cases reach sees, so a sum over workers would count its readings
once per worker. The worker therefore exports, per device, the highest ``readings_total`` it
knows (``edge_cloud_device_readings_total{device}``, off with ``cloud.metrics_devices =
false`` for fleets too large for a series per device), and the price of one case per tier;
the fleet's all-cloud readings are ``sum(max by (device) (...))``, its all-cloud cost those
times ``edge_cloud_case_price``. docs/observability.md has the queries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from edge_agent.cloud.ledger import CostLedger, Usage
from edge_agent.util.metrics import Exposition, Histogram
from edge_agent.wire.messages import Tier

if TYPE_CHECKING:
    from edge_agent.cloud.worker import CloudWorker

#: Receipt of a request to its verdict published. Measured (AMD EPYC, 2 cores): the cloud
#: pack answers an urgent case in ~1 ms (all-cloud sync p99 2.1 ms including the broker,
#: docs/BENCHMARKS.md); an LLM endpoint 1-6 s (docs/cloud-endpoint.md); a batch of up to
#: ``cloud.batch_max`` cases through an endpoint up to ``endpoint.batch_timeout_s`` (60 s).
VERDICT_BUCKETS_S = (
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
    5.0,
    10.0,
    30.0,
    60.0,
)

P = "edge_cloud"
#: Worker counters exported as families of their own (the rest: ``edge_cloud_events_total``).
_OWN = {
    "urgent_scored",
    "batch_cases_scored",
    "duplicates",
    "verdicts_sent",
    "connects",
    "disconnects",
}


def verdict_histograms() -> dict[Tier, Histogram]:
    return {tier: Histogram(VERDICT_BUCKETS_S) for tier in (Tier.URGENT, Tier.BATCH)}


def _sum(ledger: CostLedger) -> Usage:
    total = Usage()
    for usage in ledger.totals().values():
        total.add(usage)
    return total


class LedgerSince:
    """What a ledger recorded since this object was made, never decreasing (a day of figures
    expiring from the ledger does not make a counter go back). Scrapes may come at once."""

    def __init__(self, ledger: CostLedger) -> None:
        self.ledger = ledger
        self._base = _sum(ledger)
        self._last = Usage()
        self._lock = threading.Lock()

    def usage(self) -> Usage:
        with self._lock:
            return self._advance(_sum(self.ledger))

    def _advance(self, now: Usage) -> Usage:
        base, last = self._base, self._last
        self._last = Usage(
            urgent=max(last.urgent, now.urgent - base.urgent),
            batch=max(last.batch, now.batch - base.batch),
            tokens=max(last.tokens, now.tokens - base.tokens),
            spend_urgent=max(last.spend_urgent, now.spend_urgent - base.spend_urgent),
            spend_batch=max(last.spend_batch, now.spend_batch - base.spend_batch),
            calls=max(last.calls, now.calls - base.calls),
            prompt_tokens=max(last.prompt_tokens, now.prompt_tokens - base.prompt_tokens),
            completion_tokens=max(
                last.completion_tokens, now.completion_tokens - base.completion_tokens
            ),
        )
        return self._last


def _by_tier(urgent: float, batch: float) -> list[tuple[Mapping[str, str] | None, float]]:
    return [({"tier": "urgent"}, urgent), ({"tier": "batch"}, batch)]


def _ledger(out: Exposition, used: Usage, ledger: CostLedger) -> None:
    out.add(
        f"{P}_ledger_cases_total",
        "counter",
        "Cases this worker charged (answered by the cloud pack or the endpoint), by tier.",
        _by_tier(used.urgent, used.batch),
    )
    out.add(
        f"{P}_ledger_cost_total",
        "counter",
        "What this worker's charges cost, by tier, in the currency of the configured prices.",
        _by_tier(used.spend_urgent, used.spend_batch),
    )
    out.counter(
        f"{P}_ledger_tokens_total",
        "Tokens charged: the endpoint's reported usage, or cloud.tokens_per_reading per case.",
        used.tokens,
    )
    out.counter(
        f"{P}_ledger_prompt_tokens_total",
        "Prompt tokens the endpoint reported for this worker's billed requests.",
        used.prompt_tokens,
    )
    out.counter(
        f"{P}_ledger_completion_tokens_total",
        "Completion tokens the endpoint reported for this worker's billed requests.",
        used.completion_tokens,
    )
    out.counter(
        f"{P}_ledger_billed_requests_total",
        "Endpoint requests billed (with a usage), answered or not.",
        used.calls,
    )
    out.add(
        f"{P}_case_price",
        "gauge",
        "What one case costs now, by tier (the all-cloud counterfactual's unit price).",
        _by_tier(ledger.unit_price(Tier.URGENT), ledger.unit_price(Tier.BATCH)),
    )


def _counters(out: Exposition, counters: Mapping[str, int]) -> None:
    out.add(
        f"{P}_cases_scored_total",
        "counter",
        "Hard cases this worker scored (not answered from memory), by tier.",
        _by_tier(counters.get("urgent_scored", 0), counters.get("batch_cases_scored", 0)),
    )
    out.counter(
        f"{P}_duplicates_total",
        "Re-sent cases answered again from memory or the ledger, not scored.",
        counters.get("duplicates", 0),
    )
    out.counter(
        f"{P}_verdicts_sent_total",
        "Verdicts published (one per case).",
        counters.get("verdicts_sent", 0),
    )
    out.add(
        f"{P}_broker_sessions_total",
        "counter",
        "Broker connections made and lost.",
        [
            ({"event": "connect"}, counters.get("connects", 0)),
            ({"event": "disconnect"}, counters.get("disconnects", 0)),
        ],
    )
    rejected = {k[len("rejected_") :]: v for k, v in counters.items() if k.startswith("rejected_")}
    out.labelled(
        f"{P}_rejected_total",
        "counter",
        "Messages or cases refused, by reason.",
        "reason",
        rejected,
    )
    rest = {k: v for k, v in counters.items() if k not in _OWN and not k.startswith("rejected_")}
    out.labelled(
        f"{P}_events_total",
        "counter",
        "Other worker events (endpoint requests and failures, ledger failures, no-verdict"
        " answers, verdicts lost or refused, ...).",
        "event",
        rest,
    )


class WorkerMetrics:
    """Renders one worker's exposition at each scrape."""

    def __init__(
        self, worker: CloudWorker, per_device: bool, clock: Callable[[], float] = time.time
    ) -> None:
        self.worker = worker
        self.per_device = per_device
        self.since = LedgerSince(worker.ledger)
        self.started = clock()

    def text(self) -> str:
        w = self.worker
        out = Exposition()
        out.gauge(
            f"{P}_info",
            "Always 1; the worker id, its group and its backend, as labels.",
            1,
            {"worker": w.worker_id, "group": w.cloud.group, "backend": w.cloud.backend},
        )
        out.gauge(
            f"{P}_ready",
            "1 while connected with both shared subscriptions granted.",
            w.ready.is_set(),
        )
        out.gauge(f"{P}_start_time_seconds", "Unix time the worker process started.", self.started)
        out.counter(
            f"{P}_process_cpu_seconds_total",
            "CPU time of the worker process (all threads).",
            time.process_time(),
        )
        _counters(out, dict(w.counters))
        out.histogram(
            f"{P}_verdict_latency_seconds",
            "From a request's receipt to its verdict published, per urgent case or batch.",
            [({"tier": str(tier)}, h.data()) for tier, h in w.verdicts.latency.items()],
        )
        _ledger(out, self.since.usage(), w.ledger)
        if self.per_device:
            out.labelled(
                f"{P}_device_readings_total",
                "counter",
                "Highest readings_total each device reported to this worker (or its ledger).",
                "device",
                w.ledger.readings_totals(),
            )
        return out.text()
