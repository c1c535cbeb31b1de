"""How closely one attribution map follows another (e.g. a compressed network's map vs its teacher's)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attrjax.metrics.classification import check_same_shape

_EPS = 1e-12


def map_cosine(maps_a: jax.Array, maps_b: jax.Array) -> jax.Array:
    """Cosine similarity of maps (..., H, W) flattened over the last two axes -> (...); NaN where a map is zero."""
    check_same_shape("maps_a", maps_a, "maps_b", maps_b)
    a = maps_a.reshape(*maps_a.shape[:-2], -1)
    b = maps_b.reshape(*maps_b.shape[:-2], -1)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.where(norms > _EPS, jnp.sum(a * b, axis=-1) / jnp.maximum(norms, _EPS), jnp.nan)


def same_peak(maps_a: jax.Array, maps_b: jax.Array) -> jax.Array:
    """1.0 where both maps (..., H, W) have their first (row-major) maximum at the same pixel, else 0.0."""
    check_same_shape("maps_a", maps_a, "maps_b", maps_b)
    flat_a = maps_a.reshape(*maps_a.shape[:-2], -1)
    flat_b = maps_b.reshape(*maps_b.shape[:-2], -1)
    return (jnp.argmax(flat_a, -1) == jnp.argmax(flat_b, -1)).astype(maps_a.dtype)
