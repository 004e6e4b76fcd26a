"""Upper confidence bounds on a rate from (possibly age-weighted) counts.

``rate_upper(k, n, delta)`` is the largest ``p`` with ``n * kl(k/n, p) <= ln(1/delta)``,
where ``kl`` is the Kullback-Leibler divergence between two Bernoulli laws. It is the
Chernoff bound in its exact form: for ``n`` independent trials of true rate ``p``,
``P(k/n <= q) <= exp(-n kl(q, p))`` for every ``q <= p``, so the true rate exceeds the
bound with probability at most ``delta``. With no event (``k = 0``) it equals the
Clopper-Pearson bound, ``1 - delta**(1/n)``; with events it is a little wider.

Unlike Clopper-Pearson it stays valid when the counts are sums of weights in [0, 1]
(verdicts that have aged and count for less): the moment generating function of a
weighted Bernoulli, ``1 - p + p e^(t w)``, is at most ``(1 - p + p e^t)^w`` for ``w`` in
[0, 1], so the weighted sum obeys the same exponential bound with ``n`` the sum of the
weights. docs/routing.md has the argument in full.
"""

from __future__ import annotations

import math

_STEPS = 48  #: bisection steps: the interval shrinks to 2**-48


def bernoulli_kl(q: float, p: float) -> float:
    """KL divergence of Bernoulli(q) from Bernoulli(p), for 0 <= q <= 1 and 0 < p < 1."""
    out = 0.0
    if q > 0.0:
        out += q * math.log(q / p)
    if q < 1.0:
        out += (1.0 - q) * math.log((1.0 - q) / (1.0 - p))
    return out


def rate_upper(k: float, n: float, delta: float) -> float:
    """Upper bound at confidence ``1 - delta`` on the rate behind ``k`` events in ``n`` trials.

    ``n`` may be fractional (age-weighted counts); ``n <= 0`` means no evidence: 1.0.
    """
    if n <= 0.0:
        return 1.0
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), not {delta}")
    q = min(max(k / n, 0.0), 1.0)
    if q >= 1.0:
        return 1.0
    budget = math.log(1.0 / delta) / n
    lo, hi = q, 1.0
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        if bernoulli_kl(q, mid) > budget:
            hi = mid
        else:
            lo = mid
    return hi
