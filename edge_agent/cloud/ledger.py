"""The cloud's cost ledger: what was scored, priced per device and UTC day, and what an
all-cloud design would have cost. Pure arithmetic (thread-safe), plus its file.

With ``cloud.ledger_path`` set the worker writes the ledger atomically every
``LEDGER_WRITE_INTERVAL_S`` and at stop, and reads it back at start, so a restart keeps the
day's figures. Give every worker its own ledger path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from edge_agent.config import CloudSettings, EndpointSettings
from edge_agent.util.files import Durability, atomic_write
from edge_agent.wire.messages import DECODE_ERRORS, Tier

log = logging.getLogger(__name__)

#: Seconds between two writes of the ledger file while running (it is also written at stop).
LEDGER_WRITE_INTERVAL_S = 30.0
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
        self._changes = 0

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

    def charge(
        self, device: str, tier: Tier, cases: int = 1, at: dt.datetime | None = None
    ) -> float:
        """Record ``cases`` scored cases of ``device`` in ``tier``; returns what they cost."""
        if cases < 0:
            raise ValueError("cases must be >= 0")
        day = self._day(at)
        sync = self.tokens_per_reading / 1000.0 * self.price_sync_per_1k_tokens
        cost = cases * (sync if tier == Tier.URGENT else sync * (1.0 - self.batch_discount))
        with self._lock:
            usage = self._usage_locked(day, device)
            usage.tokens += cases * self.tokens_per_reading
            if tier == Tier.URGENT:
                usage.urgent += cases
                usage.spend_urgent += cost
            else:
                usage.batch += cases
                usage.spend_batch += cost
            self._changes += 1
        return cost

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
        """Record one billed endpoint request (its ``usage``); returns what it cost.

        ``answered``: the reply was a label (counts as a scored case); an unparseable
        reply is billed all the same.
        """
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("token counts must be >= 0")
        cost = self.token_price(tier, prompt_tokens, completion_tokens)
        day = self._day(at)
        with self._lock:
            usage = self._usage_locked(day, device)
            usage.calls += 1
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.tokens += prompt_tokens + completion_tokens
            if tier == Tier.URGENT:
                usage.urgent += int(answered)
                usage.spend_urgent += cost
            else:
                usage.batch += int(answered)
                usage.spend_batch += cost
            self._changes += 1
        return cost

    @staticmethod
    def _day(at: dt.datetime | None) -> str:
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
                self._changes += 1

    def _expire(self) -> None:
        days = sorted(self._days)
        for day in days[: max(0, len(days) - self.keep_days)]:
            del self._days[day]

    @property
    def changes(self) -> int:
        """A number that grows with every recorded change (to know when to write)."""
        return self._changes

    # -- reading ------------------------------------------------------------------------

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
                "price_sync_per_1k_tokens": self.price_sync_per_1k_tokens,
                "batch_discount": self.batch_discount,
                "tokens_per_reading": self.tokens_per_reading,
                "price_prompt_per_1k": self.price_prompt_per_1k,
                "price_completion_per_1k": self.price_completion_per_1k,
                "batch_price_factor": self.batch_price_factor,
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

    # -- persistence --------------------------------------------------------------------

    def restore(self, data: bytes) -> None:
        """Add the figures of a ledger file written by ``write`` (raises ValueError if invalid)."""
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
            self._changes += 1

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write ``summary()`` to ``path`` atomically (temporary file, fsync, rename)."""
        body = json.dumps(self.summary(), indent=1, sort_keys=True).encode() + b"\n"
        atomic_write(path, body, Durability.DATA)


class LedgerFile:
    """The ledger's file: read back at start, written when the figures changed."""

    def __init__(self, ledger: CostLedger, path: str, counters: Counter[str]) -> None:
        self.ledger = ledger
        self.path = path
        self.counters = counters
        self._written = -1

    def load(self) -> None:
        """Continue the figures of an earlier run; an invalid file is moved aside, not lost."""
        path = Path(self.path)
        if not self.path or not path.exists():
            return
        problem = ""
        try:
            self.ledger.restore(path.read_bytes())
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        except ValueError as exc:
            aside = path.with_name(path.name + ".invalid")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            problem = f"is invalid ({exc}); moved to {aside}"
        if problem:
            log.error("the cost ledger %s %s; starting a new one", path, problem)
            return
        self._written = self.ledger.changes

    def write(self) -> None:
        """Write the file now if the figures changed (no-op without a path)."""
        changes = self.ledger.changes
        if not self.path or changes == self._written:
            return
        error: OSError | None = None
        try:
            self.ledger.write(self.path)
        except OSError as exc:
            error = exc
        if error is not None:
            self.counters["ledger_write_failed"] += 1
            log.error("cannot write the cost ledger to %s: %s", self.path, error)
            return
        self._written = changes
