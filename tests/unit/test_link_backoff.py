"""Reconnect backoff shared by the device link and the cloud worker."""

from __future__ import annotations

from statistics import fmean

from edge_agent.config import LinkSettings
from edge_agent.mqtt.session import backoff_s


def test_backoff_grows_to_its_ceiling_with_full_jitter() -> None:
    """Attempt n waits a uniform draw from [min, min x 2^n] capped at max. With 500 draws the
    bounds below fail by chance with a probability under 1e-12 (the largest draw stays under
    3/4 of the range with probability (3/4)^500; the mean's bound is over 7 standard errors)."""
    lk = LinkSettings(reconnect_min_s=0.2, reconnect_max_s=30.0)
    for attempt, ceiling in [(0, 0.2), (1, 0.4), (3, 1.6), (5, 6.4), (8, 30.0), (1000, 30.0)]:
        draws = [backoff_s(lk, attempt) for _ in range(500)]
        assert min(draws) >= 0.2
        assert max(draws) <= ceiling
        if ceiling == 0.2:
            assert set(draws) == {0.2}
            continue
        spread = ceiling - 0.2
        # It grows: the longest waits reach the top of this attempt's range...
        assert max(draws) > 0.2 + 0.75 * spread, (attempt, max(draws))
        # ...and it is jittered over the whole range, not bunched at either end.
        assert min(draws) < 0.2 + 0.25 * spread, (attempt, min(draws))
        assert abs(fmean(draws) - (0.2 + ceiling) / 2) < 0.1 * spread, (attempt, fmean(draws))
