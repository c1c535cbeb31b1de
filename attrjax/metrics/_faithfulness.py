"""Faithfulness of attribution maps to the model: deletion and insertion curves (Petsiuk et al., RISE, 2018).

Deletion replaces an image's pixels by a baseline in the map's order of importance and records the model's score
for the explained class after each increment; a faithful map makes the score fall fast (low area under the
curve). Insertion starts from the baseline and puts the important pixels back first; a faithful map makes the
score rise fast (high area). Batched over images, jit-able with ``logit_fn`` closed over, e.g.

    curve = jax.jit(lambda x, m, t: deletion_curve(model_logits, x, m, t, chunk_size=64))(images, maps, target)
    auc = curve_auc(curve)

Maps must already be at image resolution (resize them first, e.g. with ``attrjax.attribution.resize_maps``).
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from attrjax import _chunking as chunking
from attrjax.attribution._gradcam import Target, target_weights
from attrjax.metrics._agreement import importance_ranks
from attrjax.metrics._classification import check_rank

LogitFn = Callable[[jax.Array], jax.Array]
Score = Literal["sigmoid", "softmax", "logit"]

_SCORE_FNS = {
    "sigmoid": jax.nn.sigmoid,
    "softmax": jax.nn.softmax,
    "logit": lambda logits: logits,
}


def deletion_curve(logit_fn: LogitFn, images: jax.Array, maps: jax.Array, target: Target, *, steps: int = 16,
                   baseline: float | jax.Array = 0.0, score: Score = "sigmoid",
                   chunk_size: int | None = None) -> jax.Array:
    """The target score as the map's most important pixels are replaced by the baseline.

    Curve point i (0..steps) replaces the floor(i * H * W / steps) top-ranked pixels (all channels) of each
    image, so point 0 is the intact image and point ``steps`` the baseline image. The order is one stable sort of
    each map, descending, ties broken by row-major position (see ``importance_ranks``); +-inf pixels come first /
    last, and a map with a NaN pixel orders nothing: its curve is NaN.

    Args:
      logit_fn: images (n, H, W, C) -> logits (n, K), for any n (the chunk size); a pure function, e.g. a model's
        ``apply`` closed over its variables.
      images: (B, H, W, C) float images.
      maps: (B, H, W) attribution maps at image resolution.
      target: the score to follow: (B,) int classes, (B, K) weights on the per-class scores, or a callable of the
        intact images' logits returning either (e.g. ``attrjax.attribution.top1_target``; costs one extra
        forward pass), as for ``grad_cam``.
      steps: number of equal increments (>= 1); the curve has steps + 1 points.
      baseline: what replaces deleted pixels: a scalar, or an array broadcastable to ``images`` (e.g. a blurred
        copy of the images, or a per-channel mean of shape (C,)).
      score: per-class score weighted by ``target``: ``"sigmoid"`` (default: the class probability of a
        multi-label model, as trained here), ``"softmax"`` (probability of a single-label model, RISE's choice)
        or ``"logit"`` (raw, unbounded).
      chunk_size: at most this many perturbed images per ``logit_fn`` call; the B * (steps + 1) curve images
        are evaluated chunk after chunk (``attrjax._chunking.scan``), so memory is O(chunk_size) images. ``None``
        evaluates all of them in one call. A chunk holds consecutive curve points of all images (point-major), so
        ``chunk_size=B`` evaluates one curve point per call.

    Returns:
      (B, steps + 1) float scores, all NaN for an image whose map holds a NaN; ``curve_auc`` of it is the
      deletion AUC (lower = more faithful).
    """
    return _perturbation_curve(logit_fn, images, maps, target, steps=steps, baseline=baseline, score=score,
                               chunk_size=chunk_size, insert=False)


def insertion_curve(logit_fn: LogitFn, images: jax.Array, maps: jax.Array, target: Target, *, steps: int = 16,
                    baseline: float | jax.Array = 0.0, score: Score = "sigmoid",
                    chunk_size: int | None = None) -> jax.Array:
    """The target score as the map's most important pixels are put back into the baseline image.

    The mirror of ``deletion_curve`` (same arguments, order and chunking): point i shows the floor(i * H * W /
    steps) top-ranked pixels of the image over the baseline, so point 0 is the baseline image and point
    ``steps`` the intact image. ``curve_auc`` of it is the insertion AUC (higher = more faithful).
    """
    return _perturbation_curve(logit_fn, images, maps, target, steps=steps, baseline=baseline, score=score,
                               chunk_size=chunk_size, insert=True)


def curve_auc(curve: jax.Array) -> jax.Array:
    """Trapezoid area under curves (..., P) sampled at P >= 2 equally spaced x in [0, 1] -> (...)."""
    curve = jnp.asarray(curve)
    if curve.ndim < 1 or curve.shape[-1] < 2:
        raise ValueError(f"curve must have shape (..., P) with P >= 2 points, got {curve.shape}")
    return (jnp.sum(curve, axis=-1) - (curve[..., 0] + curve[..., -1]) / 2) / (curve.shape[-1] - 1)


def _target_weights(logit_fn: LogitFn, images: jax.Array, target: Target) -> jax.Array:
    """(B, K) weights of ``target`` on the per-class scores; only a callable target runs ``logit_fn``."""
    logits = jax.eval_shape(logit_fn, images) if not callable(target) else logit_fn(images)
    if len(logits.shape) != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"logit_fn must map images {images.shape} to logits (B, K) with B = {images.shape[0]}, "
                         f"got {logits.shape}")
    return target_weights(target, logits)


def _perturbation_curve(logit_fn, images, maps, target, *, steps, baseline, score, chunk_size, insert):
    images, maps = jnp.asarray(images), jnp.asarray(maps)
    check_rank("images", images, 4)
    check_rank("maps", maps, 3)
    if maps.shape != images.shape[:3]:
        raise ValueError(f"maps must have shape (B, H, W) = {images.shape[:3]} for images of shape "
                         f"{images.shape}, got {maps.shape}; resize the maps to image resolution first")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if score not in _SCORE_FNS:
        raise ValueError(f"score must be one of {sorted(_SCORE_FNS)}, got {score!r}")
    baseline = jnp.asarray(baseline, images.dtype)
    try:
        broadcast = np.broadcast_shapes(baseline.shape, images.shape)
    except ValueError:
        broadcast = None
    if broadcast != images.shape:
        raise ValueError(f"baseline of shape {baseline.shape} does not broadcast to images of shape {images.shape}")
    baseline = jnp.broadcast_to(baseline, images.shape)
    weights = _target_weights(logit_fn, images, target)
    score_fn = _SCORE_FNS[score]

    batch, height, width = maps.shape
    ranks = importance_ranks(maps).reshape(maps.shape)
    # Pixels perturbed at each curve point, from none to all (static: exact integer arithmetic).
    counts = jnp.asarray(np.arange(steps + 1) * (height * width) // steps, jnp.int32)
    # Curve images are indexed point-major: pair p is image p % B at curve point p // B.
    num_pairs = batch * (steps + 1)
    chunk = num_pairs if chunk_size is None else min(int(chunk_size), num_pairs)
    num_chunks = -(-num_pairs // chunk)
    # The last chunk is padded with repeats of the first pairs; their scores are dropped below.
    pairs = (jnp.arange(num_chunks * chunk) % num_pairs).reshape(num_chunks, chunk)
    start, fill = (baseline, images) if insert else (images, baseline)

    def evaluate(chunk_pairs: jax.Array) -> jax.Array:
        image_index, point = chunk_pairs % batch, chunk_pairs // batch
        perturbed = ranks[image_index] < counts[point][:, None, None]
        curve_images = jnp.where(perturbed[..., None], fill[image_index], start[image_index])
        scores = score_fn(logit_fn(curve_images))
        return jnp.sum(weights[image_index] * scores, axis=-1)

    _, values = chunking.scan(lambda carry, chunk_pairs: (carry, evaluate(chunk_pairs)), None, pairs)
    values = values.reshape(-1)[:num_pairs]
    curves = values.reshape(steps + 1, batch).T
    return jnp.where(jnp.any(jnp.isnan(maps), axis=(1, 2))[:, None], jnp.nan, curves)
