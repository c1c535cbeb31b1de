"""Token layers: a transformer's blocks (B,T,D) are layers of the split model, presented as the (B,h,w,D) map of
their patch tokens; the layer listing; and the output selector of models that return more than their logits."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import draws
from attrjax.attribution import class_maps, weighted_collapse
from attrjax.models import as_split_model
from attrjax.models._layout import IMAGE_AXES, describe, traced_axes
from attrjax.models._split import LinenSplitModel, NNXSplitModel, format_layers

IMAGES = draws.normal(jax.random.key(0), (2, 8, 8, 3))  # 2 x 2 patches: a 4 x 4 grid of 16 patch tokens
WIDTH, CLASSES = 8, 3


def _random_like(abstract):
    """Normal(0, 0.5) arrays shaped like the leaves of ``abstract``, from one flat draw: the models' own
    initialisers draw each 4-D kernel separately, which XLA:CPU takes many seconds to compile."""
    leaves, treedef = jax.tree.flatten(abstract)
    offsets = np.cumsum([0] + [leaf.size for leaf in leaves])
    flat = 0.5 * np.asarray(draws.normal(jax.random.key(1), (int(offsets[-1]),)))
    return treedef.unflatten([jnp.asarray(flat[start:stop].reshape(leaf.shape))
                              for start, stop, leaf in zip(offsets, offsets[1:], leaves)])


def _variables(split):
    return _random_like(jax.eval_shape(split.init, jax.random.key(0), IMAGES))


class Block(nn.Module):
    """A pre-LayerNorm encoder block: attention, then an MLP, each with a residual."""

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="norm1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attention")(y, y)
        y = nn.Dense(2 * WIDTH, name="fc1")(nn.LayerNorm(name="norm2")(x))
        return x + nn.Dense(WIDTH, name="fc2")(nn.gelu(y))


class ViT(nn.Module):
    """A conv patch embedding, ``prefix`` learned tokens (class, distillation) before the patch tokens, a position
    embedding, two blocks and a head on the class token. ``embed`` and ``finish`` split it at ``block0``."""

    prefix: int = 1

    def setup(self):
        self.patches = nn.Conv(WIDTH, (2, 2), strides=2, padding="VALID")
        self.prefix_tokens = self.param("prefix_tokens", nn.initializers.normal(1.0), (1, self.prefix, WIDTH))
        self.position = self.param("position", nn.initializers.normal(0.5), (1, self.prefix + 16, WIDTH))
        self.block0, self.block1 = Block(), Block()
        self.norm, self.head = nn.LayerNorm(), nn.Dense(CLASSES)

    def embed(self, images):  # -> tokens (B, prefix + 16, D)
        x = self.patches(images)
        x = x.reshape(x.shape[0], -1, WIDTH)
        return jnp.concatenate([jnp.tile(self.prefix_tokens, (x.shape[0], 1, 1)), x], axis=1) + self.position

    def finish(self, x):  # block0's output (B,T,D) -> logits (B,K)
        return self.head(self.norm(self.block1(x))[:, 0])

    def __call__(self, images):
        return self.finish(self.block0(self.embed(images)))


def _vit(prefix=1):
    model = ViT(prefix)
    split = LinenSplitModel(model, IMAGES[:1])
    return model, split, _variables(split)


def _patch_head(model, variables, prefix_tokens):
    """block0's patch tokens (B,4,4,D) -> logits, its prefix tokens held at ``prefix_tokens``: by hand."""
    def head(patches):
        tokens = jnp.concatenate([prefix_tokens, patches.reshape(patches.shape[0], 16, WIDTH)], axis=1)
        return model.apply(variables, tokens, method=ViT.finish)
    return head


def test_grad_cam_at_a_token_layer_equals_a_hand_written_vjp_over_the_patch_tokens():
    model, split, variables = _vit()
    target = jnp.array([1, 2])
    cotangents = jnp.stack([draws.normal(jax.random.key(3), (2, CLASSES)), jax.nn.one_hot(target, CLASSES)])
    perturbation = draws.normal(jax.random.key(4), (2, 4, 4, WIDTH))

    @jax.jit  # (one compilation, not hundreds of eager ops)
    def split_and_hand_written(variables):
        lin = split.linearize(variables, IMAGES, "block0")
        gradients = jax.vmap(lin.vjp)(cotangents)
        cam = weighted_collapse(lin.activations, jnp.sum(gradients[1], axis=(1, 2)))
        perturbed = split.apply_perturbed(variables, IMAGES, {"block0": perturbation})[0]
        block0 = model.apply(variables, IMAGES, method=lambda m, x: m.block0(m.embed(x)))
        patches = block0[:, 1:].reshape(2, 4, 4, WIDTH)  # the class token held fixed
        head = _patch_head(model, variables, block0[:, :1])
        logits, vjp = jax.vjp(head, patches)
        (hand_gradients,) = jax.vmap(vjp)(cotangents)
        channel_weights = jnp.sum(hand_gradients[1], axis=(1, 2))
        hand_cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", patches, channel_weights))
        return ((lin.activations, lin.logits, gradients, cam, perturbed),
                (patches, logits, hand_gradients, hand_cam, head(patches + perturbation)))

    from_split, by_hand = split_and_hand_written(variables)
    chex.assert_trees_all_close(from_split, by_hand, atol=1e-5)
    chex.assert_trees_all_close(from_split[3], by_hand[3], atol=1e-6)
    assert float(jnp.max(from_split[3])) > 1e-3
    chex.assert_equal(split.activation_shape(variables, IMAGES, "block0"), (2, 4, 4, WIDTH))
    maps, _ = jax.jit(lambda v: class_maps(model, v, IMAGES, "gradcam", layer="block0"))(variables)  # (evaluation)
    chex.assert_trees_all_close(maps[jnp.arange(2), target], from_split[3], atol=1e-6)


def test_gradients_flow_through_the_class_token_which_stays_out_of_the_map():
    model, split, variables = _vit()
    cotangent = jax.nn.one_hot(jnp.array([0, 2]), CLASSES)
    gradients = jax.jit(lambda v: split.linearize_layers(v, IMAGES, ("block0", "block1")).vjp(cotangent))(variables)
    # The head reads the class token only: block0's patch tokens reach it through block1's attention with the class
    # token, block1's patch tokens not at all.
    assert float(jnp.max(jnp.abs(gradients["block0"]))) > 1e-4
    assert float(jnp.max(jnp.abs(gradients["block1"]))) == 0.0
    chex.assert_shape(gradients["block1"], (2, 4, 4, WIDTH))


def test_every_block_is_a_layer_and_the_listing_shows_kinds_and_shapes():
    _, split, _ = _vit()
    assert {"patches", "block0", "block1", "block0.norm1", "block0.attention", "block0.attention.out",
            "block0.fc2", "norm"} <= set(split.layers)
    assert split.layers.index("block0") < split.layers.index("block1")
    rows = {row.name: row for row in split.describe_layers(IMAGES)}
    assert rows["patches"][1:] == ("map", (2, 4, 4, WIDTH), (2, 4, 4, WIDTH), 0, None, "")
    assert rows["block1"][1:] == ("tokens", (2, 17, WIDTH), (2, 4, 4, WIDTH), 1, (4, 4), "")
    assert rows["block0.fc1"].map_shape == (2, 4, 4, 2 * WIDTH)
    for projection in ("query", "key", "value"):
        name = f"block0.attention.{projection}"
        assert rows[name].kind == "refused" and name not in split.layers
        with pytest.raises(ValueError, match=rf"layer '{name}' outputs \(B, 17, 2, 4\) with axes \(batch, "
                                             r"tokens\(1\+4x4\), mixed, mixed\).*per-head attention projections"):
            split.check_layer(name)
    table = format_layers(split.describe_layers(IMAGES))
    assert "| `block0` | tokens | (B, 17, 8) | (B, 4, 4, 8) | 1 | 4x4 |  |" in table
    assert "| `patches` | map | (B, 4, 4, 8) | (B, 4, 4, 8) |  |  |  |" in table
    assert "| `block0.attention.query` | refused | (B, 17, 2, 4) |  |  |  | layer 'block0.attention.query'" in table


def test_two_prefix_tokens_are_inferred():
    split = LinenSplitModel(ViT(prefix=2), IMAGES[:1])
    row = next(row for row in split.describe_layers(IMAGES) if row.name == "block0")
    assert (row.output_shape, row.prefix_tokens, row.grid) == ((2, 18, WIDTH), 2, (4, 4))
    variables = jax.eval_shape(split.init, jax.random.key(1), IMAGES)
    chex.assert_equal(split.activation_shape(variables, IMAGES, "block1"), (2, 4, 4, WIDTH))


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=WIDTH, decode=False, keep_rngs=False,
                                                rngs=rngs)
        self.norm2 = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs), nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class NNXViT(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.patches = nnx.Conv(3, WIDTH, (2, 2), strides=2, padding="VALID", rngs=rngs)
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, WIDTH)))
        self.blocks = nnx.List([NNXBlock(rngs), NNXBlock(rngs)])
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def embed(self, images):
        x = self.patches(images)
        x = x.reshape(x.shape[0], -1, WIDTH)
        return jnp.concatenate([jnp.tile(self.cls[...], (x.shape[0], 1, 1)), x], axis=1)

    def __call__(self, images):
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=1))


def test_an_nnx_transformers_blocks_are_layers_and_linearise_like_a_hand_written_vjp():
    graphdef, params = nnx.split(nnx.eval_shape(lambda: NNXViT(nnx.Rngs(0))))
    module = nnx.merge(graphdef, _random_like(params))
    split = NNXSplitModel.from_module(module, IMAGES)
    assert {"blocks.0", "blocks.1", "blocks.0.attention.out"} <= set(split.layers)
    assert "per-head attention projections" in split.not_feature_maps["blocks.0.attention.query"]
    cotangent = draws.normal(jax.random.key(3), (2, CLASSES))

    @jax.jit
    def split_and_hand_written(variables):
        lin = split.linearize(variables, IMAGES, "blocks.0")
        block0 = module.blocks[0](module.embed(IMAGES))

        def head(patches):
            tokens = jnp.concatenate([block0[:, :1], patches.reshape(2, 16, WIDTH)], axis=1)
            return module.head(jnp.mean(module.blocks[1](tokens), axis=1))

        patches = block0[:, 1:].reshape(2, 4, 4, WIDTH)
        return (lin.activations, lin.vjp(cotangent)), (patches, jax.vjp(head, patches)[1](cotangent)[0])

    from_split, by_hand = split_and_hand_written(split.init(None, IMAGES))
    chex.assert_trees_all_close(from_split, by_hand, atol=1e-6)


class ChannelsFirst(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.moveaxis(x, -1, 1)


class PatchifyMixer(nn.Module):
    """Patches cut by reshape and transpose, a dense embedding, one token-wise MLP; NCHW and (B,D,T) transposes."""

    @nn.compact
    def __call__(self, images):
        b = images.shape[0]
        patches = images.reshape(b, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, 12)
        x = nn.Dense(WIDTH, name="embed")(patches)
        x = x + nn.Dense(WIDTH, name="mlp")(nn.relu(x))
        channels_first = ChannelsFirst(name="nchw")(x.reshape(b, 4, 4, WIDTH))
        transposed = ChannelsFirst(name="feature_major")(x)
        return nn.Dense(CLASSES)(jnp.mean(x, axis=1) + jnp.mean(channels_first, axis=(2, 3))
                                 + jnp.mean(transposed, axis=2))


def test_a_patchify_reshape_gives_a_grid_and_transposed_outputs_are_still_refused():
    split = LinenSplitModel(PatchifyMixer(), IMAGES[:1])
    assert split.layers == ("embed", "mlp")
    rows = {row.name: row for row in split.describe_layers(IMAGES)}
    assert (rows["embed"].kind, rows["embed"].prefix_tokens, rows["embed"].grid) == ("tokens", 0, (4, 4))
    with pytest.raises(ValueError, match=r"layer 'nchw' outputs \(B, 8, 4, 4\) with axes \(batch, channels, height, "
                                         r"width\).*transpose a channels-first output"):
        split.check_layer("nchw")
    with pytest.raises(ValueError, match=r"layer 'feature_major' outputs \(B, 8, 16\) with axes \(batch, channels, "
                                         r"tokens\(4x4\)\)"):
        split.check_layer("feature_major")
    variables = _variables(split)
    lin = split.linearize(variables, IMAGES, "embed")
    chex.assert_shape(lin.vjp(jnp.ones((2, CLASSES))), (2, 4, 4, WIDTH))


def test_the_layout_of_tokens_through_slices_concatenations_and_reshapes():
    def paths(images):
        b = images.shape[0]
        tokens = images[:, :4, :4, :].reshape(b, 16, 3)  # a crop, then its 4 x 4 grid
        prefixed = jnp.concatenate([jnp.zeros((b, 2, 3)), tokens], axis=1)
        return [tokens, prefixed,
                jnp.concatenate([jnp.ones((b, 1, 3)), prefixed], axis=1),  # a third prefix token
                jnp.concatenate([tokens, jnp.zeros((b, 1, 3))], axis=1),  # a token after the grid
                prefixed[:, 2:].reshape(b, 4, 4, 3),  # the patch tokens back on their grid: a map
                prefixed[:, 1:],  # one prefix token dropped
                prefixed[:, :-1]]  # part of the grid dropped

    assert [describe(axes) for axes in traced_axes(paths, IMAGES)] == [
        "(batch, tokens(4x4), channels)", "(batch, tokens(2+4x4), channels)", "(batch, tokens(3+4x4), channels)",
        "(batch, mixed, channels)", describe(IMAGE_AXES), "(batch, tokens(1+4x4), channels)",
        "(batch, mixed, channels)"]


class GlobalToken(nn.Module):
    """A token computed from the images (their mean patch) before the patch tokens: no grid can be traced."""

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(WIDTH, (2, 2), strides=2, padding="VALID", name="patches")(images)
        x = x.reshape(x.shape[0], 16, WIDTH)
        x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
        x = nn.Dense(WIDTH, name="mix")(x)
        return nn.Dense(CLASSES)(x[:, 0])


def test_a_grid_that_cannot_be_traced_is_declared_and_a_wrong_declaration_is_refused():
    undeclared = LinenSplitModel(GlobalToken(), IMAGES[:1])
    assert undeclared.layers == ("patches",)
    with pytest.raises(ValueError, match=r"layer 'mix' outputs \(B, 17, 8\) with axes \(batch, mixed, channels\).*"
                                         r"declare it: token_grid=\(h, w\)"):
        undeclared.check_layer("mix")
    declared = as_split_model(GlobalToken(), IMAGES, token_grid=(4, 4))
    row = next(row for row in declared.describe_layers(IMAGES) if row.name == "mix")
    assert (row.kind, row.prefix_tokens, row.grid) == ("tokens", 1, (4, 4))
    variables = jax.eval_shape(declared.init, jax.random.key(1), IMAGES)
    chex.assert_equal(declared.activation_shape(variables, IMAGES, "mix"), (2, 4, 4, WIDTH))
    with pytest.raises(ValueError, match=r"outputs 17 tokens \(B, 17, 8\), fewer than the 25 patch tokens of the "
                                         r"declared token_grid=\(5, 5\)"):
        LinenSplitModel(GlobalToken(), IMAGES[:1], token_grid=(5, 5)).check_layer("mix")
    contradicted = LinenSplitModel(ViT(), IMAGES[:1], token_grid=(2, 8))
    with pytest.raises(ValueError, match=r"traced from the images, is 4x4 after 1 prefix tokens, but "
                                         r"token_grid=\(2, 8\) was declared; declare token_grid=\(4, 4\) or none"):
        contradicted.check_layer("block0")
    with pytest.raises(ValueError, match=r"token_grid must be \(h, w\)"):
        LinenSplitModel(ViT(), IMAGES[:1], token_grid=(4,))


class TupleBlock(nn.Module):
    """Returns ``(x, attention weights (B,heads,T,T), intermediates)``, as big_vision's blocks return ``(x, out)``."""

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(WIDTH, name="fc")(x)
        weights = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", y, x)[:, None], axis=-1)
        return x + y, weights, {"fc": y}


class ExtrasViT(nn.Module):
    """Returns ``(logits, extras)`` as big_vision's ViT does."""

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(WIDTH, (2, 2), strides=2, padding="VALID", name="patches")(images)
        x, weights, _ = TupleBlock(name="block")(x.reshape(x.shape[0], 16, WIDTH))
        logits = nn.Dense(CLASSES, name="head")(jnp.mean(x, axis=1) + jnp.mean(weights, axis=(1, 2, 3))[:, None])
        return logits, {"weights": weights}


def test_a_block_that_returns_a_tuple_offers_its_token_sequence():
    split = LinenSplitModel(ExtrasViT(), IMAGES[:1], output=0)
    assert split.layers == ("patches", "block.fc", "block")
    variables = _variables(split)
    lin = split.linearize(variables, IMAGES, "block")
    perturbation = draws.normal(jax.random.key(2), (2, 4, 4, WIDTH))
    logits, _ = split.apply_perturbed(variables, IMAGES, {"block": perturbation})
    x = nn.Conv(WIDTH, (2, 2), strides=2, padding="VALID").apply({"params": variables["params"]["patches"]}, IMAGES)
    x, weights, _ = TupleBlock().apply({"params": variables["params"]["block"]}, x.reshape(2, 16, WIDTH))
    chex.assert_trees_all_close(lin.activations, x.reshape(2, 4, 4, WIDTH), atol=1e-6)
    x = x + perturbation.reshape(2, 16, WIDTH)  # the weights pass through unperturbed
    expected = nn.Dense(CLASSES).apply({"params": variables["params"]["head"]},
                                       jnp.mean(x, axis=1) + jnp.mean(weights, axis=(1, 2, 3))[:, None])
    chex.assert_trees_all_close(logits, expected, atol=1e-5)


class DictOutput(nn.Module):
    @nn.compact
    def __call__(self, images):
        x = nn.Conv(WIDTH, (3, 3), name="conv")(images)
        return {"logits": nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2))), "features": x}


def test_a_model_that_returns_more_than_logits_needs_an_output_selector():
    model = ExtrasViT()
    variables = _variables(LinenSplitModel(model, IMAGES[:1], output=0))
    with pytest.raises(ValueError, match=r"ExtrasViT returns a tuple of 2 \(array \(B,3\), dict\), not logits "
                                         r"\(B,K\); pass output=0"):
        as_split_model(model, IMAGES).apply(variables, IMAGES)
    logits = model.apply(variables, IMAGES)[0]
    for output in (0, lambda out: out[0]):
        chex.assert_trees_all_close(as_split_model(model, IMAGES, output=output).apply(variables, IMAGES)[0], logits)
    with pytest.raises(ValueError, match=r"output=1 picks a dict .* not logits \(B,K\)"):
        as_split_model(model, IMAGES, output=1).apply(variables, IMAGES)
    dict_model = DictOutput()
    with pytest.raises(ValueError, match=r"pass output='logits'"):
        as_split_model(dict_model, IMAGES).layers
    split = as_split_model(dict_model, IMAGES, output="logits")
    variables = _variables(split)
    chex.assert_trees_all_close(split.linearize(variables, IMAGES, "conv").logits,
                                dict_model.apply(variables, IMAGES)["logits"], atol=1e-6)
