"""Attention-based attributions of any transformer: attention rollout and its gradient-weighted form.

Both read the attention probabilities out of the model's eval-mode forward pass (the softmax units of its
propagation graph whose output is a square (tokens x tokens) matrix), so they need no access to model code and
work on linen, NNX and plain-function transformers alike. Which axis of the probabilities is the batch, which are
the queries and keys (the last two) and which tokens are the patch grid is traced from the images through the
forward pass, as the layers' layouts are (``attrjax.models``); every other axis (heads) is averaged.

- ``attention_rollout`` (Abnar & Zuidema, 2020): per block the head-averaged attention ``Abar`` with the residual
  connection as half of the flow, ``Ahat = (Abar + I) / 2`` (rows sum to 1), multiplied through the blocks,
  ``R = Ahat_L ... Ahat_1``. Class-independent.
- ``gradient_rollout`` (Chefer, Gur & Wolf, ICCV 2021, for self-attention): ``R = I``, then per block
  ``R = R + Abar_l R`` with ``Abar_l = mean over heads of max(dA_l * A_l, 0)``, ``dA_l`` the gradient of the target
  score ``sum_k t_k logit_k`` with respect to the block's attention probabilities. Class-specific.

The map is the row of the first prefix token (the class token) over the patch tokens when the model has prefix
tokens, else the mean over all rows (minus the identity for ``gradient_rollout``), reshaped to the (B,h,w) patch
grid. The prefix count and grid are traced, or passed where they cannot be.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from attrjax.attribution._gradcam import Target, target_weights
from attrjax.attribution._graph import Graph, Softmax
from attrjax.attribution._propagation import propagation_graph
from attrjax.models import ModelLike
from attrjax.models._layout import BATCH, Axes, TokenGrid, describe, token_grid, traced_axes


class _Attention(NamedTuple):
    """Where a graph's attention probabilities are and how to read them."""

    node: Softmax
    value: jax.ShapeDtypeStruct  # the probabilities' shape and dtype
    batch_axis: int
    tokens: TokenGrid | None  # the tokens' layout, traced from the images; None where it could not be


def _attentions(model: ModelLike, variables: Mapping, images: jax.Array) -> tuple[Graph, list[_Attention]]:
    """The graph and its self-attention probabilities: the softmax outputs whose last two axes are tokens x tokens,
    the axes traced from the images (``attrjax.models``' layout tracing); raises if there are none. Nothing is
    computed."""
    graph = propagation_graph(model, variables, images)
    softmaxes = [node for node in graph.nodes if isinstance(node, Softmax)]
    shapes = dict(zip(softmaxes, jax.eval_shape(lambda x: [graph.forward(x)[node.output] for node in softmaxes],
                                                images)))
    nodes = [node for node, value in shapes.items() if value.ndim >= 3 and value.shape[-1] == value.shape[-2] > 1]
    if not nodes:
        raise ValueError("the model computes no self-attention (no softmax over a tokens x tokens matrix in its "
                         "forward pass); attention rollout needs a transformer")
    # Axes are traced on a batch of at least two (a batch of one cannot be told from a broadcast).
    probe = graph if images.shape[0] > 1 else propagation_graph(model, variables, jnp.concatenate([images] * 2))
    positions = [graph.nodes.index(node) for node in nodes]
    probed = [probe.nodes[position] for position in positions]
    axes = traced_axes(lambda x: [probe.forward(x)[node.output] for node in probed], images)
    return graph, [_Attention(node, shapes[node], _batch_axis(node_axes, shapes[node].shape), _tokens(node_axes))
                   for node, node_axes in zip(nodes, axes)]


def _batch_axis(axes: Axes, shape: tuple[int, ...]) -> int:
    if axes is None or BATCH not in axes[:-2]:
        raise ValueError(f"attention probabilities of shape {shape} have no batch axis traced from the images "
                         f"(axes {describe(axes)}); attention rollout needs them per image")
    return axes.index(BATCH)


def _tokens(axes: Axes) -> TokenGrid | None:
    """The layout of the queries and keys when both are the same traced tokens axis."""
    if axes is None:
        return None
    queries, keys = (token_grid(label) for label in axes[-2:])
    return keys if keys is not None and queries == keys else None


def _per_image(attention: jax.Array, batch_axis: int) -> jax.Array:
    """Attention probabilities (..., B, ..., T, T) -> (B, T, T), averaged over every other axis (heads)."""
    tokens = attention.shape[-1]
    moved = jnp.moveaxis(attention, batch_axis, 0)
    return jnp.mean(moved.reshape(moved.shape[0], -1, tokens, tokens), axis=1)


def _tokens_layout(attentions: list[_Attention], tokens: int, prefix_tokens: int | None,
                   grid: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
    """``(prefix tokens, (h, w))`` of the attention's ``tokens`` tokens: as passed, else as traced."""
    if grid is None:
        traced = {attention.tokens for attention in attentions if attention.tokens is not None}
        if len(traced) != 1:
            raise ValueError(f"cannot tell which of the attention's {tokens} tokens form the patch grid (traced from "
                             f"the images: {sorted(traced) or 'none'}); pass grid=(h, w) and prefix_tokens=")
        (found,) = traced
        if prefix_tokens is not None and prefix_tokens != found.prefix:
            raise ValueError(f"prefix_tokens={prefix_tokens}, but the attention's tokens have {found.prefix} before "
                             f"their {found.height}x{found.width} patches")
        return found.prefix, (found.height, found.width)
    prefix = tokens - grid[0] * grid[1] if prefix_tokens is None else prefix_tokens
    if prefix < 0 or prefix + grid[0] * grid[1] != tokens:
        raise ValueError(f"the attention covers {tokens} tokens, which are not prefix_tokens={prefix_tokens} + "
                         f"{grid[0]}x{grid[1]} patches; pass the model's grid and prefix count")
    return prefix, (grid[0], grid[1])


def _read_map(flow: jax.Array, prefix: int, grid: tuple[int, int]) -> jax.Array:
    """(B,T,T) token-to-token flow -> (B,h,w): the class token's row over the patches, or the mean row."""
    rows = flow[:, 0] if prefix > 0 else jnp.mean(flow, axis=1)
    return rows[:, prefix:].reshape(flow.shape[0], *grid)


def attention_rollout(model: ModelLike, variables: Mapping, images: jax.Array, *, residual: float = 0.5,
                      prefix_tokens: int | None = None, grid: tuple[int, int] | None = None) -> jax.Array:
    """Attention rollout maps (B,h,w) of any transformer in eval mode (class-independent).

    Args:
      model: anything ``attrjax.models.as_split_model`` takes.
      variables: its variables.
      images: (B,S,S,3) normalised images.
      residual: the share of each block's flow that the residual connection carries (``Ahat = (1 - residual) Abar
        + residual I``); 0.5 as published.
      prefix_tokens: the number of tokens before the patch grid; None: traced from the images (class tokens
        concatenated before a conv or reshape patch embedding), or all tokens but the grid's.
      grid: the patch grid (h, w); None: traced from the images.

    Returns:
      (B,h,w) float32, each row of the rolled-out flow summing to 1 over all tokens.
    """
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must lie in [0, 1], got {residual}")
    images = images.astype(jnp.float32)
    graph, attentions = _attentions(model, variables, images)
    values = graph.forward(images)
    tokens = attentions[0].value.shape[-1]
    prefix, grid = _tokens_layout(attentions, tokens, prefix_tokens, grid)
    identity = jnp.eye(tokens, dtype=jnp.float32)
    flow = jnp.broadcast_to(identity, (images.shape[0], tokens, tokens))
    for attention in attentions:
        mean = _per_image(values[attention.node.output], attention.batch_axis)
        mixed = (1.0 - residual) * mean + residual * identity
        flow = (mixed / jnp.sum(mixed, axis=-1, keepdims=True)) @ flow
    return _read_map(flow, prefix, grid)


def gradient_rollout(model: ModelLike, variables: Mapping, images: jax.Array, target: Target, *,
                     prefix_tokens: int | None = None, grid: tuple[int, int] | None = None) -> jax.Array:
    """Gradient-weighted attention rollout maps (B,h,w) of any transformer in eval mode.

    Args:
      model: anything ``attrjax.models.as_split_model`` takes.
      variables: its variables.
      images: (B,S,S,3) normalised images.
      target: (B,) int classes, (B,K) weights or a callable of the logits (``target_weights``); the gradients are
        those of ``sum_k t_k logit_k``.
      prefix_tokens: as ``attention_rollout``.
      grid: as ``attention_rollout``.

    Returns:
      (B,h,w) float32, non-negative.
    """
    images = images.astype(jnp.float32)
    graph, attentions = _attentions(model, variables, images)
    zeros = {attention.node.output: jnp.zeros(attention.value.shape, attention.value.dtype)
             for attention in attentions}

    def forward(perturbations):  # the logits, and every value (the perturbations are zeros: the forward pass)
        values = graph.forward(images, perturbations)
        return values[graph.output], values

    logits, vjp_fn, values = jax.vjp(forward, zeros, has_aux=True)
    gradients = vjp_fn(target_weights(target, logits))[0]
    tokens = attentions[0].value.shape[-1]
    prefix, grid = _tokens_layout(attentions, tokens, prefix_tokens, grid)
    identity = jnp.eye(tokens, dtype=jnp.float32)
    flow = jnp.broadcast_to(identity, (images.shape[0], tokens, tokens))
    for attention in attentions:
        output = attention.node.output
        weighted = jnp.maximum(gradients[output] * values[output], 0.0)
        flow = flow + _per_image(weighted, attention.batch_axis) @ flow
    return _read_map(flow if prefix > 0 else flow - identity, prefix, grid)


__all__ = ["attention_rollout", "gradient_rollout"]
