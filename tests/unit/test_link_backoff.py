"""Reconnect backoff shared by the device link and the cloud worker."""

from __future__ import annotations

from edge_agent.config import LinkSettings
from edge_agent.mqtt.session import backoff_s


def test_backoff_grows_to_its_ceiling_with_full_jitter() -> None:
    lk = LinkSettings(reconnect_min_s=0.2, reconnect_max_s=30.0)
    for attempt, ceiling in [(0, 0.2), (1, 0.4), (3, 1.6), (8, 30.0), (1000, 30.0)]:
        draws = [backoff_s(lk, attempt) for _ in range(500)]
        assert min(draws) >= 0.2
        assert max(draws) <= ceiling
        if ceiling > 1.0:  # spread over the range, not bunched at its top
            assert min(draws) < ceiling / 4
