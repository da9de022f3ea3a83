"""Confidence intervals shared by the benchmarks."""

from __future__ import annotations

import statistics


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean of a few per-seed results and the half-width of its two-sided 95% Student-t interval (0 for one value)."""
    from scipy.stats import t  # ComfyUI's requirements bring scipy

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / len(values) ** 0.5
