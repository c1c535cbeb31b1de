"""Tiny Vision Transformers written in the idioms of the code people actually run, for tests of attribution on
transformers.

Four families, each small enough for a CPU test (16 px images, 4 px patches -> 16 patch tokens, width 16, 2 blocks,
2 heads, 3 classes) and seeded, so that every ``make_*`` helper returns the same weights and images each time:

* :class:`BigVisionViT` (flax.linen) keeps big_vision's conventions (``big_vision/models/vit.py``): blocks named
  ``Transformer/encoderblock_{i}``, an ``Encoder1DBlock`` that returns a tuple ``(x, out)`` of its output and a dict
  of intermediates, ``MlpBlock``, ``nn.MultiHeadDotProductAttention``, a learned ``pos_embedding``, ``pool_type``
  ``'tok'`` (a zero-initialised ``cls`` parameter) or ``'gap'``, a ``head`` initialised to zeros by default
  (``head_zeroinit=True``, which the fixture turns off: a zero head gives zero logits and zero relevance), the
  tanh-approximated ``nn.gelu``, and ``__call__(image, *, train=False)`` returning a TUPLE ``(logits, out)``.
  Dropout runs with ``deterministic=not train``.
* :class:`NNXViT` (flax.nnx) keeps the Flax NNX ViT example's conventions (``docs_nnx/examples/vit_training``):
  a config dataclass, ``rngs: nnx.Rngs`` at construction, an ``nnx.Conv`` patch embedding, ``cls_token`` and
  ``position_embeddings`` as ``nnx.Param``, an ``nnx.Sequential`` of encoder blocks (``norm1``, ``mha``,
  ``norm2``, ``mlp_up_proj``, ``mlp_down_proj``, ``mlp_drop``), ``final_norm`` and ``classifier``, pooling the class
  token; it returns the logits. The mode is a module attribute, not a call argument: the modules are built
  ``deterministic=False`` (training) and ``nnx.view(model, deterministic=True)`` gives the evaluation view (the
  fixture returns that view).
* :class:`HFStyleViT` (flax.linen, ``setup``-style) keeps HF transformers' ``FlaxViTForImageClassificationModule``
  conventions: a config object, parameters under ``vit/embeddings/{cls_token, position_embeddings,
  patch_embeddings/projection}``, ``vit/encoder/layer/{0,1,...}`` (blocks named by their index as a string), each
  with ``layernorm_before``, ``attention/attention/{query,key,value}``, ``attention/output/dense``,
  ``layernorm_after``, ``intermediate/dense`` and ``output/dense`` (the MLP's residual add happens INSIDE
  ``output``), ``vit/layernorm`` and ``classifier`` on the class token. Attention weights come from
  ``flax.linen.attention.dot_product_attention_weights`` and are applied with an einsum. The second positional
  argument ``deterministic: bool = True`` switches dropout. It takes NHWC pixels (HF's wrapper class transposes
  NCHW to NHWC before it calls the module; this fixture is the module). It returns a plain ``dict`` with
  ``"logits"`` (and ``"attentions"``, a tuple of (B, heads, Tq, Tk) arrays, when ``output_attentions=True``).
  LayerNorm epsilon is HF's 1e-12 and the activation the exact (erf) GELU.
* :func:`plain_vit_init` / :func:`plain_vit_apply`: a ViT as plain ``jax.numpy`` functions (patchify by
  reshape/transpose and a matmul, hand-written LayerNorm, ``jax.nn.softmax``, exact GELU). With ``biases=False``,
  no class token and ``pool='gap'`` it is exactly the model of ``tests/transformer_reference.py`` (whose
  ``numpy_forward`` computes the same thing in float64).

All attention weights here are laid out (B, heads, Tq, Tk), rows (queries) summing to 1 over keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMAGE_SIZE = 16
PATCH = 4
WIDTH = 16
DEPTH = 2
HEADS = 2
MLP = 32
NUM_CLASSES = 3
BATCH = 2


def example_images(rng, batch: int = BATCH, image_size: int = IMAGE_SIZE, channels: int = 3):
    """Seeded NHWC float32 images, standard normal."""
    return jax.random.normal(rng, (batch, image_size, image_size, channels), jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# big_vision style (flax.linen, nn.compact)
# ---------------------------------------------------------------------------------------------------------------

class MlpBlock(nn.Module):
    """big_vision's feed-forward block: Dense -> gelu (tanh approximation, flax's default) -> Dropout -> Dense."""
    mlp_dim: Optional[int] = None  # None: 4 x the input width
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic=True):
        width = x.shape[-1]
        kw = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(stddev=1e-6))
        h = nn.Dense(self.mlp_dim or 4 * width, **kw)(x)
        h = nn.gelu(h)
        h = nn.Dropout(rate=self.dropout)(h, deterministic)
        return nn.Dense(width, **kw)(h)


class Encoder1DBlock(nn.Module):
    """Pre-LN block: ``x + sa(LN(x))`` then ``x + mlp(LN(x))``. Returns ``(x, out)``, ``out`` holding the
    intermediates under big_vision's keys ``sa``, ``+sa``, ``mlp``, ``+mlp``."""
    mlp_dim: Optional[int] = None
    num_heads: int = 2
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic=True):
        out = {}
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))  # a no-op without a mesh
        y = nn.LayerNorm()(x)
        y = out["sa"] = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
            deterministic=deterministic)(y, y)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = out["+sa"] = x + y
        y = nn.LayerNorm()(x)
        y = out["mlp"] = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout)(y, deterministic)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = out["+mlp"] = x + y
        return x, out


class Encoder(nn.Module):
    """A stack of ``encoderblock_{i}`` and a final ``encoder_norm``; returns ``(normed, out)``."""
    depth: int
    mlp_dim: Optional[int] = None
    num_heads: int = 2
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic=True):
        out = {}
        for i in range(self.depth):
            block = Encoder1DBlock(name=f"encoderblock_{i}", mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                                   dropout=self.dropout)
            x, out[f"block{i:02d}"] = block(x, deterministic)
        out["pre_ln"] = x
        return nn.LayerNorm(name="encoder_norm")(x), out


class BigVisionViT(nn.Module):
    """big_vision-style ViT. ``__call__(image, *, train=False) -> (logits, out)``."""
    num_classes: Optional[int] = NUM_CLASSES
    patch_size: Sequence[int] = (PATCH, PATCH)
    width: int = WIDTH
    depth: int = DEPTH
    mlp_dim: Optional[int] = MLP
    num_heads: int = HEADS
    dropout: float = 0.0
    pool_type: str = "gap"  # or "tok"
    head_zeroinit: bool = True

    @nn.compact
    def __call__(self, image, *, train=False):
        out = {}
        x = out["stem"] = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size),
                                  padding="VALID", name="embedding")(jnp.asarray(image, jnp.float32))
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))
        posemb = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, h * w, c))
        x = out["with_posemb"] = x + posemb
        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        x, out["encoder"] = Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                                    dropout=self.dropout, name="Transformer")(x, deterministic=not train)
        out["encoded"] = x
        if self.pool_type == "gap":
            x = out["head_input"] = jnp.mean(x, axis=1)
        elif self.pool_type == "tok":
            x = out["head_input"] = x[:, 0]
        else:
            raise ValueError(f"unknown pool_type {self.pool_type!r}")
        out["pre_logits"] = x
        if self.num_classes:
            kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
            x = out["logits"] = nn.Dense(self.num_classes, name="head", **kw)(x)
        return x, out


def make_bigvision_vit(rng, *, pool_type: str = "tok", dropout: float = 0.1):
    """``(model, variables, images)``; eval: ``model.apply(variables, images)[0]`` (a tuple comes back), train:
    ``model.apply(variables, images, train=True, rngs={'dropout': key})``."""
    init_rng, data_rng = jax.random.split(rng)
    model = BigVisionViT(pool_type=pool_type, dropout=dropout, head_zeroinit=False)
    images = example_images(data_rng)
    variables = model.init(init_rng, images)
    return model, variables, images


# ---------------------------------------------------------------------------------------------------------------
# Flax NNX style
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NNXViTConfig:
    num_classes: int = NUM_CLASSES
    in_channels: int = 3
    img_size: int = IMAGE_SIZE
    patch_size: int = PATCH
    num_layers: int = DEPTH
    num_heads: int = HEADS
    mlp_dim: int = MLP
    hidden_size: int = WIDTH
    dropout_rate: float = 0.1


class NNXEncoderBlock(nnx.Module):
    """Pre-LN block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, config: NNXViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(config.hidden_size, rngs=rngs)
        self.mha = nnx.MultiHeadAttention(num_heads=config.num_heads, in_features=config.hidden_size,
                                          dropout_rate=config.dropout_rate, broadcast_dropout=False, decode=False,
                                          deterministic=False, keep_rngs=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(config.hidden_size, rngs=rngs)
        self.mlp_up_proj = nnx.Linear(config.hidden_size, config.mlp_dim, rngs=rngs)
        self.mlp_down_proj = nnx.Linear(config.mlp_dim, config.hidden_size, rngs=rngs)
        self.mlp_drop = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def attn(self, x, rngs: nnx.Rngs | None = None):
        return self.mha(x, rngs=rngs)

    def mlp(self, x, rngs: nnx.Rngs | None = None):
        x = nnx.gelu(self.mlp_up_proj(x))
        x = self.mlp_drop(x, rngs=rngs)
        return self.mlp_drop(self.mlp_down_proj(x), rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs | None = None):
        x = x + self.attn(self.norm1(x), rngs=rngs)
        return x + self.mlp(self.norm2(x), rngs=rngs)


class NNXViT(nnx.Module):
    """NNX ViT: conv patches, class token, learned position embeddings, encoder, final norm, class-token head."""

    def __init__(self, config: NNXViTConfig = NNXViTConfig(), *, rngs: nnx.Rngs):
        n_patches = (config.img_size // config.patch_size) ** 2
        p = config.patch_size
        self.patch_embeddings = nnx.Conv(config.in_channels, config.hidden_size, kernel_size=(p, p),
                                         strides=(p, p), padding="VALID", use_bias=True, rngs=rngs)
        init = jax.nn.initializers.truncated_normal(stddev=0.02)
        self.position_embeddings = nnx.Param(init(rngs.params(), (1, n_patches + 1, config.hidden_size)))
        self.dropout = nnx.Dropout(config.dropout_rate)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, config.hidden_size)))
        self.encoder = nnx.Sequential(*[NNXEncoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.LayerNorm(config.hidden_size, rngs=rngs)
        self.classifier = nnx.Linear(config.hidden_size, config.num_classes, rngs=rngs)
        self.config = config

    def embed(self, x):
        patches = self.patch_embeddings(x)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.tile(self.cls_token[...], (b, 1, 1))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embeddings[...]

    def __call__(self, x, rngs: nnx.Rngs | None = None):
        x = self.dropout(self.embed(x), rngs=rngs)
        x = self.encoder(x, rngs=rngs)
        x = self.final_norm(x)
        return self.classifier(x[:, 0])


def make_nnx_vit(rng):
    """``(model, state, images)``: ``model`` is the evaluation view ``nnx.view(module, deterministic=True)`` (call
    ``model(images)``), ``state`` its ``nnx.Param`` state (``nnx.state(model, nnx.Param)``). The training-mode module
    is ``nnx.view(model, deterministic=False)``, called as ``model(images, rngs=nnx.Rngs(dropout=key))``."""
    init_rng, data_rng = jax.random.split(rng)
    module = NNXViT(NNXViTConfig(), rngs=nnx.Rngs(params=init_rng, dropout=jax.random.fold_in(init_rng, 1)))
    # The class token and position embeddings start at zero / 0.02 in the example; give them some size so that a
    # test notices what flows through them.
    draw = np.random.default_rng(_seed_of(init_rng))
    module.cls_token[...] = jnp.asarray(0.5 * draw.standard_normal(module.cls_token[...].shape), jnp.float32)
    module.position_embeddings[...] = jnp.asarray(
        0.5 * draw.standard_normal(module.position_embeddings[...].shape), jnp.float32)
    model = nnx.view(module, deterministic=True)
    return model, nnx.state(model, nnx.Param), example_images(data_rng)


# ---------------------------------------------------------------------------------------------------------------
# HF transformers FlaxViT style (flax.linen, setup())
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HFViTConfig:
    hidden_size: int = WIDTH
    num_hidden_layers: int = DEPTH
    num_attention_heads: int = HEADS
    intermediate_size: int = MLP
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH
    num_channels: int = 3
    qkv_bias: bool = True
    num_labels: int = NUM_CLASSES


def _hf_dense(config, features, **kw):
    return nn.Dense(features, kernel_init=jax.nn.initializers.normal(config.initializer_range), **kw)


class HFPatchEmbeddings(nn.Module):
    config: HFViTConfig

    def setup(self):
        p = self.config.patch_size
        self.projection = nn.Conv(self.config.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID",
                                  kernel_init=jax.nn.initializers.normal(self.config.initializer_range))

    def __call__(self, pixel_values):
        x = self.projection(pixel_values)
        return jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))


class HFViTEmbeddings(nn.Module):
    """Class token + patch embeddings, plus position embeddings, then dropout."""
    config: HFViTConfig

    def setup(self):
        c = self.config
        n_patches = (c.image_size // c.patch_size) ** 2
        self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, c.hidden_size))
        self.patch_embeddings = HFPatchEmbeddings(c)
        self.position_embeddings = self.param("position_embeddings", nn.initializers.zeros,
                                              (1, n_patches + 1, c.hidden_size))
        self.dropout = nn.Dropout(rate=c.hidden_dropout_prob)

    def __call__(self, pixel_values, deterministic=True):
        b = pixel_values.shape[0]
        emb = self.patch_embeddings(pixel_values)
        cls = jnp.broadcast_to(self.cls_token, (b, 1, self.config.hidden_size))
        emb = jnp.concatenate((cls, emb), axis=1) + self.position_embeddings
        return self.dropout(emb, deterministic=deterministic)


class HFViTSelfAttention(nn.Module):
    config: HFViTConfig

    def setup(self):
        c = self.config
        self.query = _hf_dense(c, c.hidden_size, use_bias=c.qkv_bias)
        self.key = _hf_dense(c, c.hidden_size, use_bias=c.qkv_bias)
        self.value = _hf_dense(c, c.hidden_size, use_bias=c.qkv_bias)

    def __call__(self, hidden_states, deterministic: bool = True, output_attentions: bool = False):
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        split = hidden_states.shape[:2] + (c.num_attention_heads, head_dim)
        q = self.query(hidden_states).reshape(split)
        k = self.key(hidden_states).reshape(split)
        v = self.value(hidden_states).reshape(split)
        dropout_rng = None
        if not deterministic and c.attention_probs_dropout_prob > 0.0:
            dropout_rng = self.make_rng("dropout")
        weights = nn.attention.dot_product_attention_weights(
            q, k, dropout_rng=dropout_rng, dropout_rate=c.attention_probs_dropout_prob, broadcast_dropout=True,
            deterministic=deterministic)  # (B, heads, Tq, Tk)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        out = out.reshape(out.shape[:2] + (-1,))
        return (out, weights) if output_attentions else (out,)


class HFViTSelfOutput(nn.Module):
    config: HFViTConfig

    def setup(self):
        self.dense = _hf_dense(self.config, self.config.hidden_size)
        self.dropout = nn.Dropout(rate=self.config.hidden_dropout_prob)

    def __call__(self, hidden_states, input_tensor, deterministic: bool = True):
        return self.dropout(self.dense(hidden_states), deterministic=deterministic)


class HFViTAttention(nn.Module):
    config: HFViTConfig

    def setup(self):
        self.attention = HFViTSelfAttention(self.config)
        self.output = HFViTSelfOutput(self.config)

    def __call__(self, hidden_states, deterministic=True, output_attentions: bool = False):
        outs = self.attention(hidden_states, deterministic=deterministic, output_attentions=output_attentions)
        hidden = self.output(outs[0], hidden_states, deterministic=deterministic)
        return (hidden,) + outs[1:]


class HFViTIntermediate(nn.Module):
    config: HFViTConfig

    def setup(self):
        self.dense = _hf_dense(self.config, self.config.intermediate_size)

    def __call__(self, hidden_states):
        return nn.gelu(self.dense(hidden_states), approximate=False)


class HFViTOutput(nn.Module):
    """The MLP's second dense layer, dropout and the residual add."""
    config: HFViTConfig

    def setup(self):
        self.dense = _hf_dense(self.config, self.config.hidden_size)
        self.dropout = nn.Dropout(rate=self.config.hidden_dropout_prob)

    def __call__(self, hidden_states, attention_output, deterministic: bool = True):
        hidden = self.dropout(self.dense(hidden_states), deterministic=deterministic)
        return hidden + attention_output


class HFViTLayer(nn.Module):
    config: HFViTConfig

    def setup(self):
        c = self.config
        self.attention = HFViTAttention(c)
        self.intermediate = HFViTIntermediate(c)
        self.output = HFViTOutput(c)
        self.layernorm_before = nn.LayerNorm(epsilon=c.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(epsilon=c.layer_norm_eps)

    def __call__(self, hidden_states, deterministic: bool = True, output_attentions: bool = False):
        outs = self.attention(self.layernorm_before(hidden_states), deterministic=deterministic,
                              output_attentions=output_attentions)
        attention_output = outs[0] + hidden_states
        hidden = self.intermediate(self.layernorm_after(attention_output))
        hidden = self.output(hidden, attention_output, deterministic=deterministic)
        return (hidden,) + outs[1:]


class HFViTLayerCollection(nn.Module):
    config: HFViTConfig

    def setup(self):
        self.layers = [HFViTLayer(self.config, name=str(i)) for i in range(self.config.num_hidden_layers)]

    def __call__(self, hidden_states, deterministic: bool = True, output_attentions: bool = False):
        attentions = ()
        for layer in self.layers:
            outs = layer(hidden_states, deterministic=deterministic, output_attentions=output_attentions)
            hidden_states = outs[0]
            attentions += outs[1:]
        return hidden_states, attentions


class HFViTEncoder(nn.Module):
    config: HFViTConfig

    def setup(self):
        self.layer = HFViTLayerCollection(self.config)

    def __call__(self, hidden_states, deterministic: bool = True, output_attentions: bool = False):
        return self.layer(hidden_states, deterministic=deterministic, output_attentions=output_attentions)


class HFViTModule(nn.Module):
    config: HFViTConfig

    def setup(self):
        self.embeddings = HFViTEmbeddings(self.config)
        self.encoder = HFViTEncoder(self.config)
        self.layernorm = nn.LayerNorm(epsilon=self.config.layer_norm_eps)

    def __call__(self, pixel_values, deterministic: bool = True, output_attentions: bool = False):
        hidden = self.embeddings(pixel_values, deterministic=deterministic)
        hidden, attentions = self.encoder(hidden, deterministic=deterministic, output_attentions=output_attentions)
        return self.layernorm(hidden), attentions


class HFStyleViT(nn.Module):
    """HF-style image classifier: ``__call__(pixel_values, deterministic=True, output_attentions=False)`` returns a
    ``dict`` with ``"logits"`` (and ``"attentions"`` when asked). Pixels are NHWC."""
    config: HFViTConfig = HFViTConfig()

    def setup(self):
        self.vit = HFViTModule(self.config)
        self.classifier = _hf_dense(self.config, self.config.num_labels)

    def __call__(self, pixel_values, deterministic: bool = True, output_attentions: bool = False):
        hidden, attentions = self.vit(pixel_values, deterministic=deterministic, output_attentions=output_attentions)
        out = {"logits": self.classifier(hidden[:, 0, :])}
        if output_attentions:
            out["attentions"] = attentions
        return out


def make_hf_vit(rng, *, dropout: float = 0.1):
    """``(model, variables, images)``; eval: ``model.apply(variables, images)["logits"]`` (``deterministic=True`` is
    the default), train: ``model.apply(variables, images, deterministic=False, rngs={'dropout': key})``.
    ``initializer_range`` is 0.3 instead of HF's 0.02, and the zero-initialised class token and position embeddings
    are drawn at random, so that the tiny untrained model's logits and attention are not nearly constant."""
    init_rng, data_rng = jax.random.split(rng)
    config = HFViTConfig(initializer_range=0.3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = HFStyleViT(config)
    images = example_images(data_rng)
    variables = model.init(init_rng, images)
    emb = dict(variables["params"]["vit"]["embeddings"])
    draw = np.random.default_rng(_seed_of(init_rng))
    for name in ("cls_token", "position_embeddings"):
        emb[name] = jnp.asarray(0.5 * draw.standard_normal(emb[name].shape), jnp.float32)
    params = dict(variables["params"])
    params["vit"] = {**params["vit"], "embeddings": emb}
    return model, {"params": params}, images


# ---------------------------------------------------------------------------------------------------------------
# Plain jax.numpy functions
# ---------------------------------------------------------------------------------------------------------------

@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PlainViTConfig:
    """The static part of a plain ViT's parameters, kept in ``params["config"]`` (a pytree node with no leaves, so
    ``jax.grad``/``jax.jit``/``jax.tree.map`` over the parameters see only arrays)."""
    image_size: int
    patch: int
    channels: int
    heads: int
    pool: str  # "gap" (mean over all tokens) or "tok" (token 0, needs cls_token)
    cls_token: bool
    biases: bool
    posemb: bool
    eps: float = 1e-6


def _seed_of(rng):
    """A NumPy seed from a JAX key (a typed key or a raw uint32 ``PRNGKey``), without running a JAX program."""
    if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.asarray(rng).astype(np.uint64).ravel().tolist()


def plain_vit_init(rng, *, image_size=IMAGE_SIZE, patch=PATCH, width=WIDTH, depth=DEPTH, heads=HEADS, mlp=MLP,
                   num_classes=NUM_CLASSES, pool="gap", cls_token=False, biases=False, posemb=None, channels=3):
    """Parameters of a plain-function ViT (float32).

    Layout: ``embedding/kernel`` (patch*patch*channels, width) for patch vectors ordered (dy, dx, channel);
    optional ``cls`` (1, 1, width) and ``pos_embedding`` (1, tokens, width); ``blocks``: a list of
    ``{ln1: {scale}, attn: {query, key, value: {kernel (width, heads, head_dim)}, out: {kernel (heads, head_dim,
    width)}}, ln2: {scale}, mlp: {fc1: {kernel (width, mlp)}, fc2: {kernel (mlp, width)}}}``; ``final_ln``,
    ``head: {kernel (width, num_classes)}``; every layer gets a ``bias`` (LayerNorms: a shift) when ``biases``.
    ``posemb`` defaults to ``biases`` (a position embedding is an additive constant, i.e. a bias of the tokens).
    The LayerNorm scales are drawn around 1 (not exactly 1) so that a rule that drops a scale shows.
    """
    if pool not in ("gap", "tok"):
        raise ValueError(f"pool must be 'gap' or 'tok', not {pool!r}")
    if pool == "tok" and not cls_token:
        raise ValueError("pool='tok' needs cls_token=True")
    if width % heads:
        raise ValueError("width must be a multiple of heads")
    posemb = biases if posemb is None else posemb
    head_dim = width // heads
    tokens = (image_size // patch) ** 2 + int(cls_token)
    draw = np.random.default_rng(_seed_of(rng))  # NumPy draws: one jax.random program per shape costs seconds

    def normal(shape, std):
        return jnp.asarray(std * draw.standard_normal(shape), jnp.float32)

    def dense(kernel_shape, fan_in, bias_shape):
        layer = {"kernel": normal(kernel_shape, 1.0 / math.sqrt(fan_in))}
        if biases:
            layer["bias"] = normal(bias_shape, 0.1)
        return layer

    def norm():
        layer = {"scale": 1.0 + normal((width,), 0.2)}
        if biases:
            layer["bias"] = normal((width,), 0.1)
        return layer

    params: dict[str, Any] = {
        "config": PlainViTConfig(image_size=image_size, patch=patch, channels=channels, heads=heads, pool=pool,
                                 cls_token=cls_token, biases=biases, posemb=posemb),
        "embedding": dense((patch * patch * channels, width), patch * patch * channels, (width,)),
    }
    if cls_token:
        params["cls"] = normal((1, 1, width), 0.5)
    if posemb:
        params["pos_embedding"] = normal((1, tokens, width), 0.5)
    params["blocks"] = [{
        "ln1": norm(),
        "attn": {name: dense((width, heads, head_dim), width, (heads, head_dim))
                 for name in ("query", "key", "value")} | {"out": dense((heads, head_dim, width), width, (width,))},
        "ln2": norm(),
        "mlp": {"fc1": dense((width, mlp), width, (mlp,)), "fc2": dense((mlp, width), mlp, (width,))},
    } for _ in range(depth)]
    params["final_ln"] = norm()
    params["head"] = dense((width, num_classes), width, (num_classes,))
    return params


def plain_patchify(images, patch):
    """(B, S, S, C) -> (B, (S/p)**2, p*p*C): patches row-major over (patch row, patch col), each patch vector
    ordered (dy, dx, channel)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def _plain_layer_norm(x, p, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) / jnp.sqrt(var + eps) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def _plain_dense(x, p, spec):
    y = jnp.einsum(spec, x, p["kernel"])
    return y + p["bias"] if "bias" in p else y


def plain_vit_apply(params, images, *, return_attention=False, attention_offsets=None):
    """Logits (B, num_classes) of the plain ViT.

    ``return_attention=True``: returns ``(logits, [A_l])``, each ``A_l`` (B, heads, T, T) the softmax output of
    block l (rows: queries). ``attention_offsets``: an optional list of arrays (B, heads, T, T) added to each
    block's attention probabilities after the softmax (zeros leave the model unchanged; the gradient of a logit with
    respect to zero offsets is its gradient with respect to the attention probabilities).
    """
    cfg = params["config"]
    images = jnp.asarray(images, jnp.float32)
    x = _plain_dense(plain_patchify(images, cfg.patch), params["embedding"], "bnk,kd->bnd")
    b = x.shape[0]
    if cfg.cls_token:
        x = jnp.concatenate([jnp.broadcast_to(params["cls"], (b, 1, x.shape[-1])), x], axis=1)
    if cfg.posemb:
        x = x + params["pos_embedding"]
    attentions = []
    for i, block in enumerate(params["blocks"]):
        y = _plain_layer_norm(x, block["ln1"], cfg.eps)
        q = _plain_dense(y, block["attn"]["query"], "btd,dhe->bthe")
        k = _plain_dense(y, block["attn"]["key"], "btd,dhe->bthe")
        v = _plain_dense(y, block["attn"]["value"], "btd,dhe->bthe")
        scores = jnp.einsum("bqhe,bkhe->bhqk", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
        a = jax.nn.softmax(scores, axis=-1)
        if attention_offsets is not None:
            a = a + attention_offsets[i]
        attentions.append(a)
        o = jnp.einsum("bhqk,bkhe->bqhe", a, v)
        x = x + _plain_dense(o, block["attn"]["out"], "bqhe,hed->bqd")
        y = _plain_layer_norm(x, block["ln2"], cfg.eps)
        h = jax.nn.gelu(_plain_dense(y, block["mlp"]["fc1"], "btd,dm->btm"), approximate=False)
        x = x + _plain_dense(h, block["mlp"]["fc2"], "btm,md->btd")
    x = _plain_layer_norm(x, params["final_ln"], cfg.eps)
    pooled = jnp.mean(x, axis=1) if cfg.pool == "gap" else x[:, 0]
    logits = _plain_dense(pooled, params["head"], "bd,dc->bc")
    return (logits, attentions) if return_attention else logits


def plain_vit_attentions(params, images):
    """The attention probabilities of each block, a list of (B, heads, T, T) arrays."""
    return plain_vit_apply(params, images, return_attention=True)[1]


def make_plain_vit(rng, **kwargs):
    """``(plain_vit_apply, params, images)`` for the bias-free reference ViT of ``transformer_reference`` (no class
    token, no position embedding, mean pooling); ``kwargs`` override :func:`plain_vit_init`'s arguments."""
    init_rng, data_rng = jax.random.split(rng)
    params = plain_vit_init(init_rng, **kwargs)
    cfg = params["config"]
    return plain_vit_apply, params, example_images(data_rng, image_size=cfg.image_size, channels=cfg.channels)
