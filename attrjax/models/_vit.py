"""The Vision Transformer (Dosovitskiy et al., 2021) as a plain Flax linen module.

Architecture (images NHWC, float; D = ``width``, H = ``num_heads``, T tokens):

- ``embedding``: a ``patch`` x ``patch`` conv with stride ``patch`` (no padding) cuts the image into a G x G grid of
  patch vectors (G = ``image_size // patch``), flattened row-major into G*G tokens; with ``pool="token"`` a learned
  class token is prepended (T = G*G + 1), with ``pool="gap"`` there is none (T = G*G); then a learned position
  embedding (1, T, D) is added.
- ``block0`` ... ``block{depth-1}``: pre-LayerNorm encoder blocks, ``x + Attention(LayerNorm(x))`` then
  ``x + MLP(LayerNorm(x))``; multi-head self-attention with softmax(Q Kᵀ / sqrt(D/H)) V and an output projection,
  the MLP Dense(``mlp_dim``) -> GELU -> Dense(D). GELU is the exact (erf) one unless ``approximate_gelu``.
- ``norm``: a final LayerNorm over every token, then the class token (``"token"``) or the mean of all tokens
  (``"gap"``) goes through the linear ``head``.

Dropout (``dropout``, 0 by default) follows the embedding, the attention output and both MLP layers; it is on when
``__call__`` gets ``train=True`` (draws from the ``"dropout"`` rng collection).

Split points: the embedding and every block are submodules whose ``__call__`` returns the tokens (B, T, D), at the
module paths ``vit_layer_names`` lists (``"embedding"``, ``"block0"``, ...). Inside a block: ``norm1``, ``query``,
``key``, ``value`` (DenseGeneral D -> (H, D/H)), ``out`` (DenseGeneral (H, D/H) -> D), ``norm2``, ``fc1``, ``fc2``.
Pretrained weights (timm, torchvision, Hugging Face, big_vision) import with ``import_vit``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

POOLS = ("token", "gap")

_dense_init = nn.initializers.xavier_uniform()
_position_init = nn.initializers.normal(stddev=0.02)


class PatchEmbedding(nn.Module):
    """Patches, class token and position embedding: images (B,S,S,C) -> tokens (B,T,D).

    Attributes:
      width: D, the token width.
      patch: side of a patch in pixels (the conv's kernel and stride).
      class_token: whether a learned class token is prepended (T = G*G + 1 instead of G*G).
      dtype: computation dtype (parameters stay float32).
    """

    width: int
    patch: int
    class_token: bool
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        patches = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                          dtype=self.dtype, kernel_init=nn.initializers.lecun_normal(), name="patches")(images)
        batch, rows, columns, width = patches.shape
        tokens = patches.reshape(batch, rows * columns, width)
        if self.class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
            tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(tokens.dtype), (batch, 1, width)), tokens], axis=1)
        position = self.param("pos_embedding", _position_init, (1, tokens.shape[1], width))
        return tokens + position.astype(tokens.dtype)


class EncoderBlock(nn.Module):
    """One pre-LayerNorm transformer block: tokens (B,T,D) -> (B,T,D).

    Attributes:
      num_heads: H; D must be a multiple of H (each head has D/H channels).
      mlp_dim: the MLP's hidden width.
      layer_norm_eps: epsilon of both LayerNorms.
      dropout: dropout rate after the attention output and after each MLP layer (on when ``train``).
      approximate_gelu: the tanh approximation of GELU (as the original JAX ViT code) instead of the exact one.
      dtype: computation dtype (parameters stay float32).
    """

    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    approximate_gelu: bool = False
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
        x = x + self._drop(self._self_attention(y), train)
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
        return x + self._drop(self._mlp(y, train), train)

    def _self_attention(self, x: jax.Array) -> jax.Array:
        """(B,T,D) -> (B,T,D): every head's softmax(q kᵀ / sqrt(D/H)) v, projected back to D by ``out``."""
        width = x.shape[-1]
        heads = (self.num_heads, width // self.num_heads)
        query, key, value = (nn.DenseGeneral(heads, dtype=self.dtype, kernel_init=_dense_init, name=name)(x)
                             for name in ("query", "key", "value"))  # each (B,T,H,D/H)
        logits = jnp.einsum("bqhc,bkhc->bhqk", query, key) / jnp.sqrt(heads[1]).astype(query.dtype)
        weights = jax.nn.softmax(logits, axis=-1)  # (B,H,T,T): each query's distribution over the keys
        mixed = jnp.einsum("bhqk,bkhc->bqhc", weights, value)
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, kernel_init=_dense_init, name="out")(mixed)

    def _mlp(self, x: jax.Array, train: bool) -> jax.Array:
        """(B,T,D) -> (B,T,D): Dense(mlp_dim) -> GELU -> dropout -> Dense(D)."""
        hidden = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_dense_init, name="fc1")(x)
        hidden = self._drop(nn.gelu(hidden, approximate=self.approximate_gelu), train)
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_dense_init, name="fc2")(hidden)

    def _drop(self, x: jax.Array, train: bool) -> jax.Array:
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class ViT(nn.Module):
    """Vision Transformer: images (B,S,S,3) float, S = ``image_size`` -> logits (B, num_classes).

    Attributes:
      num_classes: K, the logits' last axis.
      image_size: S, the side of the square images (a multiple of ``patch``); it fixes the position embedding's
        grid, G = S // patch.
      patch: side of a patch in pixels.
      width: D, the token width (a multiple of ``num_heads``).
      depth: number of encoder blocks.
      num_heads: attention heads per block.
      mlp_dim: hidden width of each block's MLP.
      pool: ``"token"`` (a class token is prepended and classified) or ``"gap"`` (no class token; the mean of the
        normalised tokens is classified).
      layer_norm_eps: epsilon of every LayerNorm (1e-6 as in the ViT paper, timm, torchvision and big_vision;
        Hugging Face ViT configs use 1e-12).
      dropout: dropout rate (see the module docstring); 0 turns it off.
      approximate_gelu: the tanh approximation of GELU, as the JAX ViT code (big_vision, the original release)
        trains with; False: the exact erf GELU of timm, torchvision and Hugging Face.
      dtype: computation dtype (parameters stay float32).
    """

    num_classes: int
    image_size: int = 224
    patch: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pool: str = "token"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    approximate_gelu: bool = False
    dtype: DTypeLike = jnp.float32

    @property
    def grid_size(self) -> int:
        """G: the patches per side (the tokens, besides the class token, form a G x G grid)."""
        return self.image_size // self.patch

    @property
    def num_tokens(self) -> int:
        """T: G*G patch tokens, plus the class token with ``pool="token"``."""
        return self.grid_size ** 2 + (self.pool == "token")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images (B,S,S,3) -> logits (B,K); ``train=True`` turns dropout on (pass ``rngs={"dropout": key}``
        when ``dropout > 0``)."""
        self._check_config()
        self._check_images(images)
        x = PatchEmbedding(self.width, self.patch, self.pool == "token", self.dtype, name="embedding")(images)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        for index in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dropout, self.approximate_gelu,
                             self.dtype, name=f"block{index}")(x, train)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(x)
        pooled = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_dense_init, name="head")(pooled)

    def _check_config(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        sizes = {"num_classes": self.num_classes, "image_size": self.image_size, "patch": self.patch,
                 "width": self.width, "depth": self.depth, "num_heads": self.num_heads, "mlp_dim": self.mlp_dim}
        not_positive = [f"{name}={value}" for name, value in sizes.items() if value < 1]
        if not_positive:
            raise ValueError(f"ViT sizes must be positive integers, got {', '.join(not_positive)}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch={self.patch}: the patches "
                             "must tile the image")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}: every head gets "
                             "width / num_heads channels")

    def _check_images(self, images: jax.Array):
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (batch, {self.image_size}, {self.image_size}, 3) in NHWC "
                             f"layout, got shape {tuple(images.shape)}; resize to image_size={self.image_size}, or "
                             "build the model for this size, and transpose NCHW arrays with (0, 2, 3, 1)")


def vit_layer_names(model: ViT) -> tuple[str, ...]:
    """The split points in forward order, as module paths: ``("embedding", "block0", ..., "block{depth-1}")``;
    each outputs tokens (B, T, D)."""
    return ("embedding",) + tuple(f"block{index}" for index in range(model.depth))


def vit_ti16(num_classes: int, *, image_size: int = 224, dtype: DTypeLike = jnp.float32) -> ViT:
    """ViT-Ti/16: width 192, depth 12, 3 heads, MLP 768, 16 px patches, class token (5.7M parameters at 1000
    classes)."""
    return ViT(num_classes=num_classes, image_size=image_size, patch=16, width=192, depth=12, num_heads=3,
               mlp_dim=768, dtype=dtype)


def vit_s16(num_classes: int, *, image_size: int = 224, dtype: DTypeLike = jnp.float32) -> ViT:
    """ViT-S/16: width 384, depth 12, 6 heads, MLP 1536, 16 px patches, class token (22.1M parameters at 1000
    classes)."""
    return ViT(num_classes=num_classes, image_size=image_size, patch=16, width=384, depth=12, num_heads=6,
               mlp_dim=1536, dtype=dtype)


def vit_b16(num_classes: int, *, image_size: int = 224, dtype: DTypeLike = jnp.float32) -> ViT:
    """ViT-B/16: width 768, depth 12, 12 heads, MLP 3072, 16 px patches, class token (86.6M parameters at 1000
    classes, as torchvision's ``vit_b_16``)."""
    return ViT(num_classes=num_classes, image_size=image_size, patch=16, width=768, depth=12, num_heads=12,
               mlp_dim=3072, dtype=dtype)


def vit_small(num_classes: int, *, pool: str = "gap", dropout: float = 0.0, dtype: DTypeLike = jnp.float32) -> ViT:
    """A laptop-scale ViT for 64 px images: 8 px patches (an 8x8 grid of 64 tokens), width 128, depth 4, 4 heads,
    MLP 256 (0.56M parameters).

    Global average pooling by default: every token then reaches the head directly, which trains faster from scratch
    on small data than a class token (as in big_vision's plain-ViT baselines); ``pool="token"`` adds one.
    """
    return ViT(num_classes=num_classes, image_size=64, patch=8, width=128, depth=4, num_heads=4, mlp_dim=256,
               pool=pool, dropout=dropout, dtype=dtype)


__all__ = ["POOLS", "EncoderBlock", "PatchEmbedding", "ViT", "vit_b16", "vit_layer_names", "vit_s16", "vit_small",
           "vit_ti16"]
