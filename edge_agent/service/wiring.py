"""What an agent is built from, given its settings: its outbox and its learned policy."""

from __future__ import annotations

from pathlib import Path

from edge_agent.config import Settings
from edge_agent.delivery.outbox import ClassLimits, Cls, Outbox
from edge_agent.routing.learned import LearnedPolicy


def open_outbox(settings: Settings) -> Outbox:
    """The state directory's outbox, with the ``[outbox]`` limits of each class."""
    o = settings.outbox
    limits = {
        Cls.URGENT: ClassLimits(o.urgent_max_rows, o.urgent_max_bytes, o.urgent_ttl_s),
        Cls.BATCH: ClassLimits(o.batch_max_rows, o.batch_max_bytes, o.batch_ttl_s),
        Cls.TELEMETRY: ClassLimits(o.telemetry_max_rows, o.telemetry_max_bytes, o.telemetry_ttl_s),
    }
    return Outbox(
        Path(settings.device.state_dir) / "outbox.db",
        limits,
        o.max_total_bytes,
        hard_sync=o.hard_sync.upper(),
    )


def learned_policy(settings: Settings) -> LearnedPolicy | None:
    """The learned escalation policy when ``router.policy = "learned"``, priced by ``[cloud]``."""
    if settings.router.policy != "learned":
        return None
    c = settings.cloud
    urgent = c.price_sync_per_1k_tokens * c.tokens_per_reading / 1000.0
    return LearnedPolicy(
        settings.router, price_urgent=urgent, price_batch=urgent * c.batch_discount
    )
