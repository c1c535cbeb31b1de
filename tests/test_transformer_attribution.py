"""Attribution of transformers: AttnLRP / CP-LRP against a float64 NumPy reference, conservation, differentiability,
attention rollout against hand computations, and every method on ViTs written in linen, NNX and plain-function
idioms (tests/transformer_zoo.py)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrjax.attribution import (COMPOSITES, ConstantAttention, Epsilon, SumRule, UniformProduct, UnsupportedOp,
                                 attention_rollout, class_maps, excitation_backprop, propagation_graph,
                                 gradient_rollout, lrp, rap)
from attrjax.models import LinenSplitModel, PlainFunctionSplitModel, as_split_model
from tests import transformer_reference as reference
from tests import transformer_zoo as zoo

TARGET = jnp.array([0, 2])


@pytest.fixture(scope="module")
def plain():
    """The bias-free plain-function ViT of the reference (mean pooling, no class token)."""
    return zoo.make_plain_vit(jax.random.key(6))


@pytest.mark.parametrize("cp", [False, True], ids=["attnlrp", "cp_lrp"])
def test_relevance_matches_the_numpy_reference(plain, cp):
    """The presets' rules without their stabilisers (the reference's LRP-0) in float32, against float64."""
    apply_fn, params, images = plain
    preset = COMPOSITES["cp_lrp" if cp else "attnlrp"]
    exact = dataclasses.replace(preset, default=Epsilon(0.0), products=type(preset.products)(0.0))
    maps = lrp(apply_fn, params, images, TARGET, composite=exact)
    expected = reference.attnlrp_reference(params, np.asarray(images), np.asarray(TARGET), cp=cp)
    chex.assert_shape(maps, images.shape[:3])
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(maps, expected, atol=1e-5 * scale)
    # The presets' stabilisers (epsilon 1e-6) move the maps by float32 rounding's order only.
    np.testing.assert_allclose(lrp(apply_fn, params, images, TARGET, composite=preset), maps, atol=5e-4 * scale)
    # The reference is sharp: another softmax rule, or LayerNorm's scale not held, is far off the engine's maps.
    for mutation in ({"softmax_rule": "gradient"}, {"hold_norm_scale": False}):
        mutated = reference.attnlrp_reference(params, np.asarray(images), np.asarray(TARGET), cp=cp, **mutation)
        if cp and "softmax_rule" in mutation:
            continue  # under CP-LRP no relevance reaches the softmax
        assert float(np.abs(np.asarray(maps) - mutated).max()) > 0.05 * scale, mutation


def test_cp_lrp_conserves_the_target_logit_and_attnlrp_does_not(plain):
    apply_fn, params, images = plain
    logits = apply_fn(params, images)[jnp.arange(2), TARGET]
    exact = dataclasses.replace(COMPOSITES["cp_lrp"], default=Epsilon(0.0), products=ConstantAttention(0.0))
    cp = lrp(apply_fn, params, images, TARGET, composite=exact).sum((1, 2))
    np.testing.assert_allclose(cp, logits, rtol=1e-5, atol=1e-6)
    # AttnLRP's softmax rule drops its bias term: its total differs, by what the reference's differs.
    attn = lrp(apply_fn, params, images, TARGET, composite="attnlrp").sum((1, 2))
    expected = reference.attnlrp_reference(params, np.asarray(images), np.asarray(TARGET)).sum((1, 2))
    assert float(jnp.abs(attn - logits).max()) > 1e-2
    np.testing.assert_allclose(attn, expected, rtol=1e-4)


def test_attnlrp_maps_are_differentiable_in_the_parameters(plain):
    """The gradient of a loss of AttnLRP maps (so they can be matched) along a random direction in parameter space,
    against central differences, in float64. With the presets' tiny stabilisers a pre-activation near zero curves
    the loss by ~1/epsilon^2, so no difference step resolves it: the rules here have epsilon 0.1."""
    apply_fn, params, images = plain
    rng = np.random.default_rng(3)
    composite = dataclasses.replace(COMPOSITES["attnlrp"], default=Epsilon(0.1), products=UniformProduct(0.1),
                                    sums=SumRule(0.1))
    with jax.enable_x64(True):
        params, images = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, images))
        fixed = jnp.asarray(rng.normal(0.0, 0.01, images.shape[:3]))

        def loss(p):
            return jnp.sum((lrp(apply_fn, p, images, TARGET, composite=composite) - fixed) ** 2)

        direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(0.0, 1.0, p.shape)) * jnp.std(p), params)
        value_and_grad = jax.jit(jax.value_and_grad(loss))  # one program for the gradient and the differences
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(value_and_grad(params)[1]),
                                                              jax.tree.leaves(direction)))
        for h in (1e-5, 1e-6):
            shifted = [float(value_and_grad(jax.tree.map(lambda p, d, s=s: p + s * h * d, params, direction))[0])
                       for s in (1.0, -1.0)]
            np.testing.assert_allclose(analytic, (shifted[0] - shifted[1]) / (2 * h), rtol=1e-2)
    assert abs(analytic) > 1e-2


def test_rollouts_match_the_reference(plain):
    apply_fn, params, images = plain
    attentions = [np.asarray(a) for a in zoo.plain_vit_attentions(params, images)]
    np.testing.assert_allclose(attention_rollout(apply_fn, params, images),
                               reference.rollout_reference(attentions, 0, (4, 4)), rtol=1e-5, atol=1e-7)
    offsets = [jnp.zeros_like(a) for a in attentions]
    weights = jax.nn.one_hot(TARGET, 3)
    grads = jax.grad(lambda o: jnp.sum(weights * zoo.plain_vit_apply(params, images, attention_offsets=o)))(offsets)
    np.testing.assert_allclose(gradient_rollout(apply_fn, params, images, TARGET),
                               reference.grad_rollout_reference(attentions, [np.asarray(g) for g in grads], 0, (4, 4)),
                               rtol=1e-4, atol=1e-7)


def test_a_final_log_softmax_starts_relevance_at_the_logits(plain):
    apply_fn, params, images = plain

    def log_probabilities(p, x):
        return jax.nn.log_softmax(apply_fn(p, x))

    np.testing.assert_array_equal(lrp(log_probabilities, params, images, TARGET, composite="cp_lrp"),
                                  lrp(apply_fn, params, images, TARGET, composite="cp_lrp"))


@pytest.mark.parametrize("method", [excitation_backprop, rap])
def test_methods_for_relu_networks_refuse_a_transformer(plain, method):
    apply_fn, params, images = plain
    with pytest.raises(UnsupportedOp, match="assume non-negative activations.*attnlrp"):
        method(apply_fn, params, images, TARGET)


def _nnx(model, state, images):
    """attrjax's variables of an NNX module: its params and BatchNorm statistics, as ``NNXSplitModel`` splits them."""
    del state
    return model, as_split_model(model, images).initial_variables, images, {}, "encoder.layers.0"


ZOO = {  # (model, variables, images, adapter options, a block)
    "big_vision (linen, tuple output)": lambda: (*zoo.make_bigvision_vit(jax.random.key(1)), {"output": 0},
                                                 "Transformer.encoderblock_0"),
    "hf (linen, dict output)": lambda: (*zoo.make_hf_vit(jax.random.key(2)),
                                        {"output": "logits", "train_argument": "deterministic"}, "vit.encoder.layer.0"),
    "nnx": lambda: _nnx(*zoo.make_nnx_vit(jax.random.key(3))),
    "plain functions": lambda: (*zoo.make_plain_vit(jax.random.key(4), cls_token=True, biases=True, pool="tok"), {},
                                None),
}


@pytest.mark.parametrize("name", ZOO)
def test_every_method_runs_on_every_idiom(name):
    """Every transformer method, and Grad-CAM at the first block, on ViTs written in four idioms, adapted by naming
    a layer (and, for models that return more than logits, an output selector)."""
    model, variables, images, options, block = ZOO[name]()
    split = (LinenSplitModel(model, images, **options) if "train_argument" in options
             else as_split_model(model, images, **options))
    logits = split.apply(variables, images)[0]
    for method in ("attnlrp", "cp_lrp", "gradient_rollout", "rollout") + (("gradcam",) if block else ()):
        maps, method_logits = class_maps(split, variables, images, method, layer=block)
        grid = (16, 16) if method.endswith("lrp") else (4, 4)
        chex.assert_shape(maps, (2, 3, *grid))
        chex.assert_tree_all_finite(maps)
        np.testing.assert_allclose(method_logits, logits, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(maps).max()) > 0, method


def _conv_then(activation, use_bias=False):
    """A conv -> ``activation`` -> mean -> dense classifier."""
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = activation(nn.Conv(4, (3, 3), use_bias=use_bias, name="conv")(x))
            return nn.Dense(3, use_bias=False, name="head")(jnp.mean(x, axis=(1, 2)))

    model = Model()
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    return model, model.init(jax.random.key(1), images), images


@pytest.mark.parametrize("activation", [jax.nn.gelu, lambda x: jax.nn.gelu(x, approximate=False), jax.nn.silu,
                                        lambda x: x * jax.nn.sigmoid(x)],
                         ids=["gelu-tanh", "gelu-erf", "silu", "silu-by-hand"])
def test_gated_activations_pass_relevance(activation):
    model, variables, images = _conv_then(activation)
    (node,) = [node for node in propagation_graph(model, variables, images).nodes if getattr(node, "composed", False)]
    maps = lrp(model, variables, images, TARGET, composite="attnlrp")
    logits = model.apply(variables, images)[jnp.arange(2), TARGET]
    np.testing.assert_allclose(maps.sum((1, 2)), logits, rtol=1e-4)  # bias-free epsilon rules: conserved
    # After a biased layer, the activation is still one unit, applied to the conv's output with its bias.
    model, variables, images = _conv_then(activation, use_bias=True)
    graph = propagation_graph(model, variables, images)
    (node,) = [node for node in graph.nodes if getattr(node, "composed", False)]
    (conv,) = [node for node in graph.affine_nodes if node.kind == "conv"]
    assert node.input == conv.output and conv.bias is not None


def _bias_free_attention_model(attention):
    """Patch embedding, LayerNorm (no bias) or RMSNorm, one attention layer of ``attention``'s kind, mean pool."""
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (4, 4), strides=4, use_bias=False, name="embed")(x)
            x = x.reshape(x.shape[0], -1, 8)
            if attention == "flax":
                y = nn.LayerNorm(use_bias=False, name="norm")(x)
                x = x + nn.MultiHeadDotProductAttention(2, use_bias=False, name="attn")(y)
            else:
                y = nn.RMSNorm(name="norm")(x)
                q, k, v = (nn.DenseGeneral((2, 4), use_bias=False, name=n)(y) for n in "qkv")
                o = jax.nn.dot_product_attention(q, k, v)
                x = x + nn.DenseGeneral(8, axis=(-2, -1), use_bias=False, name="out")(o)
            return nn.Dense(3, use_bias=False, name="head")(jnp.mean(x, axis=1))

    model = Model()
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    return model, model.init(jax.random.key(1), images), images


@pytest.mark.parametrize("attention", ["flax", "jax.nn.dot_product_attention"])
def test_cp_lrp_conserves_through_norms_and_attention_functions(attention):
    model, variables, images = _bias_free_attention_model(attention)
    graph = propagation_graph(model, variables, images)
    kinds = [getattr(node, "kind", type(node).__name__) for node in graph.nodes]
    assert {"norm", "softmax", "product"} <= set(kinds), kinds
    logits = model.apply(variables, images)[jnp.arange(2), TARGET]
    np.testing.assert_allclose(lrp(model, variables, images, TARGET, composite="cp_lrp").sum((1, 2)), logits,
                               rtol=1e-4)
    chex.assert_tree_all_finite(lrp(model, variables, images, TARGET, composite="attnlrp"))


def test_a_plain_function_s_named_values_are_layers():
    """Values a plain function names with ``checkpoint_name`` are its layers (here a token sequence whose grid is
    traced); Grad-CAM there equals a hand-written vjp of the rest of the function."""
    from jax.ad_checkpoint import checkpoint_name

    def head(params, tokens):
        return jnp.mean(jnp.tanh(tokens @ params["mix"]), axis=1) @ params["out"]

    def apply_fn(params, images):
        patches = jax.lax.conv_general_dilated(images, params["embed"], (4, 4), "VALID",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
        tokens = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        return head(params, checkpoint_name(tokens + tokens @ params["block"], "block0"))

    keys = jax.random.split(jax.random.key(0), 5)
    params = {"embed": jax.random.normal(keys[0], (4, 4, 3, 8)), "block": jax.random.normal(keys[1], (8, 8)) / 3,
              "mix": jax.random.normal(keys[2], (8, 8)) / 3, "out": jax.random.normal(keys[3], (8, 3))}
    images = jax.random.normal(keys[4], (2, 16, 16, 3))
    maps, _ = class_maps(apply_fn, params, images, "gradcam", layer="block0")
    patches = jax.lax.conv_general_dilated(images, params["embed"], (4, 4), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
    tokens = patches.reshape(2, 16, 8)
    tokens = tokens + tokens @ params["block"]
    logits, vjp_fn = jax.vjp(lambda t: head(params, t), tokens)
    for k in range(3):
        gradients = vjp_fn(jnp.zeros_like(logits).at[:, k].set(1.0))[0]
        expected = jax.nn.relu(jnp.einsum("btd,bd->bt", tokens, gradients.sum(1))).reshape(2, 4, 4)
        np.testing.assert_allclose(maps[:, k], expected, rtol=1e-5, atol=1e-6)
    (row,) = PlainFunctionSplitModel(apply_fn, images, example_variables=params).describe_layers(images)
    assert (row.name, row.kind, row.prefix_tokens, row.grid) == ("block0", "tokens", 0, (4, 4))
