"""The VGG family: the split is exact at every layer, sizes match the paper's, bad configs fail clearly."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from attrjax.models import VGG, check_compatible, init_variables, last_conv_layer, layer_spatial_size, vgg
from attrjax.models._vgg import _variance_scaling, max_pool_2x2
from tests import draws


def _param_count(model):
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("divisor,expected", [(1, 15_224_916), (2, 3_935_284), (4, 1_048_356), (8, 294_364)])
def test_vgg16_parameter_counts_match_the_paper_table(divisor, expected):
    assert _param_count(vgg("vgg16", num_classes=20, image_size=227, width_divisor=divisor)) == expected


def test_head_of_features_equals_the_full_network_at_every_layer():
    model = vgg("vgg11", num_classes=5, image_size=32, width_divisor=16)
    variables = init_variables(model, jax.random.key(0))
    images = draws.normal(jax.random.key(1), (2, 32, 32, 3))
    logits = model.apply(variables, images)
    chex.assert_shape(logits, (2, 5))
    for layer in model.layers:
        feats = model.apply(variables, images, layer=layer, method=VGG.features)
        side = layer_spatial_size(model, layer)
        assert feats.shape[1:3] == (side, side), layer
        chex.assert_trees_all_close(model.apply(variables, feats, layer=layer, method=VGG.head), logits,
                                    atol=1e-5, rtol=1e-5)


def test_paper_layers_have_the_paper_sizes():
    model = vgg("vgg16", image_size=227)
    assert layer_spatial_size(model, "pool5") == 7
    assert layer_spatial_size(model, "conv5_3") == 14
    assert last_conv_layer(model) == "conv5_3"
    assert model.attribution_layer == "pool5"


def test_head_flattens_in_channel_major_order():
    """The classifier's input column k*H*W + i*W + j reads channel k at (i, j), as PyTorch's flatten does."""
    model = vgg(((2,),), num_classes=1, image_size=4, dropout_rate=0.0)
    variables = init_variables(model, jax.random.key(0))
    kernel = jnp.zeros((8, 1)).at[1 * 4 + 2, 0].set(1.0)  # channel 1, position (1, 0) of the 2x2 map
    variables["params"]["classifier"] = {"kernel": kernel, "bias": jnp.zeros(1)}
    feats = jnp.arange(8.0).reshape(1, 2, 2, 2)  # feats[0, i, j, k] = 4i + 2j + k
    logit = model.apply(variables, feats, layer="pool1", method=VGG.head)
    assert float(logit[0, 0]) == float(feats[0, 1, 0, 1])


def test_bad_inputs_name_the_problem():
    model = vgg("vgg16_s3", num_classes=6, image_size=64, width_divisor=16)
    variables = init_variables(model, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(batch, 64, 64, 3\)"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(variables, jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="unknown attribution layer 'pool5'.*conv3_3"):
        model.apply(variables, jnp.zeros((1, 64, 64, 3)), layer="pool5", method=VGG.features)
    with pytest.raises(ValueError, match="too small"):
        init_variables(vgg("vgg16", image_size=16), jax.random.key(0))
    with pytest.raises(ValueError, match="unknown VGG layout"):
        vgg("vgg17")
    with pytest.raises(ValueError, match="width_divisor"):
        vgg("vgg16", width_divisor=0)


def test_incompatible_teacher_and_student_are_rejected():
    teacher = vgg("vgg16_s3", num_classes=6, image_size=64)
    with pytest.raises(ValueError, match="6 classes but the student 5"):
        check_compatible(teacher, vgg("vgg16_s3", num_classes=5, image_size=64))
    with pytest.raises(ValueError, match="64 px images but the student 32 px"):
        check_compatible(teacher, vgg("vgg16_s3", num_classes=6, image_size=32))
    with pytest.raises(ValueError, match="student has no layer 'conv3_3'"):
        check_compatible(teacher, vgg("vgg11", num_classes=6, image_size=64), ["conv3_3"])
    check_compatible(teacher, vgg("vgg16_s3", num_classes=6, image_size=64, width_divisor=8), ["pool3", "conv3_3"])


def test_max_pool_matches_flax_max_pool_including_odd_sizes():
    for size in (8, 7):  # 227 -> 113 needs the floor behaviour
        x = draws.normal(jax.random.key(size), (2, size, size + 2, 5))
        chex.assert_trees_all_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"))


@pytest.mark.parametrize("shape,mode,distribution", [
    ((3, 3, 5, 8), "fan_in", "uniform"), ((3, 3, 2, 4), "fan_out", "normal"), ((12, 7), "fan_in", "uniform")])
def test_the_flat_drawn_initializer_equals_jax_variance_scaling(shape, mode, distribution):
    key = jax.random.key(3)
    expected = jax.nn.initializers.variance_scaling(0.5, mode, distribution)(key, shape)
    drawn = _variance_scaling(0.5, mode, distribution)(key, shape)
    # The same bits: equal to float32 rounding (jax 0.12 multiplies the normal draw's constants in another order).
    chex.assert_trees_all_close(drawn, expected, rtol=3e-7, atol=0)
    chex.assert_trees_all_equal_dtypes(drawn, expected)
