"""The benchmarks' one statistics helper: Student-t intervals over seeds, of a mean and of a paired difference.

Seeds are the unit of replication (DESIGN §9): each seed trains its own model and draws its own noise,
so a bench reduces each seed's run to one number per method and puts the interval over those numbers.
Where two methods ran on the same seeds (shared noise, shared DRM), their comparison is the paired
difference per seed, which cancels what the seed shares.
"""

from __future__ import annotations

import math
import statistics

from scipy.stats import t as student_t  # ComfyUI's requirements bring scipy; every bench needs ComfyUI


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile q with P(|T| <= q) = level for T with `df` degrees of freedom.

    df: whole number >= 1; level: in (0, 1). Equals scipy's t.ppf((1 + level) / 2, df), e.g. 4.303 at
    df = 2 and 12.706 at df = 1 for 95%. Raises ValueError on a df or level out of range.
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df: {df!r}, expected a whole number >= 1 (the number of seeds minus one)")
    if not 0 < level < 1:
        raise ValueError(f"level: {level!r}, expected a confidence level between 0 and 1, such as 0.95")
    return float(student_t.ppf((1 + level) / 2, df))


def _checked(values, name: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name}: no values; give one result per seed")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: {values} holds a NaN or infinity; every seed's result must be a finite number")
    return values


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Mean of per-seed results and the half-width of its two-sided Student-t interval.

    values: one finite number per seed (n of them). Half-width = t_quantile(n - 1, level) * sd / sqrt(n)
    with the sample sd (n - 1 in the denominator); NaN for a single seed, where no interval exists.
    Raises ValueError on no values or a non-finite one.
    """
    values = _checked(values, "values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile(len(values) - 1, level) * statistics.stdev(values) / math.sqrt(len(values))


def paired_diff_ci(values, baseline, level: float = 0.95) -> tuple[float, float]:
    """Mean of values[i] - baseline[i] over seeds i and the half-width of its Student-t interval.

    values, baseline: one finite number per seed, in the same seed order (the paired t-interval: the
    one-sample interval of the differences). NaN half-width for a single seed. Raises ValueError on
    lists of different lengths, no values or a non-finite one.
    """
    values, baseline = _checked(values, "values"), _checked(baseline, "baseline")
    if len(values) != len(baseline):
        raise ValueError(f"values and baseline: {len(values)} and {len(baseline)} results; a paired difference "
                         "needs one result per seed from each, in the same seed order")
    return mean_ci([v - b for v, b in zip(values, baseline)], level)


def verdict(diff: float, half: float) -> str:
    """'above zero', 'below zero' or 'spans zero' for the interval diff +- half (NaN spans zero)."""
    if diff - half > 0:
        return "above zero"
    if diff + half < 0:
        return "below zero"
    return "spans zero"
