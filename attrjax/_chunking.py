"""Loops over chunks of work (classes, integration steps, perturbed images) that stay fast on every backend.

Attribution and evaluation bound their memory by processing work in chunks one after another. Written as a
``lax.scan``, such a loop is one compiled ``while`` on GPU and TPU: compile time and peak memory independent of the
number of chunks. XLA:CPU, however, runs convolutions inside a ``while`` body several times slower than the same
convolutions outside a loop (https://github.com/jax-ml/jax/issues/12868; measured here: saliency of 6 classes x
16 images of the demo VGG, 1.09 s in ``lax.map`` vs 0.14 s unrolled), so on CPU the loop is a Python loop at trace
time: one straight-line program, compile time growing with the number of chunks. (``lax.scan(..., unroll=True)`` is
not enough: a one-chunk scan still got transposed-kernel convolutions, 8x slower.)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def unroll_loops() -> bool:
    """Whether chunk loops are unrolled: True on the CPU backend, False elsewhere (see the module docstring)."""
    return jax.default_backend() == "cpu"


def scan(f: Callable, init, xs: jax.Array):
    """``jax.lax.scan(f, init, xs)`` over the rows of the array ``xs``, a Python loop where ``unroll_loops()``."""
    if not unroll_loops():
        return jax.lax.scan(f, init, xs)
    carry, ys = init, []
    for row in range(xs.shape[0]):
        carry, y = f(carry, xs[row])
        ys.append(y)
    return carry, jax.tree.map(lambda *rows: jnp.stack(rows), *ys)


def chunked_map(f: Callable[[jax.Array], jax.Array], xs: jax.Array, chunk_size: int) -> jax.Array:
    """``jax.lax.map(f, xs, batch_size=chunk_size)`` (``f`` vmapped over ``chunk_size`` rows of ``xs`` at a time,
    the remainder as one smaller chunk), unrolled where ``unroll_loops()``.

    Args:
      f: a function of one row ``xs[i]`` returning an array.
      xs: (N, ...) array.
      chunk_size: rows per vmapped call, >= 1.

    Returns:
      (N, ...) the stacked ``f(xs[i])``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not unroll_loops():
        return jax.lax.map(f, xs, batch_size=min(chunk_size, xs.shape[0]))
    return jnp.concatenate([jax.vmap(f)(xs[start:start + chunk_size]) for start in range(0, xs.shape[0], chunk_size)])
