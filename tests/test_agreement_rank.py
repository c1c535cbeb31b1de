"""Rank agreement of attribution maps: Spearman correlation and top-k IoU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.metrics import importance_ranks, map_cosine, same_peak, spearman_rank, top_k_iou

try:
    from scipy.stats import rankdata, spearmanr
except ImportError:  # the NumPy reference below stands in
    spearmanr = None


def _average_ranks(x):
    """NumPy average ranks (scipy's rankdata(method="average"))."""
    if spearmanr is not None:
        return rankdata(x)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        ranks[x == value] = ranks[x == value].mean()
    return ranks


def _spearman(a, b):
    if spearmanr is not None:
        return spearmanr(a, b).statistic
    return np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1]


def test_spearman_matches_the_reference_with_ties():
    rng = np.random.default_rng(0)
    maps_a = np.round(rng.normal(size=(2, 3, 6, 5)), 0).astype(np.float32)  # (B, K, H, W), many ties
    maps_b = (maps_a + rng.normal(size=maps_a.shape)).astype(np.float32)
    maps_b[1, 2] = np.round(maps_b[1, 2])
    rho = np.asarray(spearman_rank(maps_a, maps_b))
    assert rho.shape == (2, 3)
    expected = [[_spearman(a.ravel(), b.ravel()) for a, b in zip(row_a, row_b)] for row_a, row_b in zip(maps_a, maps_b)]
    np.testing.assert_allclose(rho, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(spearman_rank)(maps_a, maps_b), rho, rtol=1e-6)


def test_spearman_closed_forms():
    base = jnp.arange(12.0).reshape(3, 4)
    maps_a = jnp.stack([base, base, jnp.ones((3, 4)), base.at[0, 0].set(jnp.nan)])
    maps_b = jnp.stack([jnp.exp(base), -base, base, base])  # a monotone transform keeps the ranks
    rho = np.asarray(spearman_rank(maps_a, maps_b))
    np.testing.assert_allclose(rho[:2], [1.0, -1.0], atol=1e-6)
    assert np.isnan(rho[2]) and np.isnan(rho[3])  # constant map, NaN pixel


def test_importance_ranks_break_ties_row_major():
    maps = jnp.array([[[1.0, 3.0], [3.0, -0.0]], [[jnp.nan, 0.0], [0.0, -jnp.inf]]])
    np.testing.assert_array_equal(importance_ranks(maps), [[2, 0, 1, 3], [3, 0, 1, 2]])


def test_top_k_iou_closed_forms():
    base = jnp.arange(16.0).reshape(4, 4)
    # top 25% = 4 pixels: base's top is {12..15}; reversed's top is {0..3}
    np.testing.assert_allclose(top_k_iou(base[None], base[None], 0.25), [1.0])
    np.testing.assert_allclose(top_k_iou(base[None], -base[None], 0.25), [0.0])
    # shifted by 2: top {10..13} vs {12..15} share 2 pixels -> 2 / (4 + 4 - 2)
    shifted = jnp.roll(base.ravel(), -2).reshape(4, 4).at[3, 2:].set(-1.0)
    np.testing.assert_allclose(top_k_iou(base[None], shifted[None], 0.25), [2 / 6])
    np.testing.assert_allclose(top_k_iou(base[None], shifted[None], 1.0), [1.0])


def test_top_k_iou_ties_keep_exactly_k_pixels():
    # all tied but the last pixel: the first k = ceil(0.3 * 10) = 3 pixels in row-major order {0, 1, 2}
    flat = jnp.zeros((1, 2, 5)).at[0, 1, 4].set(-1.0)
    other = jnp.zeros((1, 2, 5)).at[0, 0, 3].set(1.0)  # top {3, 0, 1}
    np.testing.assert_allclose(top_k_iou(flat, other, 0.3), [2 / 4])
    assert np.isnan(top_k_iou(flat.at[0, 1, 1].set(jnp.nan), other, 0.3)[0])


AGREEMENT = {"map_cosine": map_cosine, "same_peak": same_peak, "spearman": spearman_rank,
             "top10_iou": lambda a, b: top_k_iou(a, b, 0.1)}


def _reference_cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return a @ b / np.sqrt((a @ a) * (b @ b))


def _reference_same_peak(a, b):
    """First maximum in row-major order by an explicit scan."""
    def peak(m):
        flat = m.ravel().tolist()
        return next(i for i, v in enumerate(flat) if v == max(flat))
    return float(peak(a) == peak(b))


def test_agreement_metrics_are_undefined_on_the_same_pairs():
    """Every agreement metric is NaN exactly where either map has a NaN or inf pixel or is constant (no peak, no
    order, no direction beyond the mean), so the four means average over the same pairs."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 5)).astype(np.float32)
    other = rng.normal(size=(6, 5)).astype(np.float32)
    undefined = [np.full((6, 5), np.nan), base.copy(), base.copy(), np.zeros((6, 5)), np.full((6, 5), 0.3)]
    undefined[1][2, 3] = np.nan
    undefined[2][0, 1] = np.inf
    maps_a = np.stack([base, base, *undefined, np.zeros((6, 5)), np.full((6, 5), 2.0)]).astype(np.float32)
    maps_b = np.stack([other, base, *[other] * 5, np.zeros((6, 5)), np.full((6, 5), 2.0)]).astype(np.float32)
    for name, fn in AGREEMENT.items():
        for a, b in ((maps_a, maps_b), (maps_b, maps_a)):
            values = np.asarray(fn(a, b))
            assert np.isfinite(values[:2]).all(), name
            assert np.isnan(values[2:]).all(), (name, values)
    np.testing.assert_allclose(map_cosine(maps_a[:2], maps_b[:2]),
                               [_reference_cosine(a, b) for a, b in zip(maps_a[:2], maps_b[:2])], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(same_peak(maps_a[:2], maps_b[:2]),
                                  [_reference_same_peak(a, b) for a, b in zip(maps_a[:2], maps_b[:2])])


def test_identical_maps_agree_exactly_at_any_scale():
    """A map compared with itself scores exactly 1 on every metric, eagerly and under jit, even when its squares
    overflow or underflow float32; the cosine of unrelated maps matches float64 at those scales too."""
    rng = np.random.default_rng(4)
    maps = rng.random((20, 7, 9)).astype(np.float32)
    others = rng.normal(size=(20, 7, 9)).astype(np.float32)
    for scale in (1.0, 1e25, 1e-30):
        scaled, scaled_others = maps * np.float32(scale), others * np.float32(scale)
        for name, fn in AGREEMENT.items():
            for transform in (lambda f: f, jax.jit):
                np.testing.assert_array_equal(transform(fn)(scaled, scaled.copy()), 1.0,
                                              err_msg=f"{name} at scale {scale}")
        expected = [_reference_cosine(a, b) for a, b in zip(scaled, scaled_others)]
        np.testing.assert_allclose(map_cosine(scaled, scaled_others), expected, rtol=1e-5, atol=1e-7)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        spearman_rank(jnp.zeros((2, 3, 3)), jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="same shape"):
        top_k_iou(jnp.zeros((2, 3, 3)), jnp.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        spearman_rank(jnp.zeros(3), jnp.zeros(3))
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"fraction must be a Python number in \(0, 1\]"):
            top_k_iou(jnp.zeros((1, 3, 3)), jnp.zeros((1, 3, 3)), fraction)
