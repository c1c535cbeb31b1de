"""Leaf names: a linen model and its NNX twin name their parameters alike, in run records and pruning reports."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from attrjax._paths import path_name
from attrjax.training._loop import param_shapes


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="fc")(nn.Conv(4, (3, 3), name="conv")(x).mean(axis=(1, 2)))


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv, self.fc = nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.conv(x).mean(axis=(1, 2)))


def test_linen_and_nnx_parameters_have_the_same_names_and_shapes():
    linen = LinenNet().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    _, nnx_params = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param)
    expected = {"conv/bias": [4], "conv/kernel": [3, 3, 3, 4], "fc/bias": [2], "fc/kernel": [4, 2]}
    assert param_shapes(linen) == param_shapes(nnx_params) == expected


def test_lists_and_tuples_are_named_by_index_and_dict_keys_kept():
    tree = {"blocks": [(jnp.zeros(1), jnp.zeros(2))], "value": jnp.zeros(3)}
    names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names == ["blocks/0/0", "blocks/0/1", "value"]  # only an NNX variable's .value attribute is left out
