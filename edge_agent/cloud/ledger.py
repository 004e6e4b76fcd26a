"""The cloud's cost ledger: what was scored, priced per device and UTC day, and what an
all-cloud design would have cost. Pure arithmetic (thread-safe).

With ``cloud.ledger_path`` set, every charge is first recorded in the ledger's database
(``ledger_store.py``) and then added here; a worker reads the database back at start.
``restore`` reads the earlier JSON format of the ledger file (imported once by the store).
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from typing import Any

import msgspec

from edge_agent.config import CloudSettings, EndpointSettings
from edge_agent.wire.messages import DECODE_ERRORS, Tier

#: UTC days of per-day figures the ledger keeps; older days are dropped (totals too).
LEDGER_KEEP_DAYS = 400
LEDGER_SCHEMA = 1


class Usage(msgspec.Struct):
    """What one device was charged on one UTC day (also its form in the ledger file)."""

    urgent: int = 0  #: urgent cases scored
    batch: int = 0  #: batch cases scored
    tokens: int = 0
    spend_urgent: float = 0.0
    spend_batch: float = 0.0
    #: Endpoint requests billed (with a ``usage``), answered or not, and their tokens.
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cases(self) -> int:
        return self.urgent + self.batch

    @property
    def spend(self) -> float:
        return self.spend_urgent + self.spend_batch

    def add(self, other: Usage) -> None:
        self.urgent += other.urgent
        self.batch += other.batch
        self.tokens += other.tokens
        self.spend_urgent += other.spend_urgent
        self.spend_batch += other.spend_batch
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "urgent": self.urgent,
            "batch": self.batch,
            "tokens": self.tokens,
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "spend_urgent": _money(self.spend_urgent),
            "spend_batch": _money(self.spend_batch),
            "spend": _money(self.spend),
        }


class _SavedDevice(msgspec.Struct):
    readings_total: int = 0


class _SavedLedger(msgspec.Struct):
    v: int
    days: dict[str, dict[str, Usage]] = {}
    devices: dict[str, _SavedDevice] = {}


def _money(x: float) -> float:
    return round(x, 9)


class CostLedger:
    """Pure arithmetic over what the cloud scored; thread-safe.

    Prices, cloud pack (estimated): a case costs ``tokens_per_reading`` tokens;
    urgent (synchronous) cases ``tokens / 1000 * price_sync_per_1k_tokens``,
    batch cases the same times ``1 - batch_discount``. Figures are kept per
    device and UTC day.

    Prices, endpoint (measured, ``charge_tokens``): every billed request costs
    its ``usage`` — ``prompt_tokens / 1000 * price_prompt_per_1k +
    completion_tokens / 1000 * price_completion_per_1k`` — times
    ``batch_price_factor`` in the batch tier; a request whose answer did not
    parse is billed too (``calls`` counts billed requests, ``urgent``/``batch``
    the cases answered). Once requests were billed, the unit price of a case
    (and so the all-cloud counterfactual below) is the measured mean tokens per
    request at those prices, not the ``tokens_per_reading`` estimate.

    The counterfactual: each hard case carries the number of readings its
    device had scored so far (``readings_total``); the highest value seen per
    device (never fewer than the cases scored for it) is what an all-cloud
    design would have sent. ``all_cloud_sync`` prices all of them as urgent
    calls, ``all_cloud_batch`` as batch cases; ``spend`` is what the hybrid
    actually cost. A device that never escalates is never seen, so the
    counterfactual is a lower bound.
    """

    def __init__(
        self,
        price_sync_per_1k_tokens: float,
        batch_discount: float,
        tokens_per_reading: int,
        keep_days: int = LEDGER_KEEP_DAYS,
        *,
        price_prompt_per_1k: float = 0.0,
        price_completion_per_1k: float = 0.0,
        batch_price_factor: float = 0.5,
    ) -> None:
        if price_sync_per_1k_tokens < 0 or not math.isfinite(price_sync_per_1k_tokens):
            raise ValueError("price_sync_per_1k_tokens must be a finite number >= 0")
        if not 0.0 <= batch_discount <= 1.0:
            raise ValueError("batch_discount must be within [0, 1]")
        if tokens_per_reading < 1 or keep_days < 1:
            raise ValueError("tokens_per_reading and keep_days must be >= 1")
        self.price_sync_per_1k_tokens = price_sync_per_1k_tokens
        self.batch_discount = batch_discount
        self.tokens_per_reading = tokens_per_reading
        self.keep_days = keep_days
        for price in (price_prompt_per_1k, price_completion_per_1k):
            if price < 0 or not math.isfinite(price):
                raise ValueError("endpoint prices must be finite numbers >= 0")
        if not 0.0 <= batch_price_factor <= 1.0:
            raise ValueError("batch_price_factor must be within [0, 1]")
        self.price_prompt_per_1k = price_prompt_per_1k
        self.price_completion_per_1k = price_completion_per_1k
        self.batch_price_factor = batch_price_factor
        self._days: dict[str, dict[str, Usage]] = {}
        self._readings_total: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, cloud: CloudSettings, endpoint: EndpointSettings) -> CostLedger:
        return cls(
            cloud.price_sync_per_1k_tokens,
            cloud.batch_discount,
            cloud.tokens_per_reading,
            price_prompt_per_1k=endpoint.price_prompt_per_1k,
            price_completion_per_1k=endpoint.price_completion_per_1k,
            batch_price_factor=endpoint.batch_price_factor,
        )

    def pricing(self) -> dict[str, float | int]:
        """The prices (the constructor's arguments), for ``from_pricing``."""
        return {
            "price_sync_per_1k_tokens": self.price_sync_per_1k_tokens,
            "batch_discount": self.batch_discount,
            "tokens_per_reading": self.tokens_per_reading,
            "price_prompt_per_1k": self.price_prompt_per_1k,
            "price_completion_per_1k": self.price_completion_per_1k,
            "batch_price_factor": self.batch_price_factor,
        }

    @classmethod
    def from_pricing(cls, p: dict[str, Any]) -> CostLedger:
        """A ledger with the prices ``pricing()`` gave (raises ValueError/TypeError if invalid)."""
        return cls(
            float(p["price_sync_per_1k_tokens"]),
            float(p["batch_discount"]),
            int(p["tokens_per_reading"]),
            price_prompt_per_1k=float(p["price_prompt_per_1k"]),
            price_completion_per_1k=float(p["price_completion_per_1k"]),
            batch_price_factor=float(p["batch_price_factor"]),
        )

    # -- prices -------------------------------------------------------------------------

    def token_price(self, tier: Tier, prompt_tokens: float, completion_tokens: float) -> float:
        """Cost of an endpoint request with these measured tokens in ``tier``."""
        sync = (
            prompt_tokens / 1000.0 * self.price_prompt_per_1k
            + completion_tokens / 1000.0 * self.price_completion_per_1k
        )
        return sync if tier == Tier.URGENT else sync * self.batch_price_factor

    def _measured_locked(self) -> tuple[float, float] | None:
        calls = prompt = completion = 0
        for per_device in self._days.values():
            for u in per_device.values():
                calls += u.calls
                prompt += u.prompt_tokens
                completion += u.completion_tokens
        return (prompt / calls, completion / calls) if calls else None

    def measured_tokens(self) -> tuple[float, float] | None:
        """Mean (prompt, completion) tokens per billed endpoint request; None before any."""
        with self._lock:
            return self._measured_locked()

    def unit_price(self, tier: Tier) -> float:
        """Cost of one case in ``tier``: measured tokens once the endpoint billed any."""
        with self._lock:
            measured = self._measured_locked()
        return self._unit_price(tier, measured)

    def _unit_price(self, tier: Tier, measured: tuple[float, float] | None) -> float:
        if measured is not None:
            return self.token_price(tier, *measured)
        sync = self.tokens_per_reading / 1000.0 * self.price_sync_per_1k_tokens
        return sync if tier == Tier.URGENT else sync * (1.0 - self.batch_discount)

    # -- recording ----------------------------------------------------------------------

    def case_usage(self, tier: Tier, cases: int = 1) -> Usage:
        """What ``cases`` cases scored by the cloud pack in ``tier`` add (the estimate)."""
        if cases < 0:
            raise ValueError("cases must be >= 0")
        sync = self.tokens_per_reading / 1000.0 * self.price_sync_per_1k_tokens
        cost = cases * (sync if tier == Tier.URGENT else sync * (1.0 - self.batch_discount))
        tokens = cases * self.tokens_per_reading
        if tier == Tier.URGENT:
            return Usage(urgent=cases, tokens=tokens, spend_urgent=cost)
        return Usage(batch=cases, tokens=tokens, spend_batch=cost)

    def request_usage(
        self, tier: Tier, prompt_tokens: int, completion_tokens: int, *, answered: bool
    ) -> Usage:
        """What one billed endpoint request adds (its ``usage``); ``answered``: the reply was
        a label (a scored case); an unparseable reply is billed all the same."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("token counts must be >= 0")
        cost = self.token_price(tier, prompt_tokens, completion_tokens)
        usage = Usage(
            calls=1,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tokens=prompt_tokens + completion_tokens,
        )
        if tier == Tier.URGENT:
            usage.urgent, usage.spend_urgent = int(answered), cost
        else:
            usage.batch, usage.spend_batch = int(answered), cost
        return usage

    def apply(self, device: str, usage: Usage, day: str | dt.datetime | None = None) -> None:
        """Add ``usage`` to ``device``'s figures of ``day`` (a UTC date, default today)."""
        key = day if isinstance(day, str) else self.day_of(day)
        with self._lock:
            self._usage_locked(key, device).add(usage)

    def charge(
        self, device: str, tier: Tier, cases: int = 1, at: dt.datetime | None = None
    ) -> float:
        """Record ``cases`` scored cases of ``device`` in ``tier``; returns what they cost."""
        usage = self.case_usage(tier, cases)
        self.apply(device, usage, at)
        return usage.spend

    def charge_tokens(
        self,
        device: str,
        tier: Tier,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        answered: bool,
        at: dt.datetime | None = None,
    ) -> float:
        """Record one billed endpoint request (its ``usage``); returns what it cost."""
        usage = self.request_usage(tier, prompt_tokens, completion_tokens, answered=answered)
        self.apply(device, usage, at)
        return usage.spend

    @staticmethod
    def day_of(at: dt.datetime | None) -> str:
        """The UTC date (ISO) of ``at`` (default: now)."""
        when = at if at is not None else dt.datetime.now(dt.UTC)
        if when.tzinfo is not None:
            when = when.astimezone(dt.UTC)
        return when.date().isoformat()

    def _usage_locked(self, day: str, device: str) -> Usage:
        per_device = self._days.get(day)
        if per_device is None:
            per_device = self._days[day] = {}
            self._expire()
        return per_device.setdefault(device, Usage())

    def observe(self, device: str, readings_total: int) -> None:
        """Note the readings count a device reported with a hard case (the highest one counts)."""
        with self._lock:
            if readings_total > self._readings_total.get(device, 0):
                self._readings_total[device] = readings_total

    def _expire(self) -> None:
        days = sorted(self._days)
        for day in days[: max(0, len(days) - self.keep_days)]:
            del self._days[day]

    # -- reading ------------------------------------------------------------------------

    def days(self) -> dict[str, dict[str, Usage]]:
        """A copy of the figures per UTC day and device."""
        with self._lock:
            return {
                day: {d: Usage(**msgspec.structs.asdict(u)) for d, u in by_device.items()}
                for day, by_device in self._days.items()
            }

    def readings_totals(self) -> dict[str, int]:
        """The highest ``readings_total`` each device reported."""
        with self._lock:
            return dict(self._readings_total)

    def totals(self) -> dict[str, Usage]:
        """Usage per device over every kept day."""
        with self._lock:
            return self._totals_locked()

    def _totals_locked(self) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        for per_device in self._days.values():
            for device, usage in per_device.items():
                out.setdefault(device, Usage()).add(usage)
        return out

    def _figures(
        self, usage: Usage, reported: int, readings: int, measured: tuple[float, float] | None
    ) -> dict[str, Any]:
        """Actual spend next to the all-cloud cost of ``readings`` readings."""
        sync = readings * self._unit_price(Tier.URGENT, measured)
        batch = readings * self._unit_price(Tier.BATCH, measured)
        return {
            **usage.as_dict(),
            "readings_total": reported,
            "readings_priced": readings,
            "all_cloud_sync": _money(sync),
            "all_cloud_batch": _money(batch),
            "saved_vs_all_cloud_sync": _money(sync - usage.spend),
            "saved_vs_all_cloud_batch": _money(batch - usage.spend),
        }

    def summary(self) -> dict[str, Any]:
        """Everything as a JSON-able dict (also the ledger file's content)."""
        with self._lock:
            measured = self._measured_locked()
            totals = self._totals_locked()
            devices = sorted(set(totals) | set(self._readings_total))
            per_device: dict[str, dict[str, Any]] = {}
            grand = Usage()
            reported_sum = priced_sum = 0
            for d in devices:
                usage = totals.get(d, Usage())
                reported = self._readings_total.get(d, 0)
                priced = max(reported, usage.cases)
                per_device[d] = self._figures(usage, reported, priced, measured)
                grand.add(usage)
                reported_sum += reported
                priced_sum += priced
            total = self._figures(grand, reported_sum, priced_sum, measured)
            total["devices"] = len(devices)
            days = {
                day: {d: u.as_dict() for d, u in sorted(by_device.items())}
                for day, by_device in sorted(self._days.items())
            }
        return {
            "v": LEDGER_SCHEMA,
            "pricing": {
                **self.pricing(),
                "tokens_measured": measured is not None,
                "mean_prompt_tokens": None if measured is None else round(measured[0], 3),
                "mean_completion_tokens": None if measured is None else round(measured[1], 3),
                "unit_price_urgent": _money(self._unit_price(Tier.URGENT, measured)),
                "unit_price_batch": _money(self._unit_price(Tier.BATCH, measured)),
            },
            "total": total,
            "devices": per_device,
            "days": days,
        }

    # -- the earlier file format ----------------------------------------------------------

    def restore(self, data: bytes) -> None:
        """Add the figures of a JSON ledger file (the format before the ledger's database;
        ``summary()`` as JSON); raises ValueError if it is not one."""
        try:
            saved = msgspec.json.decode(data, type=_SavedLedger)
        except DECODE_ERRORS as exc:
            raise ValueError(f"not a ledger file: {exc}") from exc
        if saved.v != LEDGER_SCHEMA:
            raise ValueError(f"ledger schema {saved.v} is not {LEDGER_SCHEMA}")
        with self._lock:
            for day, by_device in saved.days.items():
                target = self._days.setdefault(day, {})
                for device, usage in by_device.items():
                    target.setdefault(device, Usage()).add(usage)
            for device, sd in saved.devices.items():
                if sd.readings_total > self._readings_total.get(device, 0):
                    self._readings_total[device] = sd.readings_total
            self._expire()
