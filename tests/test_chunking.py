"""Chunk loops give what ``lax.map`` / ``lax.scan`` give, unrolled on CPU or not."""

import chex
import jax
import jax.numpy as jnp
import pytest

from attrjax import _chunking as chunking


@pytest.fixture(params=[True, False], ids=["unrolled", "lax"])
def unroll(request, monkeypatch):
    monkeypatch.setattr(chunking, "unroll_loops", lambda: request.param)
    return request.param


@pytest.mark.parametrize("count,chunk_size", [(7, 3), (6, 6), (5, 9), (4, 1)])
def test_chunked_map_matches_a_row_by_row_map(unroll, count, chunk_size):
    xs = jnp.arange(count * 2, dtype=jnp.float32).reshape(count, 2)
    f = lambda row: jnp.outer(row, row).sum() + row  # noqa: E731
    expected = jnp.stack([f(row) for row in xs])
    chex.assert_trees_all_close(jax.jit(lambda xs: chunking.chunked_map(f, xs, chunk_size))(xs), expected)


def test_scan_matches_lax_scan(unroll):
    xs = jnp.arange(12, dtype=jnp.float32).reshape(4, 3)
    step = lambda carry, row: (carry + row, carry * row)  # noqa: E731
    chex.assert_trees_all_close(chunking.scan(step, jnp.ones(3), xs), jax.lax.scan(step, jnp.ones(3), xs))
    # A step without per-row outputs, as the integrated-gradients running sum.
    total, ys = chunking.scan(lambda carry, row: (carry + row, None), jnp.zeros(3), xs)
    chex.assert_trees_all_close(total, xs.sum(0))
    assert ys is None


def test_chunked_map_rejects_a_zero_chunk():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunking.chunked_map(lambda row: row, jnp.ones((3, 2)), 0)

