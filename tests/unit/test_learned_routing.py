"""The learned escalation policy on synthetic streams whose true correction rates are known."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from edge_agent.config import RouterSettings, load_settings
from edge_agent.errors import ConfigError
from edge_agent.ingest.readings import Reading
from edge_agent.routing.bounds import rate_upper
from edge_agent.routing.learned import LearnedPolicy
from edge_agent.routing.router import Router
from edge_agent.scoring.scorer import Decision, Route
from edge_agent.wire.messages import Tier, Verdict

PRICE_URGENT, PRICE_BATCH = 0.06, 0.03

#: A synthetic device: (confidence of the stratum, share of traffic, true correction rate).
#: The rates sit around alpha = 0.05 so that the risk rule has work to do.
MIX = [
    (0.3, 0.03, 0.40),
    (0.6, 0.07, 0.20),
    (0.85, 0.10, 0.08),
    (0.92, 0.15, 0.06),
    (0.97, 0.25, 0.03),
    (0.995, 0.40, 0.005),
]


def policy(seed: int = 0, **kw: object) -> LearnedPolicy:
    settings = RouterSettings(policy="learned", **kw)  # type: ignore[arg-type]
    return LearnedPolicy(
        settings, price_urgent=PRICE_URGENT, price_batch=PRICE_BATCH, rng=random.Random(seed)
    )


def verdict(key: str, label: str, confidence: float = 0.97) -> Verdict:
    return Verdict(
        v=1, key=key, device="d", seq=0, label=label, confidence=confidence, model="c@1",
        tier=Tier.BATCH,
    )  # fmt: skip


def run_stream(
    p: LearnedPolicy, mix: list[tuple[float, float, float]], n: int, rng: random.Random
) -> tuple[int, int]:
    """Feed ``n`` readings; escalated ones get a verdict at once (a correction, confident,
    with the stratum's true rate). Returns (escalated, audits)."""
    confs = [c for c, _, _ in mix]
    weights = [w for _, w, _ in mix]
    rates = {c: r for c, _, r in mix}
    escalated = audits = 0
    for i in range(n):
        conf = rng.choices(confs, weights)[0]
        choice = p.decide(conf, None)
        if choice.escalate:
            escalated += 1
            audits += choice.audit
            key = f"k{i}"
            p.expect(key, choice.stratum, "walking")
            wrong = rng.random() < rates[conf]
            p.on_verdict(verdict(key, "running" if wrong else "walking"))
    return escalated, audits


def true_local_share(p: LearnedPolicy, mix: list[tuple[float, float, float]]) -> float:
    """The share of local answers the cloud would change, by the true rates, under the plan."""
    plan = p.escalation_plan()
    local = [(w, r) for c, w, r in mix if plan[p.stratum(c, None)] == "local"]
    total = sum(w for w, _ in local)
    return sum(w * r for w, r in local) / total if total else 0.0


def test_rate_upper_is_clopper_pearson_without_events_and_covers() -> None:
    for n in (5, 50, 500):
        assert rate_upper(0, n, 0.05) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-6)
    assert rate_upper(0, 0, 0.05) == 1.0
    rng = np.random.default_rng(3)
    misses = sum(rate_upper(float(rng.binomial(40, 0.2)), 40, 0.05) < 0.2 for _ in range(2000))
    assert misses / 2000 <= 0.05


def test_the_risk_bound_holds_in_200_seeded_runs() -> None:
    """With probability >= 1 - delta the true share of local answers the cloud would change
    is <= alpha: over 200 seeded runs the violation rate stays <= delta (docs/routing.md)."""
    alpha, delta, runs = 0.05, 0.05, 200
    violations = 0
    local_shares = []
    for seed in range(runs):
        # A low cost of a wrong answer: the value rule alone would keep bad strata local,
        # so the risk rule is what holds the bound.
        p = policy(seed, alpha=alpha, delta=delta, wrong_answer_cost=0.05)
        run_stream(p, MIX, 2500, random.Random(1000 + seed))
        share = true_local_share(p, MIX)
        violations += share > alpha
        plan = p.escalation_plan()
        local_shares.append(sum(w for c, w, _ in MIX if plan[p.stratum(c, None)] == "local"))
    assert violations / runs <= delta, f"{violations} of {runs} runs broke the bound"
    # Not by escalating everything: most of the traffic is answered locally.
    assert float(np.mean(local_shares)) > 0.5


def test_escalates_less_when_the_cloud_never_disagrees_more_when_it_often_does() -> None:
    never = [(c, w, 0.0) for c, w, _ in MIX]
    often = [(c, w, 0.3) for c, w, _ in MIX]
    quiet, busy = policy(1), policy(1)
    run_stream(quiet, never, 3000, random.Random(5))  # warm-up
    run_stream(busy, often, 3000, random.Random(5))
    esc_quiet, _ = run_stream(quiet, never, 2000, random.Random(6))
    esc_busy, _ = run_stream(busy, often, 2000, random.Random(6))
    assert esc_quiet < 0.1 * 2000
    assert esc_busy > 0.9 * 2000
    assert esc_quiet < esc_busy


def test_audit_samples_stay_at_the_configured_share() -> None:
    never = [(c, w, 0.0) for c, w, _ in MIX]
    p = policy(2, audit_share=0.02)
    run_stream(p, never, 3000, random.Random(7))  # warm-up until strata go local
    before = dict(p.counters)
    _, audits = run_stream(p, never, 20_000, random.Random(8))
    local = p.counters["local"] - before.get("local", 0)
    share = audits / (audits + local)
    sigma = math.sqrt(0.02 * 0.98 / (audits + local))
    assert abs(share - 0.02) < 4 * sigma, share


def test_a_promotion_resets_the_estimates_and_ignores_older_verdicts() -> None:
    never = [(c, w, 0.0) for c, w, _ in MIX]
    p = policy(3)
    run_stream(p, never, 3000, random.Random(9))
    assert "local" in p.escalation_plan().values()
    choice = p.decide(0.995, None)
    p.expect("old", choice.stratum, "walking")
    p.reset("promotion")
    assert set(p.escalation_plan().values()) == {"value"}  # no evidence: ask everything
    snap = p.snapshot()
    assert all(s["verdicts"] == 0 for s in snap["strata"].values())
    p.on_verdict(verdict("old", "walking"))
    assert p.counters["verdicts_stale"] == 1
    assert p.snapshot()["strata"][choice.stratum]["verdicts"] == 0
    assert p.counters["reset_promotion"] == 1


def test_unsure_disagreements_are_not_corrections() -> None:
    p = policy(4)
    for i in range(400):
        choice = p.decide(0.97, None)
        p.expect(f"u{i}", choice.stratum, "walking")
        p.on_verdict(verdict(f"u{i}", "running", confidence=0.6))  # the cloud guesses
    s = p.snapshot()["strata"][p.stratum(0.97, None)]
    assert s["disagree"] > 300
    assert s["corrections"] == 0
    assert s["plan"] == "local"


def decision(confidence: float, reason: str | None) -> Decision:
    return Decision(
        label="walking",
        confidence=confidence,
        route=Route.HARD if reason else Route.LOCAL,
        reason=reason,
        model="m@1",
        latency_ms=0.1,
        reading=Reading(np.zeros((1, 1), dtype=np.float32)),
    )


def test_the_router_reports_a_broken_sensor_as_an_alert_not_a_cloud_case() -> None:
    fixed = Router(RouterSettings())
    assert fixed.plan(decision(0.99, "dead_sensor")).action == "alert"
    assert fixed.plan(decision(0.99, "saturated")).action == "alert"
    assert fixed.plan(decision(0.6, "low_confidence")).action == "escalate"
    assert fixed.plan(decision(0.99, None)).action == "local"
    assert fixed.counters["alert_dead_sensor"] == 1
    paid = Router(RouterSettings(alert_escalate=True))
    assert paid.plan(decision(0.99, "dead_sensor")).action == "escalate"


def test_the_learned_router_marks_audits_and_keeps_confident_strata_local() -> None:
    p = policy(5, audit_share=1.0)
    r = Router(p.settings, learned=p)
    first = r.plan(decision(0.995, None))
    assert (first.action, first.reason) == ("escalate", "policy")  # no evidence yet
    for i in range(300):  # the cloud always agrees in this stratum
        p.expect(f"a{i}", first.stratum, "walking")
        p.on_verdict(verdict(f"a{i}", "walking"))
    for _ in range(20):
        p.decide(0.995, None)  # let the plan catch up
    audit = r.plan(decision(0.995, None))
    assert (audit.action, audit.reason, audit.tier) == ("escalate", "audit", Tier.BATCH)


def test_the_learned_settings_come_from_the_environment_and_are_checked() -> None:
    s = load_settings(
        None,
        env={
            "EDGE_AGENT_ROUTER_POLICY": "learned",
            "EDGE_AGENT_ROUTER_LEARN_BINS": "0.6, 0.9",
            "EDGE_AGENT_ROUTER_ALPHA": "0.02",
            "EDGE_AGENT_ROUTER_ALERT_REASONS": "dead_sensor",
        },
    )
    r = s.router
    assert (r.policy, r.learn_bins, r.alpha, r.alert_reasons) == (
        "learned", [0.6, 0.9], 0.02, ["dead_sensor"]
    )  # fmt: skip
    for key, value in (
        ("POLICY", "clever"),
        ("LEARN_BINS", "0.6, 1.5"),
        ("LEARN_BINS", "0.6, x"),
        ("DELTA", "0"),
        ("AUDIT_SHARE", "2"),
    ):
        with pytest.raises(ConfigError, match=f"(?i){key}"):
            load_settings(None, env={f"EDGE_AGENT_ROUTER_{key}": value})


def test_the_pipeline_counts_the_route_the_router_leaves() -> None:
    """A hard reading the learned policy answers locally is counted (and printed) as local."""
    import json  # noqa: PLC0415

    from edge_agent.models.pack import BUNDLED_TEST_DATA, resolve  # noqa: PLC0415
    from edge_agent.scoring.pipeline import ScorePipeline  # noqa: PLC0415
    from edge_agent.scoring.scorer import Scorer  # noqa: PLC0415

    scorer = Scorer.open(resolve())
    lines = []
    for raw in BUNDLED_TEST_DATA.read_bytes().splitlines()[:5]:
        w = json.loads(raw)
        w["values"] = [[v * 1000.0 for v in row] for row in w["values"]]  # far out of range
        lines.append(json.dumps(w).encode())
    plain = ScorePipeline(scorer, 1 << 20)
    plain.process(lines)
    assert plain.counts["hard"] == 5  # the scorer calls every one hard

    def keep_local(d: Decision) -> None:
        d.route = Route.LOCAL

    pipe = ScorePipeline(scorer, 1 << 20, on_decision=keep_local)
    out = pipe.process(lines)
    scorer.close()
    assert (pipe.counts["hard"], pipe.counts["local"]) == (0, 5)
    assert out.count(b'"route":"local"') == 5
