"""Attention-based attributions of any transformer: attention rollout and its gradient-weighted form.

Both read the attention probabilities out of the model's eval-mode forward pass (the softmax units of its
propagation graph whose output is a square (tokens x tokens) matrix), so they need no access to model code and
work on linen, NNX and plain-function transformers alike. Attention probabilities are taken as laid out by flax,
``jax.nn.dot_product_attention`` and most implementations: the batch axis before the head axes, queries and keys
last, (B, heads, T, T); axes of size 1 are ignored.

- ``attention_rollout`` (Abnar & Zuidema, 2020): per block the head-averaged attention ``Abar`` with the residual
  connection as half of the flow, ``Ahat = (Abar + I) / 2`` (rows sum to 1), multiplied through the blocks,
  ``R = Ahat_L ... Ahat_1``. Class-independent.
- ``gradient_rollout`` (Chefer, Gur & Wolf, ICCV 2021, for self-attention): ``R = I``, then per block
  ``R = R + Abar_l R`` with ``Abar_l = mean over heads of max(dA_l * A_l, 0)``, ``dA_l`` the gradient of the target
  score ``sum_k t_k logit_k`` with respect to the block's attention probabilities. Class-specific.

The map is the row of the first prefix token (the class token) over the patch tokens when the model has prefix
tokens, else the mean over all rows (minus the identity for ``gradient_rollout``), reshaped to the (B,h,w) patch
grid. The prefix count and grid come from the model's token layers (``SplitModel.describe_layers``), or are passed.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from attrjax.attribution._gradcam import Target, target_weights
from attrjax.attribution._graph import Softmax
from attrjax.attribution._propagation import propagation_graph
from attrjax.models import ModelLike, as_split_model


def _per_image(attention: jax.Array, batch: int) -> jax.Array:
    """(..., B, ..., T, T) attention probabilities -> (B, T, T), averaged over every other axis (heads, axes of size
    1): the batch axis is the first axis of size ``batch`` before the last two."""
    tokens = attention.shape[-1]
    middle = list(attention.shape[:-2])
    if batch in middle:
        axis = middle.index(batch)
    elif batch == 1:
        axis = 0
    else:
        raise ValueError(f"attention probabilities of shape {attention.shape} have no batch axis of size {batch}")
    moved = jnp.moveaxis(attention, axis, 0).reshape(batch, -1, tokens, tokens)
    return jnp.mean(moved, axis=1)


def _tokens_layout(model: ModelLike, images: jax.Array, tokens: int, prefix_tokens: int | None,
                   grid: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
    """``(prefix tokens, (h, w))`` for ``tokens`` tokens: as passed, else from the model's token layers."""
    if grid is not None:
        prefix = tokens - grid[0] * grid[1] if prefix_tokens is None else prefix_tokens
        if prefix < 0 or prefix + grid[0] * grid[1] != tokens:
            raise ValueError(f"the attention covers {tokens} tokens, which are not prefix_tokens={prefix_tokens} + "
                             f"{grid[0]}x{grid[1]} patches; pass the model's grid and prefix count")
        return prefix, grid
    layouts = {(row.prefix_tokens, row.grid) for row in as_split_model(model, images).describe_layers(images)
               if row.kind == "tokens" and row.prefix_tokens + row.grid[0] * row.grid[1] == tokens}
    if len(layouts) != 1:
        found = "no token layer" if not layouts else f"several layouts {sorted(layouts)}"
        raise ValueError(f"cannot tell which of the attention's {tokens} tokens form the patch grid ({found} with "
                         f"{tokens} tokens); pass grid=(h, w) and prefix_tokens=")
    ((prefix, found_grid),) = layouts
    if prefix_tokens is not None and prefix_tokens != prefix:
        raise ValueError(f"prefix_tokens={prefix_tokens}, but the model's token layers have {prefix}")
    return prefix, found_grid


def _read_map(flow: jax.Array, prefix: int, grid: tuple[int, int]) -> jax.Array:
    """(B,T,T) token-to-token flow -> (B,h,w): the class token's row over the patches, or the mean row."""
    rows = flow[:, 0] if prefix > 0 else jnp.mean(flow, axis=1)
    return rows[:, prefix:].reshape(flow.shape[0], *grid)


def _attentions(model: ModelLike, variables: Mapping, images: jax.Array):
    """The graph, its values for ``images`` and the attention nodes; raises if the model has no self-attention."""
    graph = propagation_graph(model, variables, images)
    values = graph.forward(images)
    nodes = [node for node in graph.nodes if isinstance(node, Softmax) and values[node.output].ndim >= 3
             and values[node.output].shape[-1] == values[node.output].shape[-2] > 1]
    if not nodes:
        raise ValueError("the model computes no self-attention (no softmax over a tokens x tokens matrix in its "
                         "forward pass); attention rollout needs a transformer")
    return graph, values, nodes


def attention_rollout(model: ModelLike, variables: Mapping, images: jax.Array, *, residual: float = 0.5,
                      prefix_tokens: int | None = None, grid: tuple[int, int] | None = None) -> jax.Array:
    """Attention rollout maps (B,h,w) of any transformer in eval mode (class-independent).

    Args:
      model: anything ``attrjax.models.as_split_model`` takes; variables: its variables.
      images: (B,S,S,3) normalised images.
      residual: the share of each block's flow that the residual connection carries (``Ahat = (1 - residual) Abar
        + residual I``); 0.5 as published.
      prefix_tokens, grid: the number of tokens before the patch grid and the grid (h, w); None: read from the
        model's token layers.

    Returns:
      (B,h,w) float32, each row of the rolled-out flow summing to 1 over all tokens.
    """
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must lie in [0, 1], got {residual}")
    images = images.astype(jnp.float32)
    _, values, nodes = _attentions(model, variables, images)
    batch = images.shape[0]
    tokens = values[nodes[0].output].shape[-1]
    prefix, grid = _tokens_layout(model, images, tokens, prefix_tokens, grid)
    identity = jnp.eye(tokens, dtype=jnp.float32)
    flow = jnp.broadcast_to(identity, (batch, tokens, tokens))
    for node in nodes:
        mixed = (1.0 - residual) * _per_image(values[node.output], batch) + residual * identity
        mixed = mixed / jnp.sum(mixed, axis=-1, keepdims=True)
        flow = mixed @ flow
    return _read_map(flow, prefix, grid)


def gradient_rollout(model: ModelLike, variables: Mapping, images: jax.Array, target: Target, *,
                     prefix_tokens: int | None = None, grid: tuple[int, int] | None = None) -> jax.Array:
    """Gradient-weighted attention rollout maps (B,h,w) of any transformer in eval mode.

    Args:
      model, variables, images: as ``attention_rollout``.
      target: (B,) int classes, (B,K) weights or a callable of the logits (``target_weights``); the gradients are
        those of ``sum_k t_k logit_k``.
      prefix_tokens, grid: as ``attention_rollout``.

    Returns:
      (B,h,w) float32, non-negative.
    """
    images = images.astype(jnp.float32)
    graph, values, nodes = _attentions(model, variables, images)
    batch = images.shape[0]
    tokens = values[nodes[0].output].shape[-1]
    prefix, grid = _tokens_layout(model, images, tokens, prefix_tokens, grid)
    zeros = {node.output: jnp.zeros_like(values[node.output]) for node in nodes}
    logits, vjp_fn = jax.vjp(lambda perturbations: graph.forward(images, perturbations)[graph.output], zeros)
    gradients = vjp_fn(target_weights(target, logits))[0]
    identity = jnp.eye(tokens, dtype=jnp.float32)
    flow = jnp.broadcast_to(identity, (batch, tokens, tokens))
    for node in nodes:
        weighted = jnp.maximum(gradients[node.output] * values[node.output], 0.0)
        flow = flow + _per_image(weighted, batch) @ flow
    return _read_map(flow if prefix > 0 else flow - identity, prefix, grid)


__all__ = ["attention_rollout", "gradient_rollout"]
