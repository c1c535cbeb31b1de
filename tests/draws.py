"""``jax.random.normal`` and ``uniform`` for test data, drawn as one flat vector and reshaped.

The same numbers (threefry's bits depend on an element's flat index only), but XLA:CPU compiles the draw of a 4-D
image-like shape in seconds and a flat one in a fraction of that; the suite draws a few dozen such arrays.
"""

import math

import jax
import jax.numpy as jnp


def normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def uniform(key: jax.Array, shape, dtype=jnp.float32, minval=0.0, maxval=1.0) -> jax.Array:
    return jax.random.uniform(key, (math.prod(shape),), dtype, minval, maxval).reshape(shape)
