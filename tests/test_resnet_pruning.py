"""Structured L1 filter pruning of ResNets: the physically smaller network computes what the unpruned one computes
with the same channels zeroed (in-block and coupled residual streams, basic and bottleneck blocks); kept filters are
the largest L1 norms; parameter counts by hand; pruned models export and import; bad rates fail naming the block."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import draws
from attrjax.models import ResNet, export_resnet, import_resnet, resnet_from_state_dict
from attrjax.pruning._structured_resnet import prune_resnet_filters, resnet_kept_channels, resnet_masked_twin

NUM_CLASSES = 3
# Tiny layouts: layer1.0 has an identity shortcut in the basic one (the stem joins layer1's stream) and a
# downsample in the bottleneck one; layer2.0 halves the map through a downsample in both.
BASIC = ResNet(block="basic", stage_sizes=(2, 1), num_classes=NUM_CLASSES, width=4, stem="small")
BOTTLENECK = ResNet(block="bottleneck", stage_sizes=(2, 1), num_classes=NUM_CLASSES, width=4, stem="small")
BASIC_IMAGENET_STEM = BASIC.clone(stem="imagenet")  # the max-pool sees the zeroed channels of the twin


def _images(side, seed=1):
    return draws.normal(jax.random.key(seed), (2, side, side, 3))


def _initialised(model, side, seed=0):
    """Init, then random BatchNorm statistics and affine parameters, so that BatchNorm is not an identity."""
    variables = model.init(jax.random.key(seed), _images(side))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if x.ndim == 1 else x, jnp.float32),
                          variables["params"])
    params["fc"] = variables["params"]["fc"]
    stats = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.2, 1.0, x.shape), jnp.float32), variables["batch_stats"])
    return {"params": params, "batch_stats": stats}


def _shaped(model, seed=0):
    """Random variables of the right shapes without compiling an init (for everything but forward passes)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)


def _num_params(variables):
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("model, side, options, inner_widths, stream_widths", [
    (BASIC, 8, {}, ((2,), (3,), (3,)), None),
    (BASIC, 8, {"coupled": True, "stream_rates": (0.5, 0.25)}, ((2,), (3,), (3,)), (2, 6)),
    (BASIC_IMAGENET_STEM, 16, {"coupled": True, "stream_rates": (0.5, 0.25)}, ((2,), (3,), (3,)), (2, 6)),
    (BOTTLENECK, 8, {}, ((2, 2), (3, 3), (3, 3)), None),
    (BOTTLENECK, 8, {"coupled": True, "stream_rates": 0.5}, ((2, 2), (3, 3), (3, 3)), (8, 16)),
], ids=["basic", "basic_coupled", "basic_coupled_imagenet_stem", "bottleneck", "bottleneck_coupled"])
def test_pruned_resnet_equals_its_masked_twin(model, side, options, inner_widths, stream_widths):
    variables = _initialised(model, side)
    rates = [0.5, 0.25, 0.6]
    pruned, pruned_variables = prune_resnet_filters(model, variables, rates, **options)
    assert (pruned.inner_widths, pruned.stream_widths) == (inner_widths, stream_widths)
    twin = resnet_masked_twin(model, variables, rates, **options)
    chex.assert_trees_all_equal_shapes(twin, variables)
    images = _images(side)
    logits, state = pruned.apply(pruned_variables, images, mutable=["intermediates"])
    twin_logits, twin_state = model.apply(twin, images, mutable=["intermediates"])
    chex.assert_trees_all_close(logits, twin_logits, atol=1e-5, rtol=1e-5)
    assert not np.allclose(logits, model.apply(variables, images), atol=1e-3)  # pruning did change the network
    if not options:  # block outputs keep their channels: every split point equals the twin's
        chex.assert_trees_all_close(state, twin_state, atol=1e-5, rtol=1e-5)


def _single_taps(shape, values):
    """A kernel of ``shape`` (kh, kw, C_in, C_out), zero but ``values[o]`` at tap (0, 0, 0, o): L1 norms |values|."""
    kernel = np.zeros(shape, np.float32)
    kernel[0, 0, 0] = values
    return kernel


def test_kept_filters_are_the_largest_l1_norms():
    params = _shaped(BASIC)["params"]
    conv1 = params["layer1_0"]["conv1"]
    conv1["kernel"] = _single_taps(conv1["kernel"].shape, [0.3, -2.0, 0.1, 1.0])
    params["layer1_1"]["conv1"]["kernel"] = np.ones_like(params["layer1_1"]["conv1"]["kernel"])  # ties: lower index
    kept = resnet_kept_channels(BASIC, params, 0.5)
    np.testing.assert_array_equal(kept[("layer1_0", "conv1")].outputs, [1, 3])
    np.testing.assert_array_equal(kept[("layer1_0", "conv2")].inputs, [1, 3])
    np.testing.assert_array_equal(kept[("layer1_1", "conv1")].outputs, [0, 1])
    np.testing.assert_array_equal(kept[("layer1_0", "conv2")].outputs, np.arange(4))  # block outputs untouched


def test_coupled_stream_keeps_the_largest_summed_l1_norms_of_its_writers():
    """layer1's stream is written by the stem conv and both blocks' conv2. Alone, each would keep another pair of
    channels ({0, 3}, {1, 3}, {2, 3}); their summed norms (5, 3, 4, 3.5) keep {0, 2} everywhere along the stream."""
    params = _shaped(BASIC)["params"]
    for path, values in [(("conv1",), [-5.0, 0, 0, 1]), (("layer1_0", "conv2"), [0, 3.0, 0, 1]),
                         (("layer1_1", "conv2"), [0, 0, -4.0, 1.5])]:
        module = params[path[0]] if len(path) == 1 else params[path[0]][path[1]]
        module["kernel"] = _single_taps(module["kernel"].shape, values)
    kept = resnet_kept_channels(BASIC, params, 0.0, coupled=True, stream_rates=(0.5, 0.0))
    for path in [("conv1",), ("layer1_0", "conv2"), ("layer1_1", "conv2")]:
        np.testing.assert_array_equal(kept[path].outputs, [0, 2], err_msg="/".join(path))
    for path in [("layer1_0", "conv1"), ("layer1_1", "conv1"), ("layer2_0", "conv1"), ("layer2_0", "downsample_0")]:
        np.testing.assert_array_equal(kept[path].inputs, [0, 2], err_msg="/".join(path))
    np.testing.assert_array_equal(kept[("fc",)].inputs, np.arange(8))


@pytest.mark.parametrize("options, expected", [
    ({}, (3 * 3 * 3 * 4 + 2 * 4)  # stem conv1 (3 -> 4) + bn1
     + 2 * (3 * 3 * 4 * 2 + 2 * 2 + 3 * 3 * 2 * 4 + 2 * 4)  # layer1.0/1: conv1 4 -> 2, bn1, conv2 2 -> 4, bn2
     + (3 * 3 * 4 * 4 + 2 * 4 + 3 * 3 * 4 * 8 + 2 * 8 + 4 * 8 + 2 * 8)  # layer2.0: conv1 4 -> 4, conv2 4 -> 8, ds
     + (8 * NUM_CLASSES + NUM_CLASSES)),  # fc
    ({"coupled": True}, (3 * 3 * 3 * 2 + 2 * 2)  # the stem writes layer1's stream: 2 of 4 channels
     + 2 * (3 * 3 * 2 * 2 + 2 * 2 + 3 * 3 * 2 * 2 + 2 * 2)  # layer1.0/1: conv1 2 -> 2, conv2 2 -> 2
     + (3 * 3 * 2 * 4 + 2 * 4 + 3 * 3 * 4 * 4 + 2 * 4 + 2 * 4 + 2 * 4)  # layer2.0: conv1 2 -> 4, conv2 4 -> 4, ds
     + (4 * NUM_CLASSES + NUM_CLASSES)),
], ids=["in_block", "coupled"])
def test_parameter_count_of_the_pruned_model_by_hand(options, expected):
    pruned, pruned_variables = prune_resnet_filters(BASIC, _shaped(BASIC), 0.5, **options)
    assert _num_params(pruned_variables) == expected
    assert _num_params(jax.eval_shape(lambda: pruned.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))) == expected


@pytest.mark.parametrize("options", [{}, {"coupled": True}], ids=["in_block", "coupled"])
def test_rate_zero_keeps_everything(options):
    variables = _initialised(BASIC, 8)
    pruned, pruned_variables = prune_resnet_filters(BASIC, variables, 0.0, **options)
    chex.assert_trees_all_equal(pruned_variables, variables)
    images = _images(8)
    chex.assert_trees_all_equal(pruned.apply(pruned_variables, images), BASIC.apply(variables, images))


@pytest.mark.parametrize("model, options", [(BASIC, {}), (BOTTLENECK, {"coupled": True, "stream_rates": 0.5})],
                         ids=["basic_in_block", "bottleneck_coupled"])
def test_pruned_models_export_and_import_exactly(model, options):
    pruned, pruned_variables = prune_resnet_filters(model, _shaped(model), [0.5, 0.25, 0.6], **options)
    exported = export_resnet(pruned_variables, pruned)
    assert np.shape(exported["layer1.0.conv2.weight"])[1] == pruned.inner_widths[0][0]  # OIHW: C_in = kept filters
    chex.assert_trees_all_equal(import_resnet(exported, pruned), jax.tree.map(jnp.asarray, pruned_variables))
    assert resnet_from_state_dict(exported) == pruned
    with pytest.raises(ValueError, match=r"the checkpoint's layer1\.0 convs output \(2, .* \(a pruned network"):
        import_resnet(exported, model)


def test_a_coupled_basic_stem_is_read_back_as_the_narrower_network_it_is():
    """The stem writes layer1's stream, so its pruned width is the width the checkpoint reads as; the model read back
    has the same shapes."""
    pruned, pruned_variables = prune_resnet_filters(BASIC, _shaped(BASIC), 0.5, coupled=True)
    found = resnet_from_state_dict(export_resnet(pruned_variables, pruned))
    assert found.width == 2
    chex.assert_trees_all_equal_shapes(jax.eval_shape(lambda: found.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))),
                                       pruned_variables)


@pytest.mark.parametrize("rates, options, message", [
    (0.9, {}, r"rate 0.9 leaves layer1\.0\.conv1 \(with 4 filters\) no filter; use a smaller rate"),
    ([0.0, 0.0, 0.9], {}, r"rate 0.9 leaves layer2\.0\.conv1 \(with 8 filters\) no filter"),
    ([0.5, 0.5], {}, r"got 2 pruning rates for the 3 blocks of this ResNet \(layer1\.0, layer1\.1, layer2\.0\)"),
    (1.0, {}, r"pruning rate of layer1\.0\.conv1 must lie in \[0, 1\), got 1\.0"),
    ([0.0, -0.1, 0.0], {}, r"pruning rate of layer1\.1\.conv1 must lie in \[0, 1\), got -0\.1"),
    ([0.5, 0.5, 0.5], {"coupled": True}, "coupled=True with per-block rates needs .* stream_rates="),
    (0.5, {"stream_rates": 0.5}, "pass coupled=True"),
    (0.5, {"coupled": True, "stream_rates": (0.5,)}, "got 1 stream_rates for the 2 stages"),
    (0.0, {"coupled": True, "stream_rates": (0.0, 0.95)}, "rate 0.95 leaves the residual stream of layer2"),
])
def test_bad_rates_are_refused_naming_the_block(rates, options, message):
    with pytest.raises(ValueError, match=message):
        prune_resnet_filters(BASIC, _shaped(BASIC), rates, **options)


def test_variables_of_another_model_and_bad_widths_are_refused():
    with pytest.raises(ValueError, match="variables do not fit this ResNet"):
        prune_resnet_filters(BASIC, _shaped(BOTTLENECK), 0.5)
    with pytest.raises(ValueError, match=r"inner_widths must be, per block \(3\), a tuple of 1 positive"):
        jax.eval_shape(lambda: BASIC.clone(inner_widths=((2,), (2,))).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    with pytest.raises(ValueError, match=r"stream_widths must be one positive channel count per stage \(2\)"):
        jax.eval_shape(lambda: BASIC.clone(stream_widths=(4, 0)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
