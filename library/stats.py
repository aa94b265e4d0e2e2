"""How sure a score is: 95 % intervals for the few images a sweep judges each step on.

- `wilson_interval(k, n)`: a proportion, such as the share of images that reach the likeness bar. Wilson's
  score interval stays inside [0, 1] and stays honest at 0/n and n/n, where the textbook p ± 1.96·SE
  shrinks to a single point (8 of 8 would "prove" a pass rate of exactly 1).
- `mean_interval(values)`: the mean of a few values (mean likeness). Student's t interval; a mean of values
  that are all 0 or 1 (the toy scorer's likeness) is a proportion, so it gets Wilson's interval instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: 2.5 % above, 2.5 % below = 95 %

# Student's t 97.5th percentiles for 1 to 30 degrees of freedom (any statistics table): with n values the
# interval uses n - 1 of them; 12.7 for two values shows how little two values say.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """Student's t 97.5th percentile for `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"t975 needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    # Above 30: the Cornish-Fisher expansion in 1/df (Abramowitz & Stegun 26.7.5), within 0.001 of the
    # table from df = 30 on (2.0423 there against 2.042) and tending to Z95.
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of the proportion k/n; (0, 1) when n is 0 (nothing is known)."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """95 % interval of the mean of `values`: Wilson's for 0/1 values, else Student's t.

    None for a single value that is not 0 or 1: one number says nothing about its own spread.
    """
    n = len(values)
    if n and all(v in (0.0, 1.0) for v in values):
        return wilson_interval(int(sum(values)), n)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))  # sample standard deviation
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half
