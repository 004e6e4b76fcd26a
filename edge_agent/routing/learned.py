"""The learned escalation policy: ask the cloud where its answers have been worth the price.

Every reading falls in one **stratum**: its scorer reason when that reason is one of
``router.learn_reasons`` (the out-of-distribution guards), otherwise its bin of calibrated
confidence (``router.learn_bins``). Per stratum the policy keeps, with every count
halved every ``router.learn_half_life`` readings:

* ``traffic`` — readings that fell in it;
* ``verdicts`` — cloud verdicts on readings of it that were escalated;
* ``disagree`` — verdicts whose label differs from the local one;
* ``corrections`` — disagreements where the cloud was itself confident
  (verdict confidence >= ``router.correction_min_confidence``): the verdicts that replace
  the local answer (``Reconciler``). Below that confidence the cloud is guessing too and the
  local answer stands, so a plain disagreement changes nothing and is only reported.

From these it takes upper confidence bounds (``bounds.rate_upper``, each at level
``delta / strata``, so that all hold at once with probability >= 1 - ``delta``) and decides
per stratum:

1. **Value.** Escalate while ``upper(correction rate) x router.wrong_answer_cost``
   exceeds the price of the stratum's tier (urgent for strata the fixed rules send urgent,
   batch otherwise). A stratum with no evidence has bound 1: it is escalated until the
   cloud's verdicts show that asking does not pay.
2. **Risk.** Of the strata left local, the traffic-weighted mean of
   ``upper(correction rate)`` must be <= ``router.alpha``: with probability
   >= 1 - ``delta`` the share of local answers the cloud would have changed is at most
   ``alpha``. While it is over, the local stratum with the highest bound is escalated.
3. **Audit.** A reading of a local stratum is still sent with probability
   ``router.audit_share``, marked as an audit sample (reason ``audit``, batch tier), so
   estimates of strata that are never escalated keep being renewed.

``reset`` forgets everything (a model was promoted, drift was flagged): verdicts on
readings routed before it are ignored when they come. The policy is thread-safe: decisions
are taken on the scoring thread, verdicts arrive on the link thread.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

from edge_agent.config import RouterSettings
from edge_agent.routing.bounds import rate_upper
from edge_agent.wire.messages import Verdict

log = logging.getLogger(__name__)

#: Readings between two plans while verdicts are coming in; a plan is also made after
#: this many readings x 64 without any verdict, so that ageing shows.
_REPLAN_READINGS = 16


@dataclass(slots=True)
class _Counts:
    traffic: float = 0.0
    verdicts: float = 0.0
    disagree: float = 0.0
    corrections: float = 0.0
    at: int = 0  #: the reading clock when these counts were last aged

    def age_to(self, now: int, half_life: float) -> None:
        if now != self.at:
            f = 0.5 ** ((now - self.at) / half_life)
            self.traffic *= f
            self.verdicts *= f
            self.disagree *= f
            self.corrections *= f
            self.at = now


class Choice(NamedTuple):
    """What the policy decided for one reading."""

    escalate: bool
    audit: bool
    stratum: str
    why: str  #: ``value``, ``risk``, ``audit`` or ``local``


@dataclass(slots=True)
class _StratumPlan:
    escalate: bool
    why: str
    upper: float  #: upper bound on the correction rate
    price: float


class LearnedPolicy:
    """Per-stratum evidence from the cloud's verdicts, and the escalation plan drawn from it."""

    def __init__(
        self,
        settings: RouterSettings,
        *,
        price_urgent: float,
        price_batch: float,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.price_urgent = price_urgent
        self.price_batch = price_batch
        self.rng = rng or random.Random()  # noqa: S311 - audit sampling, not cryptography
        self.edges = sorted(settings.learn_bins)
        self.reasons = tuple(settings.learn_reasons)
        bounds = [0.0, *self.edges, 1.0]
        self.bins = [f"conf:{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(bounds)]
        self.strata = [*(f"reason:{r}" for r in self.reasons), *self.bins]
        urgent_reasons = set(settings.urgent_reasons)
        self._price = {
            f"reason:{r}": price_urgent if r in urgent_reasons else price_batch
            for r in self.reasons
        }
        for name, hi in zip(self.bins, bounds[1:], strict=True):
            self._price[name] = price_urgent if hi <= settings.urgent_below else price_batch
        #: Each bound holds with probability 1 - delta / strata: all at once with 1 - delta.
        self.level = settings.delta / len(self.strata)
        self.counters: Counter[str] = Counter()
        self.by_label: Counter[str] = Counter()  #: verdicts and disagreements per label
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self.generation = 0
        self._now = 0
        self._counts = {s: _Counts() for s in self.strata}
        self._plan: dict[str, _StratumPlan] = {}
        self._planned_at = -(10**9)
        self._dirty = True
        self.bound = 1.0  #: the certified upper bound on the share of local answers corrected

    # -- scoring thread ---------------------------------------------------------------

    def stratum(self, confidence: float, reason: str | None) -> str:
        if reason is not None and reason in self.reasons:
            return f"reason:{reason}"
        i = bisect.bisect_right(self.edges, confidence)
        return self.bins[min(i, len(self.bins) - 1)]

    def decide(self, confidence: float, reason: str | None) -> Choice:
        """Count one reading in its stratum and say whether to escalate it."""
        s = self.stratum(confidence, reason)
        with self._lock:
            self._now += 1
            c = self._counts[s]
            c.age_to(self._now, self.settings.learn_half_life)
            c.traffic += 1.0
            since = self._now - self._planned_at
            if since >= _REPLAN_READINGS * 64 or (self._dirty and since >= _REPLAN_READINGS):
                self._replan()
            plan = self._plan[s]
        if plan.escalate:
            self.counters[f"escalate_{plan.why}"] += 1
            return Choice(True, False, s, plan.why)
        if self.settings.audit_share > 0 and self.rng.random() < self.settings.audit_share:
            self.counters["audit"] += 1
            return Choice(True, True, s, "audit")
        self.counters["local"] += 1
        return Choice(False, False, s, "local")

    def expect(self, key: str, stratum: str, local_label: str) -> None:
        """Remember an escalated reading so that its verdict can be learned from."""
        with self._lock:
            self._pending[key] = (stratum, local_label, self.generation)
            while len(self._pending) > self.settings.max_pending:
                self._pending.popitem(last=False)
                self.counters["pending_forgotten"] += 1

    def reset(self, cause: str) -> None:
        """Forget every estimate (``cause``: ``promotion``, ``drift``, ...)."""
        with self._lock:
            self.generation += 1
            self._counts = {s: _Counts(at=self._now) for s in self.strata}
            self._dirty = True
            self._replan()
        self.counters[f"reset_{cause}"] += 1
        log.info("learned routing: estimates reset (%s)", cause)

    # -- link thread ------------------------------------------------------------------

    def on_verdict(self, v: Verdict) -> None:
        """A reconciled verdict (a ``Reconciler`` listener); never raises."""
        with self._lock:
            entry = self._pending.pop(v.key, None)
            if entry is None:
                return
            stratum, local_label, generation = entry
            if v.no_verdict is not None:
                self.counters["no_verdict"] += 1
                return
            if generation != self.generation:
                self.counters["verdicts_stale"] += 1
                return
            c = self._counts[stratum]
            c.age_to(self._now, self.settings.learn_half_life)
            disagree = v.label != local_label
            c.verdicts += 1.0
            c.disagree += disagree
            corrected = disagree and v.confidence >= self.settings.correction_min_confidence
            c.corrections += corrected
            self._dirty = True
            self.counters["verdicts"] += 1
            self.by_label[f"{local_label}:verdicts"] += 1
            if disagree:
                self.by_label[f"{local_label}:disagree"] += 1

    # -- the plan ---------------------------------------------------------------------

    def _replan(self) -> None:
        """Recompute every stratum's decision (lock held)."""
        s = self.settings
        plan: dict[str, _StratumPlan] = {}
        for name in self.strata:
            c = self._counts[name]
            c.age_to(self._now, s.learn_half_life)
            upper = rate_upper(c.corrections, c.verdicts, self.level)
            price = self._price[name]
            worth = upper * s.wrong_answer_cost > price
            plan[name] = _StratumPlan(worth, "value" if worth else "local", upper, price)
        local = [n for n in self.strata if not plan[n].escalate]
        # One pseudo-reading per stratum keeps a stratum never seen from weighing nothing.
        weight = {n: self._counts[n].traffic + 1.0 for n in self.strata}
        bound = _mixture(local, weight, plan)
        while local and bound > s.alpha:
            worst = max(local, key=lambda n: plan[n].upper)
            plan[worst].escalate, plan[worst].why = True, "risk"
            local.remove(worst)
            bound = _mixture(local, weight, plan)
        self.bound = bound
        self._plan = plan
        self._planned_at = self._now
        self._dirty = False

    def escalation_plan(self) -> dict[str, str]:
        """Stratum -> why it is escalated (``value``, ``risk``) or ``local``."""
        with self._lock:
            if self._dirty:
                self._replan()
            return {n: p.why for n, p in self._plan.items()}

    def snapshot(self) -> dict[str, Any]:
        """The estimates and the plan, for telemetry."""
        with self._lock:
            self._replan()
            strata = {}
            for name in self.strata:
                c, p = self._counts[name], self._plan[name]
                strata[name] = {
                    "traffic": round(c.traffic, 2),
                    "verdicts": round(c.verdicts, 2),
                    "disagree": round(c.disagree, 2),
                    "corrections": round(c.corrections, 2),
                    "upper_correction": round(p.upper, 5),
                    "price": p.price,
                    "plan": p.why,
                }
            return {
                "policy": "learned",
                "alpha": self.settings.alpha,
                "delta": self.settings.delta,
                "bound_local_corrections": round(self.bound, 5),
                "generation": self.generation,
                "readings": self._now,
                "strata": strata,
                # The same as tables of numbers (Prometheus series per stratum).
                "upper_correction": {n: v["upper_correction"] for n, v in strata.items()},
                "escalated": {n: int(v["plan"] != "local") for n, v in strata.items()},
                "counters": dict(self.counters),
                "by_label": dict(self.by_label),
            }


def _mixture(local: list[str], weight: dict[str, float], plan: dict[str, _StratumPlan]) -> float:
    """Traffic-weighted mean of the correction-rate bounds of the local strata (0 if none)."""
    total = sum(weight[n] for n in local)
    if total <= 0.0:
        return 0.0
    return sum(weight[n] * plan[n].upper for n in local) / total
