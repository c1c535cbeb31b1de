"""How closely one attribution map follows another (e.g. a compressed network's map vs its teacher's).

Every function takes maps (..., H, W) (any leading axes, e.g. (B, H, W) or (B, K, H, W)) and returns one value
per map (...). Maps are compared pixel by pixel, so both must be at the same resolution.

``map_cosine``, ``same_peak``, ``spearman_rank`` and ``top_k_iou`` are all NaN where either map of a pair is not
comparable: it holds a NaN or +-inf pixel, or it is constant (every pixel equal, e.g. an all-zero Grad-CAM map).
A constant map, zero or not, ranks no pixel above another: it has no peak, no order and no top-k set, and its
cosine with a map would only measure that map's mean. So it agrees with nothing, not even with another constant
map, and the four metrics are defined on the same pairs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attrjax.metrics._classification import check_same_shape


def _check_maps(maps_a, maps_b) -> tuple[jax.Array, jax.Array]:
    maps_a, maps_b = jnp.asarray(maps_a), jnp.asarray(maps_b)
    if maps_a.ndim < 2:
        raise ValueError(f"maps must have shape (..., H, W), got {maps_a.shape}")
    check_same_shape("maps_a", maps_a, "maps_b", maps_b)
    return maps_a, maps_b


def _flat(maps: jax.Array) -> jax.Array:
    """(..., H, W) -> (..., H*W) float (integer maps are promoted)."""
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        maps = maps.astype(jnp.float32)
    return maps.reshape(*maps.shape[:-2], -1)


def _comparable(maps: jax.Array) -> jax.Array:
    """(..., H, W) -> (...) bool: every pixel is finite and not all pixels are equal (see the module docstring)."""
    flat = _flat(maps)
    return jnp.all(jnp.isfinite(flat), axis=-1) & (jnp.max(flat, axis=-1) > jnp.min(flat, axis=-1))


def _comparable_pairs(maps_a: jax.Array, maps_b: jax.Array) -> jax.Array:
    return _comparable(maps_a) & _comparable(maps_b)


def map_cosine(maps_a: jax.Array, maps_b: jax.Array) -> jax.Array:
    """Cosine similarity of maps (..., H, W) flattened over the last two axes -> (...) in [-1, 1].

    Each map is first divided by its largest |pixel|, so that the squares of very large or very small raw maps
    neither overflow nor underflow float32. Identical maps score exactly 1 (rounding would give 0.99999994 now
    and then, e.g. for a teacher compared with itself). NaN where either map is not comparable: NaN / inf
    pixels, or constant (zero included).
    """
    maps_a, maps_b = _check_maps(maps_a, maps_b)
    flat_a, flat_b = _flat(maps_a), _flat(maps_b)
    a, b = _divide_by_max_magnitude(flat_a), _divide_by_max_magnitude(flat_b)
    cosine = jnp.sum(a * b, axis=-1) / jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    cosine = jnp.where(jnp.all(flat_a == flat_b, axis=-1), 1.0, jnp.clip(cosine, -1.0, 1.0))
    return jnp.where(_comparable_pairs(maps_a, maps_b), cosine, jnp.nan)


def _divide_by_max_magnitude(flat: jax.Array) -> jax.Array:
    """(..., N) -> (..., N) with max |value| 1 per row (an all-zero row stays zero)."""
    scale = jnp.max(jnp.abs(flat), axis=-1, keepdims=True)
    return flat / jnp.where(scale > 0, scale, 1.0)


def same_peak(maps_a: jax.Array, maps_b: jax.Array) -> jax.Array:
    """1.0 where both maps (..., H, W) have their first (row-major) maximum at the same pixel, else 0.0 -> (...).

    NaN where either map is not comparable (NaN / inf pixels, or constant: no peak), the pairs where
    ``map_cosine`` is NaN.
    """
    maps_a, maps_b = _check_maps(maps_a, maps_b)
    same = jnp.argmax(_flat(maps_a), -1) == jnp.argmax(_flat(maps_b), -1)
    return jnp.where(_comparable_pairs(maps_a, maps_b), same.astype(jnp.float32), jnp.nan)


def importance_ranks(maps: jax.Array) -> jax.Array:
    """Each pixel's place in its map's descending order: (..., H, W) -> (..., H*W) int32, 0 = most important.

    One stable sort per map. Ties go to the pixel that comes first in row-major order (smallest row, then
    smallest column), the rule ``same_peak`` and ``pointing_game`` use for the maximum; -0 ties with +0; NaN
    pixels rank last (after -inf). This is the order in which ``deletion_curve`` removes pixels and the pixel
    set ``top_k_iou`` compares.
    """
    flat = _flat(jnp.asarray(maps))
    # Negating makes an ascending stable sort descending while keeping ties in row-major order; jnp's sort puts
    # NaN keys after +inf.
    keys = jnp.where(jnp.isnan(flat), jnp.nan, -jnp.where(flat == 0, 0.0, flat))
    order = jnp.argsort(keys, axis=-1, stable=True)
    positions = jnp.broadcast_to(jnp.arange(flat.shape[-1], dtype=jnp.int32), order.shape)
    return jnp.put_along_axis(jnp.zeros_like(positions), order, positions, axis=-1, inplace=False)


def _average_ranks(values: jax.Array) -> jax.Array:
    """(N,) float -> (N,) float 0-based ranks, tied values sharing the mean of their positions (scipy's
    ``rankdata(method="average") - 1``). Tie groups come from running max/min of their boundaries."""
    n = values.shape[0]
    order = jnp.argsort(values)
    sorted_values = values[order]
    index = jnp.arange(n)
    boundary = sorted_values[1:] != sorted_values[:-1]
    group_start = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones((1,), bool), boundary]), index, 0))
    group_end = jax.lax.cummin(jnp.where(jnp.concatenate([boundary, jnp.ones((1,), bool)]), index + 1, n),
                               reverse=True)
    average = (group_start + group_end - 1).astype(values.dtype) / 2
    return jnp.zeros_like(values).at[order].set(average)


def spearman_rank(maps_a: jax.Array, maps_b: jax.Array) -> jax.Array:
    """Spearman rank correlation of the pixels of each pair of maps.

    Equals ``scipy.stats.spearmanr(a.ravel(), b.ravel())``: the Pearson correlation of the pixels' ranks,
    tied pixels sharing their average rank (so -0 and +0 tie).

    Args:
      maps_a: (..., H, W) float maps, e.g. a teacher's maps (B, H, W) or all-class maps (B, K, H, W).
      maps_b: maps of the same shape, e.g. a student's.

    Returns:
      (...) float in [-1, 1]; NaN where either map is not comparable: constant (its ranks have no variance) or
      holding a NaN / inf pixel.
    """
    maps_a, maps_b = _check_maps(maps_a, maps_b)
    a, b = _flat(maps_a), _flat(maps_b)
    n = a.shape[-1]
    batch_shape = a.shape[:-1]
    rank_fn = jax.vmap(_average_ranks)
    # The mean rank is exactly (n - 1) / 2 whatever the ties, so centring is exact in float32.
    centred_a = rank_fn(a.reshape(-1, n)).reshape(a.shape) - (n - 1) / 2
    centred_b = rank_fn(b.reshape(-1, n)).reshape(b.shape) - (n - 1) / 2
    norms = jnp.sqrt(jnp.sum(jnp.square(centred_a), -1) * jnp.sum(jnp.square(centred_b), -1))
    rho = jnp.sum(centred_a * centred_b, -1) / jnp.where(norms > 0, norms, 1.0)
    return jnp.where(_comparable_pairs(maps_a, maps_b), jnp.clip(rho, -1.0, 1.0), jnp.nan).reshape(batch_shape)


def top_k_iou(maps_a: jax.Array, maps_b: jax.Array, fraction: float = 0.1) -> jax.Array:
    """Intersection over union of the top-``fraction`` pixel sets of each pair of maps.

    Each set holds exactly k = ceil(fraction * H * W) pixels (at least 1): the first k in the order of
    ``importance_ranks``, i.e. ties at the threshold are broken by row-major position, not widened, so both
    sets always have the same size and IoU = |A & B| / (2k - |A & B|).

    Args:
      maps_a: (..., H, W) maps.
      maps_b: maps of the same shape.
      fraction: a Python float in (0, 1]; 1 compares whole maps (IoU 1).

    Returns:
      (...) float in [0, 1]; NaN where either map is not comparable: constant (its top set would be the first
      k pixels of the row-major order, whatever the map) or holding a NaN / inf pixel.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a Python number in (0, 1], got {fraction!r}")
    maps_a, maps_b = _check_maps(maps_a, maps_b)
    n = maps_a.shape[-2] * maps_a.shape[-1]
    # round() keeps float noise such as 0.1 * 30 = 3.0000000000000004 from adding a pixel.
    k = max(1, math.ceil(round(fraction * n, 9)))
    in_a = importance_ranks(maps_a) < k
    in_b = importance_ranks(maps_b) < k
    intersection = jnp.sum(in_a & in_b, axis=-1).astype(jnp.float32)
    iou = intersection / (2 * k - intersection)
    return jnp.where(_comparable_pairs(maps_a, maps_b), iou, jnp.nan)
