"""Localisation quality of attribution maps against segmentation masks, batched and jit-able.

Both metrics only depend on the order of the map values, so the reference code's min-max normalisation of
each map before scoring (order-preserving up to float rounding) is not applied. Maps must already be at mask
resolution (resize them first, e.g. with ``jax.image.resize``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.metrics._classification import check_rank, check_same_shape


def _maps_and_masks(maps, masks) -> tuple[jax.Array, jax.Array]:
    maps, masks = jnp.asarray(maps), jnp.asarray(masks)
    check_rank("maps", maps, 3)
    check_same_shape("maps", maps, "masks", masks)
    return maps, masks.astype(bool)


def pointing_game(maps: jax.Array, masks: jax.Array, *, tolerance: float = 0) -> jax.Array:
    """Pointing-game hits: does each map's maximum fall on its mask?

    The maximum point is the FIRST arg-max in row-major order (the reference code's ``argmax`` of the
    flattened map): among tied maxima, the one with the smallest row, then the smallest column, alone decides
    the hit.

    Args:
      maps: (B, H, W) float attribution maps.
      masks: (B, H, W) bool object masks (nonzero = inside).
      tolerance: a hit also counts when a mask pixel lies within this Euclidean distance, in pixels, of the
        maximum point (inclusive). The paper uses 0; the standard pointing game of Zhang et al. uses 15 px at
        VOC resolution. May be a traced scalar; a concrete one (a Python or NumPy number, an array outside jit)
        must be finite and >= 0.

    Returns:
      (B,) float: 1.0 for a hit, 0.0 for a miss, NaN where the mask is empty or the map contains NaN
      (undefined, so ``jnp.nanmean`` leaves those images out instead of counting them as misses).
    """
    _check_tolerance(tolerance)
    return _pointing_game(maps, masks, tolerance)


def _check_tolerance(tolerance) -> None:
    """Raises ValueError unless a concrete ``tolerance`` is a finite number >= 0; a traced one passes."""
    try:
        value = float(tolerance)
    except jax.errors.ConcretizationTypeError:
        return
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (pixels), got {tolerance!r}; use 0 for the "
                         "maximum pixel alone, e.g. 15 for the standard pointing game at VOC resolution")


@jax.jit
def _pointing_game(maps: jax.Array, masks: jax.Array, tolerance: jax.Array) -> jax.Array:
    maps, masks = _maps_and_masks(maps, masks)
    batch, height, width = maps.shape
    row, col = jnp.divmod(jnp.argmax(maps.reshape(batch, -1), axis=-1), width)
    # The disk of radius `tolerance` around each maximum; with tolerance 0 it is the maximum pixel alone.
    squared_distance = ((jnp.arange(height)[None, :, None] - row[:, None, None]) ** 2
                        + (jnp.arange(width)[None, None, :] - col[:, None, None]) ** 2)
    hit = jnp.any(masks & (squared_distance <= jnp.square(tolerance)), axis=(1, 2))
    defined = jnp.any(masks, axis=(1, 2)) & ~jnp.any(jnp.isnan(maps), axis=(1, 2))
    return jnp.where(defined, hit.astype(maps.dtype), jnp.nan)


def _ordered_keys(scores: jax.Array) -> jax.Array:
    """int32 keys with the order of the float32 ``scores`` (NaN excluded; -0 equals +0): the sign-magnitude bits
    made two's complement."""
    scores = scores.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(scores == 0, 0.0, scores), jnp.int32)
    return jnp.where(bits < 0, jnp.int32(-(2**31)) - bits - 1, bits)


def _sort_packed(keys: jax.Array, positive: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B,N) keys (span < 2^31 per row) and labels -> both sorted by key, by ONE uint32 sort of 2 * key + label.
    XLA's CPU sort of a single array is ~6x faster than of two operands (or an argsort)."""
    offsets = (keys - jnp.min(keys, axis=-1, keepdims=True)).astype(jnp.uint32)
    packed = jnp.sort(offsets * 2 + positive.astype(jnp.uint32), axis=-1)
    return (packed >> 1).astype(jnp.int32), (packed & 1).astype(bool)


def _sort_pairs(keys: jax.Array, positive: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The general (slower) path of ``_sort_packed``: a two-operand sort."""
    sorted_keys, sorted_positive = jax.lax.sort((keys, positive), dimension=-1, num_keys=1)
    return sorted_keys, sorted_positive


def _roc_auc_of_sorted(keys: jax.Array, positive: jax.Array) -> jax.Array:
    """ROC-AUC from one row sorted by score: (N,) int keys ascending, (N,) bool labels -> () float.

    Mann-Whitney: AUC = (sum of the positives' average ranks - P(P+1)/2) / (P * N_neg). The positive-positive
    part of the rank sum is exactly P(P+1)/2 and cancels analytically, leaving, per positive, the negatives
    strictly below it plus half the negatives tied with it. Summing those small counts instead of ranks of
    order H*W keeps float32 accurate for large maps. Tie groups come from running max/min of their boundaries.
    """
    n = keys.shape[0]
    # negatives_below[k] = number of negatives among the k smallest scores.
    negatives_below = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(~positive, dtype=jnp.int32)])
    index = jnp.arange(n)
    boundary = keys[1:] != keys[:-1]
    group_start = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones((1,), bool), boundary]), index, 0))
    group_end = jax.lax.cummin(jnp.where(jnp.concatenate([boundary, jnp.ones((1,), bool)]), index + 1, n),
                               reverse=True)
    num_negative = negatives_below[-1]
    num_positive = n - num_negative
    # (below + below_or_tied) / 2 = negatives below + half the tied ones, normalised to [0, 1] per positive.
    beaten_fraction = ((negatives_below[group_start] + negatives_below[group_end])
                       / (2 * jnp.maximum(num_negative, 1)))
    auc = jnp.sum(jnp.where(positive, beaten_fraction, 0.0)) / jnp.maximum(num_positive, 1)
    return jnp.where((num_positive > 0) & (num_negative > 0), auc, jnp.nan)


@jax.jit
def mask_auc(maps: jax.Array, masks: jax.Array) -> jax.Array:
    """ROC-AUC of each map's pixel scores as a detector of its mask's pixels.

    Equals sklearn's ``roc_auc_score(mask.ravel(), map.ravel())`` (the reference's ``roc_curve`` + ``auc``):
    the probability that a random mask pixel outscores a random non-mask pixel, ties counting one half.
    O(N log N) per map: one sort (a single packed uint32 sort when the map's values span less than 2^31 float32
    steps, as min-max normalised maps do), then linear scans.

    Args:
      maps: (B, H, W) float attribution maps.
      masks: (B, H, W) bool object masks (nonzero = inside).

    Returns:
      (B,) float in [0, 1]; NaN where the mask is empty or covers the whole map (the AUC is undefined) or the
      map contains NaN.
    """
    maps, masks = _maps_and_masks(maps, masks)
    batch = maps.shape[0]
    positive = masks.reshape(batch, -1)
    has_nan = jnp.any(jnp.isnan(maps), axis=(1, 2))
    keys = _ordered_keys(jnp.where(jnp.isnan(maps), 0.0, maps).reshape(batch, -1))
    span = jnp.max(keys, axis=-1).astype(jnp.uint32) - jnp.min(keys, axis=-1).astype(jnp.uint32)
    packable = jnp.all(span < jnp.uint32(2**31))
    sorted_keys, sorted_positive = jax.lax.cond(packable, _sort_packed, _sort_pairs, keys, positive)
    auc = jax.vmap(_roc_auc_of_sorted)(sorted_keys, sorted_positive)
    return jnp.where(has_nan, jnp.nan, auc)


@functools.partial(jax.jit, static_argnames="num_classes")
def class_masks(segmentation: jax.Array, num_classes: int) -> jax.Array:
    """Per-class binary masks from an integer segmentation.

    Args:
      segmentation: (B, H, W) int; 0 is background, c + 1 is class c. Any other value (e.g. VOC's 255 void
        boundary, or negative values) belongs to no class and is a negative pixel for every class.
      num_classes: K, a Python int (static under jit).

    Returns:
      (B, K, H, W) bool, ``[b, c] = segmentation[b] == c + 1``.
    """
    segmentation = jnp.asarray(segmentation)
    check_rank("segmentation", segmentation, 3)
    class_ids = jnp.arange(1, num_classes + 1, dtype=segmentation.dtype)
    return segmentation[:, None, :, :] == class_ids[None, :, None, None]


PREDICTION_RULES = ("positive_logit", "top1")


def predicted_classes(logits: jax.Array, rule: str = "positive_logit") -> jax.Array:
    """(B, K) bool: the classes a model predicts. ``positive_logit``: every class with logit > 0 (multi-label,
    sigmoid outputs, the paper); ``top1``: the arg-max class only (single-label, softmax outputs)."""
    if rule == "positive_logit":
        return logits > 0
    if rule == "top1":
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=bool)
    raise ValueError(f"unknown prediction rule {rule!r}; choose one of {', '.join(PREDICTION_RULES)}")


def localization_scores(maps: jax.Array, segmentation: jax.Array, logits: jax.Array, *, prediction_rule: str,
                        tolerance: float = 0) -> dict[str, jax.Array]:
    """Pointing game and mask AUC of every (image, class) pair of a batch.

    Wrap it in ``jax.jit`` to evaluate all classes of a batch in one compiled call.

    A pair counts when the class is present in the segmentation AND predicted (by default logit > 0) AND its map is
    finite, as in the reference evaluation. Pairs with a non-finite map are skipped before anything else
    (they are neither counted nor "present but not predicted").

    Unlike the reference code, each class is judged against its own mask only: the reference accumulates the
    hit pixels of all ground-truth classes processed so far in an image, so a maximum on an earlier class's
    object counts as a hit. That quirk is deliberately not replicated.

    Args:
      maps: (B, K, H, W) float maps, one per class (e.g. ``jax.vmap`` of an attribution over classes), already
        at the segmentation's resolution.
      segmentation: (B, H, W) int, 0 = background, c + 1 = class c, other values belong to no class (see
        ``class_masks``).
      logits: (B, K) float; which classes count as predicted follows ``prediction_rule``.
      tolerance: pointing-game radius in pixels (see ``pointing_game``); the paper uses 0.
      prediction_rule: which classes count as predicted (``predicted_classes``): ``positive_logit`` (the paper's
        multi-label rule, sigmoid outputs) or ``top1`` (single-label, softmax models). No default: the wrong rule
        silently scores other pairs (a softmax model's logits need not be positive).

    Returns:
      A dict of (B, K) arrays:
        ``hit``: pointing-game hit in {0., 1.}, NaN where not ``counted``;
        ``auc``: mask AUC, NaN where not ``counted`` or undefined (the mask covers the whole image);
        ``hit_all_present``, ``auc_all_present``: the same on every present pair with a finite map, whatever the
        model predicts (one pair set for all models, so they compare on equal terms);
        ``counted``, ``present``, ``predicted``, ``finite``: bool.
      So ``jnp.nanmean(hit)`` is the pointing accuracy and ``jnp.nanmean(auc)`` the mean AUC; concatenate the
      dicts of several batches and call ``summarize_localization`` for the report.
    """
    maps, segmentation, logits = jnp.asarray(maps), jnp.asarray(segmentation), jnp.asarray(logits)
    check_rank("maps", maps, 4)
    batch, num_classes, height, width = maps.shape
    if segmentation.shape != (batch, height, width):
        raise ValueError(f"segmentation must have shape (B, H, W) = {(batch, height, width)} for maps of "
                         f"shape {maps.shape}, got {segmentation.shape}")
    if logits.shape != (batch, num_classes):
        raise ValueError(f"logits must have shape (B, K) = {(batch, num_classes)} for maps of shape "
                         f"{maps.shape}, got {logits.shape}")
    masks = class_masks(segmentation, num_classes)
    present = jnp.any(masks, axis=(2, 3))
    predicted = predicted_classes(logits, prediction_rule)
    finite = jnp.all(jnp.isfinite(maps), axis=(2, 3))
    counted = present & predicted & finite
    pairs = (batch * num_classes, height, width)
    pair_maps, pair_masks = maps.reshape(pairs), masks.reshape(pairs)
    hit = pointing_game(pair_maps, pair_masks, tolerance=tolerance).reshape(batch, num_classes)
    auc = mask_auc(pair_maps, pair_masks).reshape(batch, num_classes)
    scored = present & finite
    return {
        "hit": jnp.where(counted, hit, jnp.nan),
        "auc": jnp.where(counted, auc, jnp.nan),
        "hit_all_present": jnp.where(scored, hit, jnp.nan),
        "auc_all_present": jnp.where(scored, auc, jnp.nan),
        "counted": counted,
        "present": present,
        "predicted": predicted,
        "finite": finite,
    }


def summarize_localization(scores: dict[str, jax.Array]) -> dict[str, float | int]:
    """Host-side report of ``localization_scores`` output, as the reference evaluation prints it.

    Args:
      scores: the dict returned by ``localization_scores``, its arrays of any one shape (e.g. (N, K) after
        concatenating batches).

    Returns:
      Python numbers: ``pointing_accuracy`` = hits / counted pairs; ``mean_auc`` over counted pairs whose AUC
      is defined (the reference would give NaN as soon as one mask covers a whole image); ``num_counted`` (the
      reference's correctly predicted GT classes); ``num_present_not_predicted`` (its incorrectly predicted
      ones, finite maps only); ``num_skipped_nonfinite`` (present pairs whose map had a NaN/inf);
      ``pointing_accuracy_all_present`` and ``mean_auc_all_present``, the same over every present pair with a
      finite map, predicted or not (with ``scores`` that have them). Rates are NaN when there is nothing to
      average.
    """
    counted = np.asarray(scores["counted"], bool)
    present = np.asarray(scores["present"], bool)
    predicted = np.asarray(scores["predicted"], bool)
    finite = np.asarray(scores["finite"], bool)
    hits = np.asarray(scores["hit"], np.float64)[counted]
    aucs = np.asarray(scores["auc"], np.float64)[counted]
    aucs = aucs[~np.isnan(aucs)]
    summary = {
        "pointing_accuracy": mean_or_nan(hits),
        "mean_auc": mean_or_nan(aucs),
        "num_counted": int(counted.sum()),
        "num_present_not_predicted": int((present & ~predicted & finite).sum()),
        "num_skipped_nonfinite": int((present & ~finite).sum()),
    }
    if "hit_all_present" in scores:
        scored = present & finite
        all_aucs = np.asarray(scores["auc_all_present"], np.float64)[scored]
        summary.update(pointing_accuracy_all_present=mean_or_nan(np.asarray(scores["hit_all_present"],
                                                                            np.float64)[scored]),
                       mean_auc_all_present=mean_or_nan(all_aucs[~np.isnan(all_aucs)]))
    return summary


def mean_or_nan(values: np.ndarray) -> float:
    """The mean of ``values`` (any shape) as a Python float; NaN, without NumPy's warning, when there are none."""
    return float(np.mean(values, dtype=np.float64)) if np.size(values) else math.nan
