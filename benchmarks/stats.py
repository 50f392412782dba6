"""Small statistics: summaries of repeated timings and the fits that turn counts into growth rates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def summarize(times_s: Sequence[float]) -> dict:
    """Median, quartiles, min and max of run times (seconds), and how many runs there were."""
    t = np.asarray(times_s, dtype=float)
    if t.size == 0:
        raise ValueError("summarize: no timings")
    p25, median, p75 = np.percentile(t, [25, 50, 75])
    return {
        "median_s": float(median),
        "p25_s": float(p25),
        "p75_s": float(p75),
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "repeats": int(t.size),
    }


def loglog_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope of log(y) against log(x) by least squares (numpy.polyfit): y ~ x^slope."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.size < 2 or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("loglog_exponent needs at least two points, all positive")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least-squares line y = slope * x + intercept (numpy.polyfit), with the largest residual."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(np.max(np.abs(y - (slope * x + intercept))))
    return {"slope": float(slope), "intercept": float(intercept), "max_abs_residual": residual}
