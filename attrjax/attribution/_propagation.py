"""Propagation-based attributions of any model: LRP (Bach et al. 2015) and Excitation Backprop (Zhang et al. 2016).

No hooks and no second model definition: the model's eval-mode forward pass is traced into a canonical graph
(``propagation_graph``: convs, dense layers and pools with BatchNorm and biases folded in, residual sums,
activations, max-pools, layout ops), a composite assigns a rule to every affine layer (``attrjax.attribution``'s
rules and ``Composite``), and ``propagate`` sends relevance back through the graph once, from the logits to
the images or to a named layer. LRP, Excitation Backprop and RAP (``attrjax.attribution.rap``) are that one loop with
different rules and start signals. Everything is batched over images, jit-able and differentiable with respect to
the variables: ``jax.jit(functools.partial(lrp, model, composite="composite"))(variables, images, target)``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from attrjax.attribution._gradcam import Target, target_weights
from attrjax.attribution._graph import Activation, Affine, Graph, Sum, Transport, trace_graph
from attrjax.attribution._rules import Composite, resolve_composite
from attrjax.models import ModelLike, as_split_model


def propagation_graph(model: ModelLike, variables: Mapping, images: jax.Array, *, layer: str = "input",
                      passthrough: Sequence[str] = ()) -> Graph:
    """The canonical graph of ``model``'s eval-mode forward pass for images shaped like ``images``.

    Args:
      model: anything ``attrjax.models.as_split_model`` takes (attrjax's VGG and ResNets, a linen or NNX module, a
        split model).
      variables: its variables.
      images: (B,S,S,3).
      layer: ``input``, or one of the model's layers: the graph then marks that layer's output (``Graph.point``).
      passthrough: extra elementwise primitives that relevance passes unchanged.
    """
    split = as_split_model(model, images)
    if layer == "input":
        return trace_graph(lambda v, x: split.apply(v, x)[0], variables, images, passthrough=passthrough)
    split.check_layer(layer)
    marker = jnp.zeros(split.activation_shape(variables, images, layer), images.dtype)
    return trace_graph(lambda v, x, p: split.apply_perturbed(v, x, {layer: p})[0], variables, images, marker,
                       passthrough=passthrough)


def propagate(graph: Graph, values: dict[int, jax.Array], relevance: jax.Array, composite: Composite) -> jax.Array:
    """Sends ``relevance`` (shaped like the logits) back through ``graph`` with ``composite``'s rules.

    Args:
      graph: from ``propagation_graph``.
      values: ``graph.forward(images)``.
      relevance: the relevance of the logits (B,K).
      composite: the rules.

    Returns:
      The relevance of ``graph.point`` if it has one, else of the images, shaped like that value. A value that
      feeds several nodes (a residual branch point) gets the sum of what each sends back.
    """
    rules = composite.resolve(graph)
    stop = graph.input if graph.point is None else graph.point
    incoming = {graph.output: relevance}
    for node in reversed(graph.nodes):
        if node.output == stop:
            break
        out = incoming.pop(node.output, None)
        if out is None:  # nothing reaches this node (e.g. a value the logits do not depend on)
            continue
        xs = [values[i] for i in node.inputs]
        if isinstance(node, Affine):
            sent: tuple[jax.Array, ...] = (rules[node](node, xs[0], out),)
        elif isinstance(node, Sum):
            sent = composite.sums(tuple(xs), out)
        elif isinstance(node, Activation):
            sent = (out,)
        else:  # Transport: relevance moves with the values (a max sends it to its arg-max)
            assert isinstance(node, Transport)
            sent = jax.vjp(node.fn, *xs)[1](out)
        for i, r in zip(node.inputs, sent):
            incoming[i] = incoming[i] + r if i in incoming else r
    return incoming.get(stop, jnp.zeros_like(values[stop]))


def propagation_maps(model: ModelLike, variables: Mapping, images: jax.Array, target: Target,
                     composite: str | Composite, *, start: str, layer: str = "input",
                     passthrough: Sequence[str] = ()) -> jax.Array:
    """Relevance (B,H,W) at ``layer`` (summed over channels) under any composite: what ``lrp``,
    ``excitation_backprop`` and ``rap`` compute with theirs. The relevance of the logits starts as
    ``weights * logits`` (``start="logit"``, LRP) or as the target weights themselves (``start="weight"``)."""
    if start not in ("logit", "weight"):
        raise ValueError(f"start must be 'logit' or 'weight', got {start!r}")
    composite = resolve_composite(composite)
    images = images.astype(jnp.float32)
    graph = propagation_graph(model, variables, images, layer=layer, passthrough=passthrough)
    values = graph.forward(images)
    logits = values[graph.output]
    weights = target_weights(target, logits)
    relevance = propagate(graph, values, weights * logits if start == "logit" else weights, composite)
    if relevance.ndim != 4:
        raise ValueError(f"relevance at {layer!r} has shape {relevance.shape}, not a feature map (B,H,W,C); read it "
                         "at the input or at a convolutional layer")
    return jnp.sum(relevance, axis=-1)


def lrp(model: ModelLike, variables: Mapping, images: jax.Array, target: Target, *,
        composite: str | Composite = "paper", layer: str = "input", passthrough: Sequence[str] = ()) -> jax.Array:
    """Layer-wise relevance propagation maps (B,H,W) of any model in eval mode.

    Args:
      model: anything ``as_split_model`` takes.
      variables: its variables.
      images: (B,S,S,3) float, normalised as the model expects.
      target: (B,) int classes, (B,K) weights or a callable of the logits (``target_weights``). The initial
        relevance is ``weights * logits``: the target logit at the target class.
      composite: a ``Composite`` or a preset name of ``COMPOSITES``. ``"paper"`` (default): z^B at the
        input layer (each image's min and max as bounds), alpha1-beta0 elsewhere.
      layer: where to read relevance: ``input`` or any of the model's layers (e.g. a VGG's ``conv5_3``, read at its
        ReLU output, which holds the conv's relevance since ReLU passes it unchanged).
      passthrough: extra elementwise primitives relevance passes unchanged.

    Returns:
      (B,H,W) float32 relevance at ``layer``, summed over channels. Its spatial sum is the target logit where the
      rules conserve relevance (alpha-beta, z^B, flat, w^2 exactly; epsilon and gamma up to biases and the
      stabiliser).
    """
    return propagation_maps(model, variables, images, target, composite, start="logit", layer=layer,
                            passthrough=passthrough)


def excitation_backprop(model: ModelLike, variables: Mapping, images: jax.Array, target: Target, *,
                        layer: str = "input",
                        composite: str | Composite = "excitation_backprop",
                        passthrough: Sequence[str] = ()) -> jax.Array:
    """Excitation Backprop (Zhang et al. 2016): the marginal winning probability (B,H,W) at ``layer``.

    The top signal is the target weights themselves (a one-hot for int targets). Each affine layer passes
    ``P_in = x * (W+^T (P_out / (x W+)))`` (``WinningProbability``): only excitatory weights, normalised by the
    positive-weight response and masked to where it is positive; no biases. Activations pass P unchanged, max-pools
    to their winners. After a ReLU (x >= 0) this is LRP's alpha1-beta0 rule started from the one-hot instead of the
    logit. P is non-negative and its total is conserved wherever no output with probability mass has a zero positive
    response; at ``input`` that holds only for non-negative pixels (a normalised image has negative ones: the paper
    reads EBP at the last conv).

    Args: as ``lrp``. Returns: (B,H,W) float32, summed over channels.
    """
    return propagation_maps(model, variables, images, target, composite, start="weight", layer=layer,
                            passthrough=passthrough)


__all__ = ["excitation_backprop", "lrp", "propagate", "propagation_graph", "propagation_maps"]
