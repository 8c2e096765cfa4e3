"""Statistics the benchmarks share: the median of paired ratios and its distribution-free interval."""

from __future__ import annotations

import math

import numpy as np

#: fewer paired repeats than this give no interval: [min, max] of 4 covers the median with probability 7/8 only
MIN_REPEATS = 5


def median_interval(values, level: float = 0.95, min_n: int = MIN_REPEATS) -> dict:
    """The median of ``values`` and the distribution-free interval for the true median from order statistics:
    with x(1) <= ... <= x(n), [x(k), x(n+1-k)] covers it with probability 1 − 2·P(Bin(n, ½) < k), whatever the
    distribution (the sign test's interval). k is the largest whose coverage reaches ``level``; where none does
    (n = 5: [min, max] covers 1 − 2/32 = 93.75 %), k = 1 and the coverage says so. Below ``min_n`` values no
    interval: ``low``, ``high`` and ``coverage`` are None. (A percentile bootstrap, used before, printed a
    "95 %" interval of zero width from one repeat and covered 75 % at three.)"""
    v = sorted(float(x) for x in values)
    n = len(v)
    if n == 0:
        raise ValueError("no values for an interval")
    if any(math.isnan(x) for x in v):
        raise ValueError("a value is NaN: a failed timing, not a ratio")
    out = dict(n=n, median=float(np.median(v)), low=None, high=None, coverage=None)
    if n < min_n:
        return out

    # coverage of [x(k), x(n+1-k)], k = 1 ..: 1 − 2·P(Bin(n, ½) < k), in exact integers (2.0**n overflows at 1024)
    cover, below = [], 0
    for k in range(1, (n + 1) // 2 + 1):
        below += math.comb(n, k - 1)
        cover.append(1.0 - 2 * below / 2**n)
    k = max((k for k, c in enumerate(cover, 1) if c >= level), default=1)
    return dict(out, low=v[k - 1], high=v[n - k], coverage=cover[k - 1])
