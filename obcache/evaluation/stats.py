"""Small-sample statistics for `obcache report`: intervals and paired comparisons (numpy and stdlib only).

The methods, all at 95% by default:

- a proportion (every value 0 or 1): the Wilson score interval, which stays
  inside [0, 1] and keeps close to its nominal coverage even for small n and
  for 0 or n successes, unlike the Wald interval;
- a mean of other values: the Student t interval, mean +- t(0.975, n - 1) s / sqrt(n).
  The t quantile comes from the exact t distribution function for integer
  degrees of freedom (Abramowitz & Stegun 26.7.3 and 26.7.4, a finite sum),
  inverted by bisection; no table, no approximation;
- a paired comparison of two columns measured on the same samples: the
  differences d = a - b, their mean with the paired t interval (the interval
  above applied to d: deterministic, no resampling), wins / ties / losses
  counted in the metric's better direction, and the exact two-sided sign test
  on the pairs that are not tied. For 0/1 outcomes the non-tied pairs are the
  discordant pairs, and the sign test is exactly McNemar's exact (binomial)
  test. For continuous outcomes the sign test is used too (not Wilcoxon): it
  is exact for every n and assumes nothing about the shape of the differences
  (perplexity and KL differences are skewed), at the cost of some power.
  With fewer than 6 non-tied pairs it can never reach p < 0.05;
- Holm's step-down adjustment of a family of p-values.

The t interval of the differences is descriptive: with very few pairs or
identical differences (zero spread) it can exclude 0 while the exact test
does not reject; significance is always the exact test's p-value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a proportion successes / n."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z, p = _z(confidence), successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer df >= 1 (A&S 26.7.3 / 26.7.4, exact up to rounding)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be an integer >= 1, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    k = np.arange(1, (df - 2) // 2 + 1)  # the terms after the first
    if df % 2 == 0:  # sin(theta) (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...)
        coef = np.cumprod((2 * k - 1) / (2 * k))
        inside = math.sin(theta) * (1 + float(np.sum(coef * cos2 ** k)))
    elif df == 1:
        inside = 2 * theta / math.pi
    else:  # (2 / pi) (theta + sin(theta) cos(theta) (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...))
        coef = np.cumprod((2 * k) / (2 * k + 1))
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * (1 + float(np.sum(coef * cos2 ** k))))
    inside = min(inside, 1.0)  # P(|T| <= |t|)
    return 0.5 + math.copysign(inside / 2, t)


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """The p quantile of Student's t with integer df >= 1 (t_cdf inverted by bisection to float precision)."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Estimate:
    """A mean with its interval; low and high are nan where no interval exists (n = 1)."""

    mean: float
    low: float
    high: float
    n: int
    method: str  # "wilson" | "t" | "none"


def is_binary(values) -> bool:
    return all(v in (0, 1) for v in values)


def mean_interval(values, confidence: float = 0.95) -> Estimate:
    """The Student t interval of the mean (nan bounds for a single value)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean, math.nan, math.nan, 1, "none")
    half = t_quantile(0.5 + confidence / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Estimate(mean, mean - half, mean + half, int(x.size), "t")


def estimate(values, *, proportion: bool = False, confidence: float = 0.95) -> Estimate:
    """Wilson for 0/1 outcomes (proportion: the values are successes, and every one is 0 or 1), else the t interval.

    A continuous metric that happens to be constant 0 or 1 (a full cache's KL or top-1) is not a proportion.
    """
    values = list(values)
    if proportion and values and is_binary(values):
        low, high = wilson(int(sum(values)), len(values), confidence)
        return Estimate(sum(values) / len(values), low, high, len(values), "wilson")
    return mean_interval(values, confidence)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (= exact McNemar on discordant pairs): min(1, 2 P(X <= min)), X ~ Bin(n, 1/2)."""
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class Paired:
    """a versus b on the same samples: mean of a - b with its paired t interval, and the exact sign test."""

    n: int
    difference: Estimate
    wins: int  # pairs where a is better than b
    ties: int
    losses: int
    p: float
    test: str  # "McNemar exact" (0/1 outcomes) | "sign test"


def paired(a, b, *, higher_is_better: bool = True, proportion: bool = False, confidence: float = 0.95) -> Paired:
    """Compare a with b, pair by pair (same order); wins count the pairs where a is better.

    proportion: 0/1 outcomes (the sign test is then McNemar's exact test, and named so).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equally long non-empty columns, got {a.shape} and {b.shape}")
    d = a - b
    better = d > 0 if higher_is_better else d < 0
    worse = d < 0 if higher_is_better else d > 0
    wins, losses = int(better.sum()), int(worse.sum())
    test = "McNemar exact" if proportion and is_binary(a.tolist() + b.tolist()) else "sign test"
    return Paired(int(d.size), mean_interval(d, confidence), wins, int(d.size) - wins - losses, losses,
                  sign_test(wins, losses), test)


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted
