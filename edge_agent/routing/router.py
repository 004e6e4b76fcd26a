"""Escalation policy: which cloud tier a hard case goes to, and what came back.

``Router.tier`` decides from a Decision alone. A hard case is **urgent** when
the model is very unsure (confidence below ``router.urgent_below``), when its
reason is one of ``router.urgent_reasons``, or when its label is one of
``router.urgent_labels``; every other hard case goes to the **batch** tier.
Two brakes keep urgent traffic (and its cost) bounded: a cooldown per
(device, label) — within ``router.cooldown_s`` of an urgent case with the same
label, the next one goes to batch — and a budget of
``router.max_urgent_per_minute``; past it, hard cases go to batch. Both are
counted.

The device never waits for the cloud: the local answer is acted on at once,
marked provisional. ``Reconciler`` remembers each urgent case's deadline and
local label; when the cloud's verdict arrives it records whether it came in
time and whether it agreed. Verdicts that come after the deadline are counted
as late; urgent cases without any verdict by their deadline as missed. A
"no verdict" answer (``Verdict.no_verdict`` set: the cloud's endpoint failed or
its answer did not parse) settles the case without a label: it is counted in
``no_verdict`` (and ``no_verdict_<tier>``), never as agreement or disagreement,
and the local answer stands. A verdict that disagrees replaces the local answer only when
its confidence is at least ``router.correction_min_confidence`` (counted in ``corrected``);
below it the cloud is guessing too, the local answer stands (``disagree_unsure``).

``Router.plan`` is the whole decision for one reading: answered locally, escalated (with
its tier), or reported as an **alert** — a scorer reason in ``router.alert_reasons`` (a
dead or saturated sensor) is something no cloud model can fix, so by default it is not
paid for as cloud scoring. Under ``router.policy = "learned"`` what is escalated comes
from ``learned.LearnedPolicy`` (see docs/routing.md); under ``fixed`` it is what the
scorer calls hard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from edge_agent.config import RouterSettings
from edge_agent.routing.learned import LearnedPolicy
from edge_agent.scoring.scorer import Decision, Route
from edge_agent.wire.messages import DECODE_ERRORS, Tier, Verdict, decode_verdicts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one reading."""

    action: Literal["local", "escalate", "alert"]
    tier: Tier | None = None
    #: The reason sent with an escalated case: the scorer's, or ``audit`` (a random sample
    #: of local answers) or ``policy`` (a confident reading the learned policy escalates).
    reason: str | None = None
    stratum: str = ""  #: the learned policy's stratum ("" under the fixed policy)


class Router:
    """Chooses the tier of each hard case; not thread-safe (the scoring loop owns it)."""

    def __init__(
        self,
        settings: RouterSettings,
        clock: Callable[[], float] = time.monotonic,
        *,
        learned: LearnedPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.learned = learned
        self._urgent_reasons = frozenset(settings.urgent_reasons)
        self._urgent_labels = frozenset(settings.urgent_labels)
        self._alert_reasons = frozenset(settings.alert_reasons)
        self._last_urgent: dict[str, float] = {}
        self._recent: deque[float] = deque()

    def plan(self, d: Decision) -> Plan:
        """Local, escalated (and to which tier) or an alert, for one scored reading."""
        if d.reason in self._alert_reasons and not self.settings.alert_escalate:
            self.counters[f"alert_{d.reason}"] += 1
            return Plan("alert", reason=d.reason)
        if self.learned is None or d.reason in self._alert_reasons:
            # fixed policy, or an alert reason with alert_escalate: asked, never learned
            if d.route != Route.HARD:
                return Plan("local")
            return Plan("escalate", self.tier(d), d.reason)
        choice = self.learned.decide(d.confidence, d.reason)
        if not choice.escalate:
            if d.route == Route.HARD:
                self.counters["local_by_policy"] += 1
            return Plan("local", stratum=choice.stratum)
        if choice.audit:
            self.counters["audit"] += 1
            return Plan("escalate", Tier.BATCH, "audit", choice.stratum)
        return Plan("escalate", self.tier(d), d.reason or "policy", choice.stratum)

    def tier(self, d: Decision) -> Tier:
        """``Tier.URGENT`` or ``Tier.BATCH`` for a hard decision."""
        wants_urgent = (
            d.confidence < self.settings.urgent_below
            or d.reason in self._urgent_reasons
            or d.label in self._urgent_labels
        )
        if not wants_urgent:
            self.counters["batch_by_policy"] += 1
            return Tier.BATCH
        now = self.clock()
        last = self._last_urgent.get(d.label)
        if last is not None and now - last < self.settings.cooldown_s:
            self.counters["batch_by_cooldown"] += 1
            return Tier.BATCH
        while self._recent and now - self._recent[0] >= 60.0:
            self._recent.popleft()
        if len(self._recent) >= self.settings.max_urgent_per_minute:
            self.counters["batch_by_budget"] += 1
            return Tier.BATCH
        self._recent.append(now)
        self._last_urgent[d.label] = now
        self.counters["urgent"] += 1
        return Tier.URGENT


@dataclass(slots=True)
class _Awaiting:
    sent: float
    local_label: str
    tier: Tier


class Reconciler:
    """Matches cloud verdicts to the hard cases they answer; thread-safe."""

    def __init__(
        self, settings: RouterSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Urgent cases in send order, so deadlines are in order too; batch cases apart.
        self._pending: dict[Tier, OrderedDict[str, _Awaiting]] = {
            Tier.URGENT: OrderedDict(),
            Tier.BATCH: OrderedDict(),
        }
        self._overdue: OrderedDict[str, _Awaiting] = OrderedDict()
        self.round_trips_ms: deque[float] = deque(maxlen=10_000)
        #: Called (on the link thread) with each verdict that matched a hard case, "no
        #: verdict" answers included (``v.no_verdict`` set, ``v.label`` empty).
        self.listeners: list[Callable[[Verdict], None]] = []

    def expect(self, key: str, local_label: str, tier: Tier) -> None:
        """Remember a hard case sent to the cloud (urgent ones with a deadline)."""
        with self._lock:
            pending = self._pending[tier]
            pending[key] = _Awaiting(self.clock(), local_label, tier)
            if len(pending) > self.settings.max_pending:
                old_key, _ = pending.popitem(last=False)
                self.counters[f"forgotten_{tier}"] += 1
                log.warning("forgot pending hard case %s: too many awaiting a verdict", old_key)

    def on_verdict(self, payload: bytes) -> None:
        """Take one verdict message (single or batch) from the link; never raises."""
        try:
            verdicts = decode_verdicts(payload)
        except DECODE_ERRORS as exc:
            self.counters["verdicts_malformed"] += 1
            log.warning("malformed verdict ignored: %s", exc)
            return
        now = self.clock()
        with self._lock:
            for v in verdicts:
                self._take(v, now)

    def _take(self, v: Verdict, now: float) -> None:
        entry = self._pending[v.tier].pop(v.key, None)
        late = False
        if entry is None:
            entry = self._overdue.pop(v.key, None)
            late = entry is not None
        if entry is None:
            self.counters["verdicts_unknown"] += 1  # a duplicate, or from before a restart
            return
        if v.no_verdict is not None:
            # The cloud answered that it has no answer: the local one stands; not missed.
            self.counters["no_verdict"] += 1
            self.counters[f"no_verdict_{entry.tier}"] += 1
            for listener in self.listeners:
                listener(v)
            return
        self.counters[f"verdicts_{entry.tier}"] += 1
        if entry.tier == Tier.URGENT:
            if late:
                self.counters["verdicts_late"] += 1
            else:
                self.counters["verdicts_on_time"] += 1
                self.round_trips_ms.append((now - entry.sent) * 1000.0)
        agree = v.label == entry.local_label
        self.counters["agree" if agree else "disagree"] += 1
        if not agree:
            sure = v.confidence >= self.settings.correction_min_confidence
            self.counters["corrected" if sure else "disagree_unsure"] += 1
        for listener in self.listeners:
            listener(v)

    def sweep(self) -> None:
        """Move urgent cases past their deadline to overdue (counted as missed)."""
        now = self.clock()
        with self._lock:
            urgent = self._pending[Tier.URGENT]
            while urgent:
                key, first = next(iter(urgent.items()))
                if first.sent + self.settings.deadline_ms / 1000.0 > now:
                    break
                del urgent[key]
                self._overdue[key] = first
                self.counters["deadline_missed"] += 1
            while len(self._overdue) > self.settings.max_pending:
                self._overdue.popitem(last=False)

    def agreement(self) -> float | None:
        n = self.counters["agree"] + self.counters["disagree"]
        return self.counters["agree"] / n if n else None

    def waiting_urgent(self) -> int:
        """Urgent cases still inside their deadline without a verdict."""
        with self._lock:
            return len(self._pending[Tier.URGENT])

    def waiting(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._pending.values())
