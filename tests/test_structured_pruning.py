"""Structured L1 filter pruning: the physically smaller network computes what the masked original computes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import draws
from attrjax.attribution import grad_cam_all_classes
from attrjax.models import VGG, init_variables, vgg
from attrjax.pruning import (count_params_and_flops, l1_kept_filters, prune_filters, vgg16_paper_rates,
                             zero_filters)


def _random_variables(model, seed=0):
    """Init, then random BatchNorm statistics and affine parameters, so that BN is not an identity."""
    variables = init_variables(model, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def randomize(tree, low, high):
        return jax.tree.map(lambda x: jnp.asarray(rng.uniform(low, high, x.shape), x.dtype), tree)

    params = {name: (randomize(value, 0.5, 1.5) if name.startswith("bn") else value)
              for name, value in variables["params"].items()}
    return {"params": params, "batch_stats": randomize(variables["batch_stats"], 0.1, 1.0)}


@pytest.mark.parametrize("head_pooling", ["flatten", "avg"])
def test_pruned_network_equals_the_masked_original(head_pooling):
    model = vgg(((8, 6), (12,), (10, 10)), num_classes=5, image_size=24, head_pooling=head_pooling,
                attribution_layer="pool3")
    variables = _random_variables(model)
    rates = [0.5, 0.0, 0.25, 0.3, 0.6]
    pruned, pruned_variables = prune_filters(model, variables, rates)
    assert pruned.stage_widths == ((4, 6), (9,), (7, 4))
    masked_variables = zero_filters(model, variables, rates)
    images = draws.normal(jax.random.key(1), (3, 24, 24, 3))
    chex.assert_trees_all_close(pruned.apply(pruned_variables, images), model.apply(masked_variables, images),
                                atol=1e-5, rtol=1e-5)
    # Grad-CAM at the last conv: the removed channels are zero in the masked twin and add nothing to the map.
    @functools.partial(jax.jit, static_argnums=(0, 2))
    def layer_maps(m, v, layer):
        feats = m.apply(v, images, layer=layer, method=VGG.features)
        return grad_cam_all_classes(lambda a: m.apply(v, a, layer=layer, method=VGG.head), feats)[0]

    for layer in ("conv3_2", "pool3", "conv2_1"):
        chex.assert_trees_all_close(layer_maps(pruned, pruned_variables, layer), layer_maps(model, masked_variables,
                                                                                           layer), atol=1e-5, rtol=1e-4)


def test_kept_filters_are_the_largest_l1_norms():
    model = vgg(((4,),), num_classes=2, image_size=8)
    variables = init_variables(model, jax.random.key(0))
    kernel = np.zeros((3, 3, 3, 4), np.float32)
    kernel[..., 0], kernel[..., 1], kernel[..., 2], kernel[..., 3] = 0.3, -2.0, 0.1, 1.0  # L1: 8.1, 54, 2.7, 27
    variables["params"]["conv1_1"]["kernel"] = jnp.asarray(kernel)
    np.testing.assert_array_equal(l1_kept_filters(model, variables["params"], [0.5])["conv1_1"], [1, 3])


def test_paper_rates_give_the_paper_parameter_counts():
    model = vgg("vgg16", num_classes=20, image_size=227)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    expected = {0.3: 8_675_188, 0.7: 3_269_153}  # the paper's counts
    for rate, params in expected.items():
        pruned, pruned_variables = prune_filters(model, variables, vgg16_paper_rates(rate))
        assert count_params_and_flops(pruned, pruned_variables, jnp.zeros((1, 227, 227, 3)))["params"] == params


def test_params_and_flops_of_a_tiny_config_by_hand():
    model = vgg(((2,), (3,)), num_classes=4, image_size=8)
    counted = count_params_and_flops(model, init_variables(model, jax.random.key(0)), jnp.zeros((1, 8, 8, 3)))
    # conv1_1 27*2+2, bn 2*2, conv2_1 18*3+3, bn 2*3, classifier (3*2*2)*4+4
    assert counted["params"] == (54 + 2) + 4 + (54 + 3) + 6 + (48 + 4)
    # 2 * (8*8*9*3*2 + 4*4*9*2*3) + 2 * 12 * 4
    assert counted["flops"] == 2 * (3456 + 864) + 96


def test_zero_conv_weights_are_not_counted():
    model = vgg(((2,), (3,)), num_classes=4, image_size=8)
    variables = jax.tree.map(jnp.ones_like, init_variables(model, jax.random.key(0)))
    dense = count_params_and_flops(model, variables, jnp.zeros((1, 8, 8, 3)))
    params = variables["params"]
    params["conv1_1"]["kernel"] = params["conv1_1"]["kernel"].at[0, 0, 0, :].set(0.0)  # 2 of 54 weights
    params["conv2_1"]["kernel"] = params["conv2_1"]["kernel"].at[1].set(0.0)  # 18 of 54 weights
    params["bn2_1"]["bias"] = jnp.zeros(3)  # zero, but not a conv weight: still counted
    counted = count_params_and_flops(model, variables, jnp.zeros((1, 8, 8, 3)))
    assert counted["params"] == dense["params"] - 2 - 18
    # conv1_1 at 8x8 with 52 weights, conv2_1 at 4x4 with 36, the dense classifier
    assert counted["flops"] == 2 * (64 * 52 + 16 * 36) + 96
    with pytest.raises(ValueError, match="do not fit this model"):
        count_params_and_flops(vgg(((2,), (4,)), num_classes=4, image_size=8), variables, jnp.zeros((1, 8, 8, 3)))


def test_bad_rates_are_rejected():
    model = vgg(((4,), (4,)), num_classes=2, image_size=8)
    variables = init_variables(model, jax.random.key(0))
    with pytest.raises(ValueError, match="2 convs"):
        prune_filters(model, variables, [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_filters(model, variables, [0.5, 1.0])
    with pytest.raises(ValueError, match="no filter"):
        prune_filters(model, variables, [0.8, 0.0])
