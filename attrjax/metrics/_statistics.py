"""Statistics over repeated runs (seeds): means with confidence intervals, and paired differences.

A metric measured once per seed is a small sample, so intervals use Student's t (``scipy.stats``), and a
comparison of two settings pairs their runs by seed (same teacher, same data order), which removes the
seed-to-seed variation both share. Undefined values (NaN: a run that diverged, a metric with nothing to average)
are left out and counted, never averaged in or silently dropped.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def _stats():
    """``scipy.stats``, imported on first use: it takes about a second to import, which ``import attrjax`` (whose
    ``attrjax.metrics`` exports these functions) should not pay."""
    from scipy import stats

    return stats


def _finite(values: ArrayLike) -> np.ndarray:
    array = np.asarray(values, np.float64)
    if array.ndim != 1:
        raise ValueError(f"expected one value per run (a 1-D sequence), got shape {array.shape}")
    return array


def mean_interval(values: ArrayLike, *, confidence: float = 0.95) -> dict:
    """Mean of one metric over runs with its two-sided t confidence interval.

    Args:
      values: (N,) one value per run; NaN (undefined) values are left out.
      confidence: the interval's coverage.

    Returns:
      ``mean``, ``low``, ``high`` (NaN with fewer than 2 defined values), ``std`` (sample standard deviation),
      ``n`` (defined values) and ``n_undefined``.
    """
    array = _finite(values)
    defined = array[~np.isnan(array)]
    n = int(defined.size)
    result = {"mean": float(np.mean(defined)) if n else math.nan, "low": math.nan, "high": math.nan,
              "std": float(np.std(defined, ddof=1)) if n > 1 else math.nan, "n": n,
              "n_undefined": int(array.size - n)}
    if n > 1:
        stats = _stats()
        scale = stats.sem(defined)
        if scale > 0:
            result["low"], result["high"] = map(float, stats.t.interval(confidence, n - 1, loc=result["mean"],
                                                                         scale=scale))
        else:  # every run gave the same value
            result["low"] = result["high"] = result["mean"]
    return result


def paired_difference(treated: ArrayLike, control: ArrayLike, *, confidence: float = 0.95) -> dict:
    """``treated - control`` paired by run (e.g. matched minus naive, seed by seed): the paired t analysis.

    Args:
      treated: (N,) values of N runs, e.g. the matched students of N seeds.
      control: (N,) values of the same N runs' counterparts (same seeds, in the same order); a pair with a NaN on
        either side is left out.

    Returns:
      the ``mean_interval`` of the differences (``mean``, ``low``, ``high``, ``std``, ``n``, ``n_undefined``),
      ``p_value`` of the two-sided paired t-test (NaN with fewer than 2 pairs or identical differences), and
      ``positive`` / ``negative``: the number of pairs whose difference is > 0 / < 0.
    """
    treated_array, control_array = _finite(treated), _finite(control)
    if treated_array.shape != control_array.shape:
        raise ValueError(f"paired values need one treated and one control value per run, got {treated_array.size} "
                         f"and {control_array.size}")
    differences = treated_array - control_array
    result = mean_interval(differences, confidence=confidence)
    defined = differences[~np.isnan(differences)]
    result["p_value"] = math.nan
    if defined.size > 1 and np.std(defined) > 0:
        result["p_value"] = float(_stats().ttest_1samp(defined, 0.0).pvalue)
    result.update(positive=int(np.sum(defined > 0)), negative=int(np.sum(defined < 0)))
    return result


def excludes_zero(interval: dict) -> bool:
    """Whether a ``mean_interval`` / ``paired_difference`` interval lies strictly on one side of zero."""
    return bool(interval["low"] > 0 or interval["high"] < 0)
