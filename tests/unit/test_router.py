from __future__ import annotations

import msgspec
import numpy as np

from edge_agent.config import RouterSettings
from edge_agent.ingest.readings import Reading
from edge_agent.routing.router import Reconciler, Router
from edge_agent.scoring.scorer import Decision
from edge_agent.wire.messages import SCHEMA_VERSION, BatchVerdicts, Verdict


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def hard(
    label: str = "walking", confidence: float = 0.7, reason: str = "low_confidence"
) -> Decision:
    return Decision(
        label=label,
        confidence=confidence,
        route="hard",
        reason=reason,
        model="m@1",
        latency_ms=0.1,
        reading=Reading(np.zeros((1, 1), dtype=np.float32)),
    )


def test_policy_splits_urgent_and_batch() -> None:
    r = Router(RouterSettings(urgent_below=0.5, cooldown_s=0, urgent_labels=["badminton"]), Clock())
    assert r.tier(hard(confidence=0.7)) == "batch"
    assert r.tier(hard(confidence=0.3)) == "urgent"
    assert r.tier(hard(confidence=0.9, reason="out_of_range")) == "urgent"
    assert r.tier(hard(confidence=0.9, reason="dead_sensor")) == "batch"
    assert r.tier(hard(label="badminton", confidence=0.8)) == "urgent"
    assert r.counters["batch_by_policy"] == 2


def test_cooldown_per_label() -> None:
    clock = Clock()
    r = Router(RouterSettings(cooldown_s=5.0), clock)
    assert r.tier(hard("walking", 0.2)) == "urgent"
    assert r.tier(hard("walking", 0.2)) == "batch"
    assert r.tier(hard("running", 0.2)) == "urgent"
    clock.t += 5.1
    assert r.tier(hard("walking", 0.2)) == "urgent"
    assert r.counters["batch_by_cooldown"] == 1


def test_budget_per_minute() -> None:
    clock = Clock()
    r = Router(RouterSettings(cooldown_s=0, max_urgent_per_minute=3), clock)
    tiers = [r.tier(hard(confidence=0.1)) for _ in range(5)]
    assert tiers == ["urgent"] * 3 + ["batch"] * 2
    assert r.counters["batch_by_budget"] == 2
    clock.t += 60
    assert r.tier(hard(confidence=0.1)) == "urgent"


def verdict(key: str, label: str, tier: str = "urgent") -> Verdict:
    return Verdict(
        v=SCHEMA_VERSION,
        key=key,
        device="d",
        seq=1,
        label=label,
        confidence=0.9,
        model="c@1",
        tier=tier,  # type: ignore[arg-type]
    )


def test_reconciler_on_time_late_missed_and_agreement() -> None:
    clock = Clock()
    rec = Reconciler(RouterSettings(deadline_ms=100), clock)
    rec.expect("d:1", "walking", "urgent")
    rec.expect("d:2", "running", "urgent")
    rec.expect("d:3", "standing", "batch")
    clock.t += 0.05
    rec.on_verdict(msgspec.json.encode(verdict("d:1", "walking")))
    clock.t += 0.1
    rec.sweep()
    assert rec.counters["deadline_missed"] == 1
    rec.on_verdict(msgspec.json.encode(verdict("d:2", "walking")))
    batch = BatchVerdicts(
        v=SCHEMA_VERSION, device="d", verdicts=[verdict("d:3", "standing", "batch")]
    )
    rec.on_verdict(msgspec.json.encode(batch))
    rec.on_verdict(msgspec.json.encode(verdict("d:1", "walking")))  # duplicate
    rec.on_verdict(b"{garbage")
    c = rec.counters
    assert (c["verdicts_on_time"], c["verdicts_late"], c["verdicts_batch"]) == (1, 1, 1)
    assert (c["verdicts_unknown"], c["verdicts_malformed"]) == (1, 1)
    assert rec.agreement() == 2 / 3
    assert len(rec.round_trips_ms) == 1
    assert abs(rec.round_trips_ms[0] - 50.0) < 1e-6
    assert rec.waiting() == 0
