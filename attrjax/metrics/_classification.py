"""Multi-label classification metrics, batched and jit-able.

The paper's "mAP" is the *sample-averaged* AP: per image, the AP of its K class scores against its K labels,
averaged over images (the paper prints it x100; these functions return fractions in [0, 1]). The standard VOC
class-wise mAP averages ``class_average_precision`` over classes instead.

An AP is NaN when it is undefined (a ranking without a positive) AND when its ranking holds a NaN score, so a
plain ``jnp.nanmean`` would silently drop a broken model's rows. ``evaluation.classification_report`` averages
honestly: it leaves out only the rows / classes without a positive, counts them, and returns NaN means as soon as
a logit is not finite.

Labels may be bool or numeric; entries > 0 are positives. Scores may be any monotone score (logits rank the
same as probabilities). +-inf scores are ordering values (above / below every finite score, tied with each other;
e.g. the log-probability of 0); NaN orders nothing and makes its ranking's AP (its row's F1) NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_rank(name: str, x: jax.Array, ndim: int, layout: str = "") -> None:
    """Raises ValueError unless ``x`` has rank ``ndim`` (shapes are static, so this also runs under jit).

    ``layout``, e.g. ``"(B, H, W)"``, names the axes in the message."""
    if x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}{' ' + layout if layout else ''}, got shape {x.shape}")


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    """Raises ValueError unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def _scores_and_positives(scores, labels, scores_name="scores") -> tuple[jax.Array, jax.Array]:
    scores, labels = jnp.asarray(scores), jnp.asarray(labels)
    check_rank(scores_name, scores, 2)
    check_same_shape(scores_name, scores, "labels", labels)
    return scores, labels > 0


def _average_precision(scores: jax.Array, positive: jax.Array) -> jax.Array:
    """AP of one ranking with sklearn's step-wise definition and tie handling.

    scores: (N,) float, positive: (N,) bool -> () float, NaN without positives or with a NaN score.

    AP = mean over positives i of precision(score_i), where precision(t) = #positives with score >= t divided
    by #items with score >= t. This equals sklearn's sum_n (R_n - R_{n-1}) P_n over distinct thresholds,
    because the positives tied at a threshold each contribute that threshold's precision. O(N log N): one
    sort, then searchsorted counts the items below each score.
    """
    n = scores.shape[0]
    order = jnp.argsort(scores)
    # positives_below[k] = number of positives among the k smallest scores.
    positives_below = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), jnp.cumsum(positive[order], dtype=jnp.int32)])
    num_below = jnp.searchsorted(scores[order], scores, side="left")
    num_positive = positives_below[-1]
    precision = (num_positive - positives_below[num_below]) / (n - num_below)
    ap = jnp.sum(jnp.where(positive, precision, 0.0)) / jnp.maximum(num_positive, 1)
    return jnp.where((num_positive > 0) & ~jnp.any(jnp.isnan(scores)), ap, jnp.nan)


@jax.jit
def sample_average_precision(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-image average precision over the classes (the paper's "mAP" before averaging over images).

    Args:
      scores: (B, K) float class scores, e.g. logits.
      labels: (B, K) bool or {0, 1}; entries > 0 are positives.

    Returns:
      (B,) float: the AP of each row's ranking of its K classes, ties treated exactly as sklearn's
      ``average_precision_score``; NaN for rows without a positive (sklearn returns 0 there, with a warning)
      and for rows with a NaN score. The paper's number is 100 x the mean over the rows with a positive.
    """
    scores, positive = _scores_and_positives(scores, labels)
    return jax.vmap(_average_precision)(scores, positive)


@jax.jit
def class_average_precision(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-class average precision over the images (VOC-style class-wise AP, non-interpolated).

    Args:
      scores: (B, K) float class scores.
      labels: (B, K) bool or {0, 1}; entries > 0 are positives.

    Returns:
      (K,) float: the AP of each class's ranking of the B images (sklearn's step-wise definition with ties),
      NaN for classes without a positive image and for classes with a NaN score. Class-wise mAP is the mean
      over the classes with a positive.
    """
    scores, positive = _scores_and_positives(scores, labels)
    return jax.vmap(_average_precision, in_axes=1)(scores, positive)


@jax.jit
def f1_samples(logits: jax.Array, labels: jax.Array, *, threshold: float = 0.5) -> jax.Array:
    """Per-sample F1 of thresholded predictions (sklearn ``f1_score(average='samples')`` before the mean).

    The paper predicts class k where ``logit_k >= 0.5``: the threshold is on the *logit*, i.e. a sigmoid
    probability of 0.622, not 0.5. Keep the default to compare with the paper; ``threshold=0.0`` is
    probability 0.5.

    Args:
      logits: (B, K) float.
      labels: (B, K) bool or {0, 1}; entries > 0 are positives.
      threshold: a class is predicted where ``logits >= threshold``.

    Returns:
      (B,) float F1 = 2 TP / (#predicted + #true) per row. A row whose predicted and true sets are both empty
      gets 0.0, sklearn's ``zero_division`` default; a row with a NaN logit is NaN (+inf is predicted, -inf
      is not). The paper's F1 is ``jnp.mean(result)``.
    """
    logits, positive = _scores_and_positives(logits, labels, "logits")
    predicted = logits >= threshold
    true_positives = jnp.sum(predicted & positive, axis=-1)
    num_predicted_or_true = jnp.sum(predicted, axis=-1) + jnp.sum(positive, axis=-1)
    f1 = 2 * true_positives / jnp.maximum(num_predicted_or_true, 1)
    f1 = jnp.where(num_predicted_or_true > 0, f1, 0.0)
    return jnp.where(jnp.any(jnp.isnan(logits), axis=-1), jnp.nan, f1)
