"""Propagation-based attributions of any model: LRP (Bach et al. 2015) and Excitation Backprop (Zhang et al. 2016).

No hooks and no second model definition: the model's eval-mode forward pass is traced into a canonical graph
(``propagation_graph``: convs, dense layers and pools with BatchNorm and biases folded in, residual sums,
activations, max-pools, layout ops; for transformers LayerNorm with its scale held constant, softmax units and
products of two input-dependent values), a composite assigns a rule to every affine layer (``attrjax.attribution``'s
rules and ``Composite``), and ``propagate`` sends relevance back through the graph once, from the logits to
the images or to a named layer (a token layer's relevance comes back as its (B,h,w,D) map). LRP, Excitation
Backprop and RAP (``attrjax.attribution.rap``) are that one loop with different rules and start signals. Everything
is batched over images, jit-able and differentiable with respect to the variables:
``jax.jit(functools.partial(lrp, model, composite="composite"))(variables, images, target)``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from attrjax.attribution._gradcam import Target, target_weights
from attrjax.attribution._graph import (Activation, Affine, Graph, Node, Opaque, Product, Softmax, Sum, Transport,
                                       UnsupportedOp, node_kind, trace_graph)
from attrjax.attribution._rules import Composite, resolve_composite, softmax_relevance
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
      The relevance of ``graph.point`` if it has one (in the layer's activations' layout), else of the images,
      shaped like that value. A value that feeds several nodes (a residual branch point) gets the sum of what each
      sends back; a value broadcast into a node gets the sum over the axes it was broadcast along.

    Raises:
      UnsupportedOp: relevance would reach ops without a rule; it names every one of them.
    """
    rules = composite.resolve(graph)
    _check_rules_exist(graph, composite)
    _check_rules_apply(graph, rules)
    stop = graph.input if graph.point is None else graph.point
    incoming = {graph.output: relevance}
    for node in reversed(graph.nodes):
        if node.output == stop:
            break
        out = incoming.pop(node.output, None)
        if out is None:  # nothing reaches this node (e.g. a value the logits do not depend on)
            continue
        xs = [values[i] for i in node.inputs]
        for i, r in zip(node.inputs, _sent(node, xs, out, values, rules, composite)):
            if r is None:  # a value held constant: it gets no relevance
                continue
            r = _unbroadcast(r, values[i].shape)
            incoming[i] = incoming[i] + r if i in incoming else r
    result = incoming.get(stop, jnp.zeros_like(values[stop]))
    if graph.point_layout is None:
        return result
    assert graph.marker_shape is not None  # set with point_layout
    zeros = jnp.zeros(graph.marker_shape.shape, graph.marker_shape.dtype)
    return jax.vjp(graph.point_layout, zeros)[1](result)[0]


def _sent(node: Node, xs: list[jax.Array], out: jax.Array, values: dict[int, jax.Array], rules: Mapping,
          composite: Composite) -> tuple:
    """What ``node`` sends to each of its inputs for the relevance ``out`` of its output (None: nothing)."""
    if isinstance(node, Affine):
        return (rules[node](node.bound(values), xs[0], out), None)
    if isinstance(node, Sum):
        return composite.sums(node.signed(xs), out)
    if isinstance(node, Activation):
        return (out,)
    if isinstance(node, Product):
        return composite.products(node, (xs[0], xs[1]), out)
    if isinstance(node, Softmax):
        return (softmax_relevance(node.fn, xs[0], out),)
    assert isinstance(node, Transport)  # relevance moves with the values (a max sends it to its arg-max)
    return jax.vjp(node.fn, *xs)[1](out)


def _unbroadcast(relevance: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The relevance of a value of ``shape`` that was broadcast to ``relevance``'s shape: summed over those axes."""
    if relevance.shape == tuple(shape):
        return relevance
    leading = relevance.ndim - len(shape)
    summed = tuple(range(leading)) + tuple(leading + axis for axis, size in enumerate(shape)
                                           if size == 1 and relevance.shape[leading + axis] != 1)
    return jnp.sum(relevance, axis=summed).reshape(shape)


def receivers(node: Node, composite: Composite) -> tuple[int, ...]:
    """The inputs of ``node`` that relevance reaching it is sent to."""
    if isinstance(node, Affine):
        return (node.input,)
    if isinstance(node, Product):
        return composite.products.receivers(node)
    return node.inputs


def reached_nodes(graph: Graph, composite: Composite) -> list[Node]:
    """The nodes relevance reaches on its way from the logits to the point it is read at, in backward order."""
    stop = graph.input if graph.point is None else graph.point
    reached, nodes = {graph.output}, []
    for node in reversed(graph.nodes):
        if node.output == stop:
            break
        if node.output in reached:
            nodes.append(node)
            reached.update(receivers(node, composite))
    return nodes


def _check_rules_exist(graph: Graph, composite: Composite) -> None:
    """Raises ``UnsupportedOp`` naming every op without a rule that relevance would reach."""
    opaque = [node for node in reached_nodes(graph, composite) if isinstance(node, Opaque)]
    if not opaque:
        return
    listed = "; ".join(f"{node.where}: {node.why}" for node in reversed(opaque))
    unary = sorted({node.primitive for node in opaque if len(node.inputs) == 1 and node.why.startswith("it has no")})
    hint = (f"If {'these are' if len(unary) > 1 else 'it is'} elementwise activations that relevance should pass "
            f"unchanged, pass passthrough={tuple(unary)!r}; otherwise read"
            if len(unary) == len(opaque) else "Read")
    raise UnsupportedOp(
        f"cannot propagate relevance through {listed}. Supported are convolutions, dense layers, sum/mean/average "
        "pooling, constant scales and shifts (eval-mode BatchNorm), LayerNorm and RMSNorm, residual additions, "
        "max-pooling, layout ops, elementwise activations (GELU and SiLU included), softmax and products of two "
        f"input-dependent values (attention). {hint} relevance at a layer between "
        f"{'them' if len(opaque) > 1 else 'it'} and the logits (layer=), or use a gradient method")


def transformer_nodes(graph: Graph) -> list[Node]:
    """The nodes whose inputs can be negative or that multiply input-dependent values: LayerNorm's held scales and
    centring, softmax, products, composed activations (GELU, SiLU)."""
    return [node for node in graph.nodes if isinstance(node, (Product, Softmax))
            or isinstance(node, Affine) and node.kind == "norm"
            or isinstance(node, Sum) and node.signs is not None
            or isinstance(node, Activation) and node.composed]


def _check_rules_apply(graph: Graph, rules: Mapping) -> None:
    """Raises ``UnsupportedOp`` where a rule that assumes non-negative inputs (Excitation Backprop's, RAP's) would
    meet a transformer's nodes, where it is undefined."""
    assuming = sorted({type(rule).__name__ for rule in rules.values() if getattr(rule, "non_negative_inputs", False)})
    found = transformer_nodes(graph)
    if not assuming or not found:
        return
    listed = ", ".join(dict.fromkeys(f"{node_kind(node)} {node.name!r}" for node in found[:4]))
    raise UnsupportedOp(
        f"the rules {', '.join(assuming)} assume non-negative activations (ReLU networks), but this model has "
        f"nodes where that does not hold or that multiply input-dependent values ({listed}, ...): their "
        "relevance is undefined. Use lrp(..., composite='attnlrp') or 'cp_lrp', attention rollout, or a gradient "
        "method")


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
