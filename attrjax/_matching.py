"""The paper's attribution-matching regulariser and its stochastic variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attrjax.metrics._classification import check_rank

_NORM_EPS = 1e-12  # F.normalize's default: v / max(||v||, eps)


def normalize_maps(maps: jax.Array) -> jax.Array:
    """Flattens maps (B,H,W) to (B,H*W) and L2-normalises each row; an all-zero map stays zero.

    The norm is sqrt(max(sum v^2, eps^2)), whose gradient is finite at v = 0 (unlike ``jnp.linalg.norm``).
    """
    flat = maps.reshape(maps.shape[0], -1)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(flat), axis=-1, keepdims=True), _NORM_EPS**2))
    return flat / norm


def matching_loss(teacher_maps: jax.Array, student_maps: jax.Array) -> jax.Array:
    """Mean over B*H*W of the squared difference of the per-sample L2-normalised maps.

    Args:
      teacher_maps: (B,H,W); gradients are stopped (the teacher's map is a constant target).
      student_maps: (B,H,W), usually differentiable w.r.t. the student's parameters.

    Returns:
      Scalar loss; finite for all-zero maps.

    Raises:
      ValueError: maps of another rank (e.g. (B,) scores, or (B, C, H, W) features not collapsed to one map per
        sample) or of different shapes.
    """
    check_rank("teacher_maps", teacher_maps, 3, "(B, H, W)")
    check_rank("student_maps", student_maps, 3, "(B, H, W)")
    if teacher_maps.shape != student_maps.shape:
        raise ValueError(f"teacher maps {teacher_maps.shape} and student maps {student_maps.shape} differ; match "
                         "both networks at layers with the same spatial size and batch")
    diff = normalize_maps(jax.lax.stop_gradient(teacher_maps)) - normalize_maps(student_maps)
    return jnp.mean(jnp.square(diff))


def stochastic_channel_keep(key: jax.Array, num_channels: int, drop_rate: float) -> jax.Array:
    """A (C,) float mask that zeroes floor(C * drop_rate) channels drawn uniformly without replacement.

    One draw serves the whole batch: multiply the teacher's sensitivities alpha (B,C) by it before
    collapsing, so the student matches a random sub-ensemble of the teacher's evidence. No 1/(1-p) rescaling is
    needed: the maps are normalised.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate}")
    num_dropped = int(num_channels * drop_rate)
    ranks = jax.random.permutation(key, num_channels)
    return (ranks >= num_dropped).astype(jnp.float32)
