"""Seed statistics against hand computations on made-up numbers."""

import math

import numpy as np
import pytest

from attrjax.metrics._statistics import excludes_zero, mean_interval, paired_difference

T_975_4 = 2.7764451051977987  # Student's t, 97.5% quantile, 4 degrees of freedom (tables)
T_975_3 = 3.1824463052842638


def test_mean_interval_is_the_t_interval():
    result = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = T_975_4 * math.sqrt(2.5) / math.sqrt(5)  # sample variance 2.5
    assert result["mean"] == 3.0 and result["n"] == 5 and result["n_undefined"] == 0
    np.testing.assert_allclose([result["low"], result["high"]], [3.0 - half, 3.0 + half], rtol=1e-12)
    np.testing.assert_allclose(result["std"], math.sqrt(2.5), rtol=1e-12)


def test_undefined_runs_are_left_out_and_counted():
    result = mean_interval([0.5, float("nan"), 0.7, 0.6, 0.8, 0.9])
    assert result["n"] == 5 and result["n_undefined"] == 1 and result["mean"] == pytest.approx(0.7)
    single = mean_interval([0.4, float("nan")])
    assert single["mean"] == 0.4 and math.isnan(single["low"]) and math.isnan(single["std"])
    nothing = mean_interval([float("nan")])
    assert math.isnan(nothing["mean"]) and nothing["n"] == 0
    same = mean_interval([0.3, 0.3, 0.3])
    assert same["low"] == same["high"] == 0.3
    with pytest.raises(ValueError, match="one value per run"):
        mean_interval([[1.0, 2.0]])


def test_paired_difference_is_the_paired_t_analysis():
    matched = [0.80, 0.85, 0.78, 0.90, 0.70]
    naive = [0.60, 0.70, 0.75, 0.65, float("nan")]  # the last pair is undefined
    result = paired_difference(matched, naive)
    differences = np.array([0.20, 0.15, 0.03, 0.25])
    mean, sd = differences.mean(), differences.std(ddof=1)
    half = T_975_3 * sd / 2.0
    assert result["n"] == 4 and result["n_undefined"] == 1 and result["positive"] == 4 and result["negative"] == 0
    np.testing.assert_allclose([result["mean"], result["low"], result["high"]], [mean, mean - half, mean + half],
                               rtol=1e-9)
    t_statistic = mean / (sd / 2.0)
    assert 0 < result["p_value"] < 0.05 and t_statistic > T_975_3  # significant at 5% exactly when |t| > t_crit
    assert excludes_zero(result)
    assert not excludes_zero(paired_difference([0.1, 0.3, 0.2], [0.2, 0.1, 0.25]))
    with pytest.raises(ValueError, match="one treated and one control value per run"):
        paired_difference([0.1, 0.2], [0.1])
