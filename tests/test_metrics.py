"""Tests for attrjax.metrics against brute-force references written from the definitions (no sklearn)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax import metrics

# ----------------------------------------------------------------------------------------------------
# Independent references.


def reference_average_precision(labels, scores):
    """sklearn's average_precision_score: sum_n (R_n - R_{n-1}) P_n over distinct thresholds, descending."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    num_positive = labels.sum()
    if num_positive == 0:
        return math.nan
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        selected = scores >= threshold
        true_positives = (selected & labels).sum()
        recall = true_positives / num_positive
        ap += (recall - previous_recall) * true_positives / selected.sum()
        previous_recall = recall
    return ap


def reference_auc(mask, scores):
    """P(score of a mask pixel > score of a non-mask pixel) + 0.5 P(equal), over all pairs."""
    mask, scores = np.asarray(mask, bool).ravel(), np.asarray(scores, np.float64).ravel()
    positives, negatives = scores[mask], scores[~mask]
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    greater = (positives[:, None] > negatives[None, :]).sum()
    equal = (positives[:, None] == negatives[None, :]).sum()
    return (greater + 0.5 * equal) / (positives.size * negatives.size)


def reference_rank_auc(mask, scores):
    """Mann-Whitney U from average ranks in float64, for maps too large for the pairwise reference."""
    mask, scores = np.asarray(mask, bool).ravel(), np.asarray(scores, np.float64).ravel()
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(scores.size)
    ranks[order] = np.arange(1, scores.size + 1)
    _, inverse = np.unique(scores, return_inverse=True)
    average_ranks = np.bincount(inverse, ranks) / np.bincount(inverse)
    num_positive, num_negative = mask.sum(), (~mask).sum()
    rank_sum = average_ranks[inverse][mask].sum()
    return (rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative)


def reference_pointing(heatmap, mask, tolerance=0.0):
    """First maximum in row-major order by an explicit scan, then the distance to every mask pixel."""
    heatmap, mask = np.asarray(heatmap), np.asarray(mask, bool)
    if not mask.any():
        return math.nan
    best, best_pixel = -math.inf, None
    for i in range(heatmap.shape[0]):
        for j in range(heatmap.shape[1]):
            if heatmap[i, j] > best:
                best, best_pixel = heatmap[i, j], (i, j)
    for i, j in zip(*np.nonzero(mask)):
        if math.hypot(i - best_pixel[0], j - best_pixel[1]) <= tolerance:
            return 1.0
    return 0.0


def tied_scores(rng, shape):
    """Scores rounded to one decimal, so ties are common."""
    return np.round(rng.normal(size=shape), 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Classification.


def test_sample_average_precision_matches_sklearn_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = tied_scores(rng, (64, 20))
    labels = rng.random((64, 20)) < 0.2
    labels[3] = False  # a row without positives
    labels[4] = True   # a row without negatives
    ap = metrics.sample_average_precision(scores, labels)
    chex.assert_shape(ap, (64,))
    expected = np.array([reference_average_precision(y, s) for y, s in zip(labels, scores)])
    np.testing.assert_allclose(ap, expected, rtol=1e-6, atol=1e-6)
    assert np.isnan(ap[3]) and ap[4] == 1.0


def test_class_average_precision_matches_sklearn_definition_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(300, 7)).astype(np.float32)  # heavy ties
    labels = rng.random((300, 7)) < 0.3
    labels[:, 5] = False
    ap = metrics.class_average_precision(scores, labels)
    chex.assert_shape(ap, (7,))
    expected = np.array([reference_average_precision(labels[:, k], scores[:, k]) for k in range(7)])
    np.testing.assert_allclose(ap, expected, rtol=1e-6, atol=1e-6)
    assert np.isnan(ap[5])
    # Class-wise mAP leaves the undefined class out.
    np.testing.assert_allclose(jnp.nanmean(ap), np.nanmean(expected), rtol=1e-6)


def test_average_precision_closed_forms():
    num_classes, num_positive = 10, 3
    labels = np.zeros((3, num_classes), bool)
    labels[:, :num_positive] = True
    descending = -np.arange(num_classes, dtype=np.float32)
    scores = np.stack([descending, -descending, np.zeros(num_classes, np.float32)])
    ap = metrics.sample_average_precision(scores, labels)
    worst = np.mean([j / (num_classes - num_positive + j) for j in range(1, num_positive + 1)])
    # Perfect ranking, positives ranked last, everything tied (precision P/K at the only threshold).
    np.testing.assert_allclose(ap, [1.0, worst, num_positive / num_classes], rtol=1e-6)


def test_average_precision_accepts_integer_labels_and_validates_shapes():
    scores = jnp.array([[0.3, 0.1, 0.2]])
    np.testing.assert_allclose(metrics.sample_average_precision(scores, jnp.array([[0, 1, 0]])), [1 / 3])
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(1, 2\)"):
        metrics.sample_average_precision(scores, jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="rank 2"):
        metrics.class_average_precision(jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(ValueError, match="logits and labels"):
        metrics.f1_samples(scores, jnp.zeros((3, 1)))


def test_f1_samples_hand_computed():
    logits = jnp.array([
        [0.5, 0.49, -1.0, 2.0],   # predicts {0, 3}; labels {0, 1}: TP 1 -> 2/(2+2)
        [3.0, 3.0, 3.0, 3.0],     # predicts all;   labels {2}:    TP 1 -> 2/(4+1)
        [-1.0, -1.0, 0.0, 0.4],   # predicts none;  labels {1}:    0
        [-1.0, -1.0, -1.0, -1.0],  # predicts none;  labels none:   zero_division -> 0
        [1.0, -1.0, 1.0, -1.0],   # predicts {0, 2}; labels {0, 2}: 1
    ])
    labels = jnp.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    f1 = metrics.f1_samples(logits, labels)
    chex.assert_shape(f1, (5,))
    np.testing.assert_allclose(f1, [0.5, 0.4, 0.0, 0.0, 1.0], rtol=1e-6)
    # threshold=0 is probability 0.5: row 0 adds class 1 (TP 2 -> 4/5); row 2 predicts {2, 3}, no TP.
    f1_at_zero = metrics.f1_samples(logits, labels, threshold=0.0)
    np.testing.assert_allclose(f1_at_zero[:3], [0.8, 0.4, 0.0], rtol=1e-6)


def test_a_nan_score_makes_its_ranking_undefined():
    rng = np.random.default_rng(3)
    scores = tied_scores(rng, (6, 5))
    labels = rng.random((6, 5)) < 0.4
    labels[:, 0] = True  # every row and column 0 has a positive
    labels[0, 1] = labels[1, 2] = True
    scores[0] = np.nan              # a NaN row (a diverged model)
    scores[1, 3] = np.nan           # one NaN among finite scores, on a negative
    ap = np.asarray(metrics.sample_average_precision(scores, labels))
    assert np.isnan(ap[:2]).all()
    expected = [reference_average_precision(y, s) for y, s in zip(labels[2:], scores[2:])]
    np.testing.assert_allclose(ap[2:], expected, rtol=1e-6)
    # Column k ranks the images of class k: every column holds row 0's NaN.
    assert np.isnan(metrics.class_average_precision(scores, labels)).all()
    finite_columns = metrics.class_average_precision(scores[2:], labels[2:])
    np.testing.assert_allclose(finite_columns, [reference_average_precision(labels[2:, k], scores[2:, k])
                                                for k in range(5)], rtol=1e-6)


def test_infinite_scores_are_ordering_values():
    # +-inf rank above / below every finite score and tie with each other: the AP of the same ranking written
    # with large finite stand-ins.
    labels = np.array([[1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0]], bool)
    scores = np.array([[np.inf, np.inf, -np.inf, 0.5, 2.0, -np.inf],
                       [-np.inf, -np.inf, -np.inf, -np.inf, -np.inf, 1.0]], np.float32)
    stand_ins = np.where(np.isinf(scores), np.sign(scores) * 1e30, scores)
    expected = [reference_average_precision(y, s) for y, s in zip(labels, stand_ins)]
    np.testing.assert_allclose(metrics.sample_average_precision(scores, labels), expected, rtol=1e-6)
    # Row 0 by hand: positives at inf (tied with a negative), 0.5 and -inf: (1/2 + 2/4 + 3/6) / 3.
    np.testing.assert_allclose(expected[0], 0.5)


def test_f1_of_a_row_with_a_nan_logit_is_nan():
    logits = jnp.array([[jnp.nan, jnp.nan, jnp.nan], [2.0, jnp.nan, -1.0], [2.0, 0.0, -1.0],
                        [jnp.inf, -jnp.inf, 0.0]])
    labels = jnp.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0]])
    f1 = np.asarray(metrics.f1_samples(logits, labels))
    assert np.isnan(f1[:2]).all()
    # Row 2 predicts {0} = labels: 1. Row 3 predicts {0} (inf >= 0.5), labels {0, 1}: 2 * 1 / (1 + 2).
    np.testing.assert_allclose(f1[2:], [1.0, 2 / 3], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Localisation.


def test_mask_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(2)
    maps = rng.integers(0, 5, size=(12, 6, 7)).astype(np.float32)
    masks = rng.random((12, 6, 7)) < 0.35
    auc = metrics.mask_auc(maps, masks)
    chex.assert_shape(auc, (12,))
    expected = [reference_auc(m, s) for m, s in zip(masks, maps)]
    np.testing.assert_allclose(auc, expected, rtol=1e-6, atol=1e-6)


def test_mask_auc_of_maps_spanning_the_whole_float_range():
    # Values from -3e38 to 3e38 (with ties and signed zeros) do not fit the packed single-array sort: the
    # two-operand fallback must give the same pairwise AUC.
    rng = np.random.default_rng(5)
    values = np.array([-3e38, -1.0, -0.0, 0.0, 1e-30, 2.5, 3e38], np.float32)
    codes = rng.integers(0, len(values), size=(6, 5, 5))
    masks = rng.random((6, 5, 5)) < 0.4
    expected = [reference_auc(m, s) for m, s in zip(masks, values[codes])]
    np.testing.assert_allclose(metrics.mask_auc(values[codes], masks), expected, rtol=1e-6)
    # The same order and ties in a narrow range take the packed path and give the same AUC.
    ranks = np.array([0, 1, 2, 2, 3, 4, 5], np.float32)
    np.testing.assert_allclose(metrics.mask_auc(ranks[codes], masks), expected, rtol=1e-6)


def test_mask_auc_closed_forms_and_undefined():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    perfect = mask.astype(np.float32) + 0.01 * np.random.default_rng(3).random((8, 8), np.float32)
    maps = np.stack([perfect, -perfect, np.ones((8, 8), np.float32), perfect, perfect])
    masks = np.stack([mask, mask, mask, np.zeros_like(mask), np.ones_like(mask)])
    auc = metrics.mask_auc(maps, masks)
    np.testing.assert_allclose(auc[:3], [1.0, 0.0, 0.5])
    assert np.isnan(auc[3]) and np.isnan(auc[4])  # empty and full masks
    assert np.isnan(metrics.mask_auc(np.full((1, 8, 8), np.nan, np.float32), mask[None]))[0]


def test_mask_auc_is_accurate_at_voc_resolution():
    rng = np.random.default_rng(4)
    heatmap = np.round(rng.random((227, 227)), 3).astype(np.float32)
    masks = np.stack([np.zeros((227, 227), bool)] * 2)
    masks[0, 50:180, 40:200] = True                   # a large object
    masks[1] = True
    masks[1, 100:102, 7:9] = False                     # nearly full mask: 4 negatives
    heatmap = (heatmap + 0.2 * masks[0]).astype(np.float32)
    maps = np.stack([heatmap, heatmap])
    auc = metrics.mask_auc(maps, masks)
    expected = [reference_rank_auc(m, heatmap) for m in masks]
    np.testing.assert_allclose(auc, expected, atol=2e-6)


def test_pointing_game_empty_mask_is_nan_and_excluded_from_the_mean():
    maps = np.zeros((3, 4, 4), np.float32)
    maps[:, 1, 2] = 1.0
    masks = np.zeros((3, 4, 4), bool)
    masks[0, 1, 2] = True     # hit
    masks[1, 3, 3] = True     # miss
    hits = metrics.pointing_game(maps, masks)  # image 2: empty mask
    chex.assert_shape(hits, (3,))
    np.testing.assert_array_equal(hits[:2], [1.0, 0.0])
    assert np.isnan(hits[2])
    assert float(jnp.nanmean(hits)) == 0.5
    # Even a large tolerance never turns an empty mask into a hit.
    assert np.isnan(metrics.pointing_game(maps, masks, tolerance=100.0)[2])


def test_pointing_game_ties_use_first_maximum_in_row_major_order():
    heatmap = np.zeros((5, 5), np.float32)
    heatmap[1, 4] = heatmap[3, 0] = 2.0   # (1, 4) comes first in row-major order
    first, second = np.zeros((5, 5), bool), np.zeros((5, 5), bool)
    first[1, 4] = True
    second[3, 0] = True
    hits = metrics.pointing_game(np.stack([heatmap, heatmap]), np.stack([first, second]))
    np.testing.assert_array_equal(hits, [1.0, 0.0])
    # Same row: the smaller column decides.
    heatmap = np.zeros((5, 5), np.float32)
    heatmap[2, 1] = heatmap[2, 3] = 1.0
    mask = np.zeros((5, 5), bool)
    mask[2, 3] = True
    assert float(metrics.pointing_game(heatmap[None], mask[None])[0]) == 0.0


def test_pointing_game_tolerance_matches_brute_force_distances():
    rng = np.random.default_rng(5)
    maps = rng.integers(0, 20, size=(40, 9, 11)).astype(np.float32)  # ties among maxima are common
    masks = rng.random((40, 9, 11)) < 0.04
    masks[0] = False
    for tolerance in [0, 1, 1.5, 2.9, 4]:
        hits = metrics.pointing_game(maps, masks, tolerance=tolerance)
        expected = [reference_pointing(s, m, tolerance) for s, m in zip(maps, masks)]
        np.testing.assert_array_equal(hits, expected)


def test_pointing_game_tolerance_radius_is_inclusive_euclidean():
    heatmap = np.zeros((1, 9, 9), np.float32)
    heatmap[0, 4, 4] = 1.0
    mask = np.zeros((1, 9, 9), bool)
    mask[0, 7, 8] = True   # distance 5 from (4, 4)
    for tolerance, expected in [(0, 0.0), (4.99, 0.0), (5, 1.0), (7, 1.0)]:
        assert float(metrics.pointing_game(heatmap, mask, tolerance=tolerance)[0]) == expected
    for bad in (-1, -0.5, math.nan, math.inf, np.float32(np.nan), jnp.array(-2.0)):
        with pytest.raises(ValueError, match=r"tolerance must be a finite number >= 0 \(pixels\), got"):
            metrics.pointing_game(heatmap, mask, tolerance=bad)
    with pytest.raises(ValueError, match=r"\(1, 9, 9\).*\(1, 9, 8\)"):
        metrics.pointing_game(heatmap, mask[:, :, :8])


def test_class_masks_ignores_void_and_background():
    segmentation = np.array([[[0, 1, 255], [3, 3, 1]]], np.int32)
    masks = metrics.class_masks(segmentation, 3)
    chex.assert_shape(masks, (1, 3, 2, 3))
    assert masks.dtype == jnp.bool_
    np.testing.assert_array_equal(masks[0, 0], [[False, True, False], [False, False, True]])
    np.testing.assert_array_equal(masks[0, 1], np.zeros((2, 3), bool))
    np.testing.assert_array_equal(masks[0, 2], [[False, False, False], [True, True, False]])
    assert not masks[0, :, 0, 2].any()  # 255 (void) is in no class


def test_localization_scores_counts_present_and_predicted_pairs():
    rng = np.random.default_rng(6)
    batch, num_classes, size = 3, 4, 8
    segmentation = np.zeros((batch, size, size), np.int32)
    segmentation[0, :4, :4] = 1    # class 0
    segmentation[0, 5:, 5:] = 3    # class 2
    segmentation[0, 4, :] = 255    # void
    segmentation[1, 2:6, 2:6] = 2  # class 1
    segmentation[2, :, :] = 4      # class 3 covers the whole image: AUC undefined
    logits = np.array([[1.0, 1.0, -0.5, 1.0],    # class 2 present but not predicted; class 1, 3 not present
                       [-1.0, 0.3, 1.0, 1.0],
                       [1.0, 1.0, 1.0, 1.0]], np.float32)
    maps = rng.random((batch, num_classes, size, size)).astype(np.float32)
    maps[0, 0, 1, 1] = 5.0         # class 0 of image 0: maximum on its own object -> hit
    maps[1, 1, 0, 0] = 5.0         # class 1 of image 1: maximum on background -> miss
    maps[2, 3, 3, 3] = np.nan      # non-finite map: skipped
    scores = jax.jit(functools.partial(metrics.localization_scores, prediction_rule="positive_logit"))(
        maps, segmentation, logits)
    for value in scores.values():
        chex.assert_shape(value, (batch, num_classes))

    present = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(scores["present"], present)
    np.testing.assert_array_equal(scores["predicted"], logits > 0)
    counted = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(scores["counted"], counted)
    assert not np.isnan(scores["hit"][counted]).any()
    assert np.isnan(scores["hit"][~counted]).all() and np.isnan(scores["auc"][~counted]).all()
    np.testing.assert_array_equal(scores["hit"][counted], [1.0, 0.0])
    masks = segmentation[:, None] == np.arange(1, num_classes + 1)[:, None, None]
    for b, k in zip(*np.nonzero(counted)):
        np.testing.assert_allclose(scores["auc"][b, k], reference_auc(masks[b, k], maps[b, k]), rtol=1e-6)

    summary = metrics.summarize_localization(scores)
    assert summary["pointing_accuracy"] == 0.5
    np.testing.assert_allclose(summary["mean_auc"], np.mean(scores["auc"][counted]), rtol=1e-6)
    assert summary["num_counted"] == 2
    assert summary["num_present_not_predicted"] == 1
    assert summary["num_skipped_nonfinite"] == 1
    assert all(isinstance(v, (float, int)) for v in summary.values())


def test_top1_rule_counts_only_the_arg_max_class():
    logits = np.array([[2.0, 3.0, -1.0], [-4.0, -2.0, -3.0]], np.float32)  # softmax logits may all be negative
    np.testing.assert_array_equal(metrics.predicted_classes(logits, "top1"), [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(metrics.predicted_classes(logits), [[1, 1, 0], [0, 0, 0]])
    segmentation = np.zeros((2, 4, 4), np.int32)
    segmentation[:, :2] = 2  # class 1 in both images
    maps = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    scores = metrics.localization_scores(maps, segmentation, logits, prediction_rule="top1")
    np.testing.assert_array_equal(scores["counted"], [[0, 1, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="unknown prediction rule"):
        metrics.predicted_classes(logits, "sigmoid")


def test_localization_scores_judges_each_class_against_its_own_mask():
    # The reference code would count class 1's maximum (on class 0's object) as a hit; we do not.
    segmentation = np.zeros((1, 6, 6), np.int32)
    segmentation[0, :2, :2] = 1
    segmentation[0, 4:, 4:] = 2
    maps = np.zeros((1, 2, 6, 6), np.float32)
    maps[0, :, 0, 0] = 1.0
    scores = metrics.localization_scores(maps, segmentation, np.ones((1, 2), np.float32),
                                         prediction_rule="positive_logit")
    np.testing.assert_array_equal(scores["hit"], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="logits"):
        metrics.localization_scores(maps, segmentation, np.ones((1, 3), np.float32),
                                    prediction_rule="positive_logit")
    with pytest.raises(ValueError, match="segmentation"):
        metrics.localization_scores(maps, segmentation[:, :5], np.ones((1, 2), np.float32),
                                    prediction_rule="positive_logit")


def test_summarize_localization_with_nothing_counted_is_nan():
    scores = metrics.localization_scores(np.zeros((1, 2, 3, 3), np.float32), np.zeros((1, 3, 3), np.int32),
                                         np.ones((1, 2), np.float32), prediction_rule="positive_logit")
    summary = metrics.summarize_localization(scores)
    assert math.isnan(summary["pointing_accuracy"]) and math.isnan(summary["mean_auc"])
    assert summary["num_counted"] == 0


# ----------------------------------------------------------------------------------------------------
# Transformations.


def test_metrics_under_jit_and_vmap():
    rng = np.random.default_rng(7)
    scores = tied_scores(rng, (3, 16, 5))
    labels = rng.random((3, 16, 5)) < 0.4
    for fn in [metrics.sample_average_precision, metrics.class_average_precision, metrics.f1_samples]:
        eager = np.stack([fn(s, y) for s, y in zip(scores, labels)])
        chex.assert_trees_all_close(jax.jit(jax.vmap(fn))(scores, labels), eager, rtol=1e-6)

    maps = rng.integers(0, 6, size=(2, 4, 7, 7)).astype(np.float32)
    masks = rng.random((2, 4, 7, 7)) < 0.3
    eager_auc = np.stack([metrics.mask_auc(m, k) for m, k in zip(maps, masks)])
    chex.assert_trees_all_close(jax.jit(jax.vmap(metrics.mask_auc))(maps, masks), eager_auc, rtol=1e-6)
    # tolerance may be traced, so one compilation serves every radius.
    pointing = jax.jit(jax.vmap(lambda m, k, r: metrics.pointing_game(m, k, tolerance=r),
                                in_axes=(0, 0, None)))
    for radius in [0.0, 2.0]:
        eager_hits = np.stack([metrics.pointing_game(m, k, tolerance=radius) for m, k in zip(maps, masks)])
        chex.assert_trees_all_close(pointing(maps, masks, radius), eager_hits)
    class_masks = jax.jit(metrics.class_masks, static_argnums=1)
    chex.assert_shape(class_masks(jnp.zeros((2, 3, 3), jnp.int32), 5), (2, 5, 3, 3))
