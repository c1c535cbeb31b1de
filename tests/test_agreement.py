"""Teacher-student attribution agreement metrics against closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.metrics import map_cosine, same_peak


def test_map_cosine_closed_forms():
    base = jnp.arange(1.0, 10.0).reshape(3, 3)
    other = jnp.zeros((3, 3)).at[0, 0].set(1.0)
    maps_a = jnp.stack([base, base, other, jnp.zeros((3, 3))])
    maps_b = jnp.stack([3.0 * base, other, other, base])
    cosine = np.asarray(map_cosine(maps_a, maps_b))
    np.testing.assert_allclose(cosine[:3], [1.0, 1.0 / np.linalg.norm(np.arange(1.0, 10.0)), 1.0], rtol=1e-6)
    assert np.isnan(cosine[3])  # a zero map has no direction


def test_same_peak_uses_the_first_row_major_maximum():
    a = jnp.zeros((2, 2, 2)).at[0, 1, 0].set(1.0).at[1].set(1.0).at[1, 1, 1].set(0.0)  # second map: tied maxima
    b = jnp.zeros((2, 2, 2)).at[0, 1, 0].set(5.0).at[1, 0, 0].set(2.0)                 # -> peak at (0, 0)
    np.testing.assert_array_equal(same_peak(a, b), [1.0, 1.0])
    np.testing.assert_array_equal(same_peak(a, jnp.zeros((2, 2, 2)).at[:, 1, 1].set(1.0)), [0.0, 0.0])


def test_mismatched_maps_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        map_cosine(jnp.zeros((2, 3, 3)), jnp.zeros((2, 4, 4)))
