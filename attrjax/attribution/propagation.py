"""Propagation-based attributions for the VGG family: LRP (Bach et al. 2015) and Excitation Backprop (Zhang et al.).

No hooks and no module surgery: the VGG's variables are read into a list of pure steps (conv with BatchNorm folded
in, ReLU, 2x2 max-pool, the head's average pool, the classifier), run forward once recording every step's input, and
relevance is sent back step by step. Every linear rule uses the gradient trick of "LRP as a modified gradient"
(Montavon et al. 2019): for ``z = f(x) + b`` with ``f`` linear, ``R_in = x * vjp(f)(R_out / z')`` where ``z'`` is the
rule's (stabilised) denominator, so convolutions need no unfolding. Everything is batched over images and jit-able:
``jax.jit(functools.partial(lrp, model, rule="composite"))(variables, images, target)``.

Linear layers, by name: the convs ``conv{s}_{j}`` (kernel and bias with the eval-mode BatchNorm folded in),
``avgpool`` (only with ``head_pooling="avg"``: the global average pool as a linear map with weights 1/(H*W)) and
``classifier`` (the C,H,W flatten is a permutation, folded into the classifier's linear map). Dropout is the identity
in eval mode; ReLU passes relevance unchanged; the max-pool sends each window's relevance to its arg-max (the
gradient of ``max_pool_2x2``; a tie splits it evenly between the tied positions, so relevance is still conserved).

Rules (``R_j`` the relevance of output j, ``x_i`` the layer input, ``w_ij`` the weights, ``+``/``-`` positive and
negative parts, ``s/z`` a safe division that is 0 where ``z`` is 0):

- ``"alpha{a}beta{b}"`` with ``a - b = 1`` (``"alpha1beta0"``, ``"alpha2beta1"``, ...):
  ``R_i = sum_j (a * z+_ij / z+_j - b * z-_ij / z-_j) R_j`` with ``z+_ij = x+_i w+_ij + x-_i w-_ij`` and
  ``z-_ij = x+_i w-_ij + x-_i w+_ij`` (positive and negative inputs handled separately, as the paper's reference
  ``relprop`` code; after a ReLU ``x- = 0``). Biases are left out of the denominators, as in that code. An output
  with no negative contribution (``z-_j = 0``) sends all of ``R_j`` to its positive ones (alpha taken as 1 there),
  so the rule conserves relevance exactly (``sum_i R_i = sum_j R_j`` wherever ``z+_j != 0``), biases or not.
- ``"epsilon"``: ``R_i = sum_j x_i w_ij / (z_j + eps * sign(z_j)) R_j`` with ``z_j`` including the bias and
  ``sign(0) = 1``; conservative up to the bias and the epsilon absorption.
- ``"zb"`` (z^B, the bounded rule of Montavon et al. 2017), only for the first conv (pixels lie in [low, high]):
  ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / (sum_i' same) R_j``, biases left out; exactly conservative.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Union

import jax
import jax.numpy as jnp

from attrjax.attribution.gradcam import Target, target_weights
from attrjax.models.vgg import VGG, max_pool_2x2

# A rule is a name ("alpha1beta0", "alpha2beta1", "epsilon", "zb"); ``lrp`` takes one name, the preset
# "composite", a mapping linear-layer name -> rule name, or a callable linear-layer name -> rule name.
RuleSpec = Union[str, Mapping[str, str], Callable[[str], str]]
Bounds = tuple[Union[float, jax.Array], Union[float, jax.Array]]

_ALPHA_BETA = re.compile(r"alpha(\d+(?:\.\d+)?)beta(\d+(?:\.\d+)?)$")
_BN_EPSILON = 1e-5


def fold_batchnorm(kernel: jax.Array, bias: jax.Array, scale: jax.Array, bn_bias: jax.Array, mean: jax.Array,
                   var: jax.Array, eps: float = _BN_EPSILON) -> tuple[jax.Array, jax.Array]:
    """Folds an eval-mode BatchNorm into the preceding conv/dense layer.

    ``BN(x W + b) = (x W + b - mean) * scale / sqrt(var + eps) + bn_bias = x W' + b'``.

    Args:
      kernel: (..., Cout) weights, output channels last (HWIO for a conv).
      bias, scale, bn_bias, mean, var: (Cout,).
      eps: BatchNorm epsilon (1e-5 in the VGG).

    Returns:
      ``(kernel', bias')`` with the shapes of ``kernel`` and ``bias``.
    """
    gain = scale * jax.lax.rsqrt(var + eps)
    return kernel * gain, (bias - mean) * gain + bn_bias


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _flatten_dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    # C,H,W order, as VGG.head flattens (PyTorch order).
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1) @ kernel


def _sum_pool(x: jax.Array, weight: jax.Array) -> jax.Array:
    return weight * jnp.sum(x, axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class _Step:
    """One step of the unrolled network; ``point`` names the model layer its output is (``None`` for none)."""

    kind: str  # "linear", "relu" or "pool"
    name: str
    point: str | None = None
    apply: Callable[[jax.Array, jax.Array], jax.Array] | None = None  # linear steps: (x, kernel) -> x W
    kernel: jax.Array | None = None
    bias: jax.Array | None = None


def _steps(model: VGG, variables: Mapping) -> list[_Step]:
    params, stats = variables["params"], variables["batch_stats"]
    steps = []
    for name in model.layers[1:]:
        if name.startswith("pool"):
            steps.append(_Step("pool", name, point=name))
            continue
        bn = "bn" + name[4:]
        kernel, bias = fold_batchnorm(params[name]["kernel"], params[name]["bias"], params[bn]["scale"],
                                      params[bn]["bias"], stats[bn]["mean"], stats[bn]["var"])
        steps.append(_Step("linear", name, apply=_conv, kernel=kernel, bias=bias))
        steps.append(_Step("relu", name, point=name))
    classifier = params["classifier"]
    if model.head_pooling == "avg":
        size = model.final_spatial_size
        steps.append(_Step("linear", "avgpool", apply=_sum_pool, kernel=jnp.asarray(1.0 / size**2, jnp.float32)))
        steps.append(_Step("linear", "classifier", apply=jnp.matmul, kernel=classifier["kernel"],
                           bias=classifier["bias"]))
    else:
        steps.append(_Step("linear", "classifier", apply=_flatten_dense, kernel=classifier["kernel"],
                           bias=classifier["bias"]))
    return steps


def linear_layer_names(model: VGG) -> tuple[str, ...]:
    """Names of the layers a rule is chosen for, in forward order (convs, ``avgpool`` if any, ``classifier``)."""
    convs = tuple(name for name in model.layers if name.startswith("conv"))
    return convs + (("avgpool",) if model.head_pooling == "avg" else ()) + ("classifier",)


def _forward(steps: list[_Step], images: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    inputs = []
    x = images
    for step in steps:
        inputs.append(x)
        if step.kind == "linear":
            x = step.apply(x, step.kernel)
            if step.bias is not None:
                x = x + step.bias
        elif step.kind == "relu":
            x = jax.nn.relu(x)
        else:
            x = max_pool_2x2(x)
    return x, inputs


def _check_inputs(model: VGG, images: jax.Array, layer: str):
    expected = (model.image_size, model.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"expected images of shape (batch, {model.image_size}, {model.image_size}, 3) in NHWC "
                         f"layout, got {tuple(images.shape)}")
    if layer not in model.layers:
        raise ValueError(f"unknown layer {layer!r} to read relevance at; this VGG has: {', '.join(model.layers)}")


def folded_logits(model: VGG, variables: Mapping, images: jax.Array) -> jax.Array:
    """Eval-mode logits (B,K) of the unrolled, BatchNorm-folded network that ``lrp`` propagates through.

    Equals ``model.apply(variables, images)`` up to float rounding; exposed so that can be checked.
    """
    _check_inputs(model, images, "input")
    return _forward(_steps(model, variables), images.astype(jnp.float32))[0]


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def _epsilon_rule(step: _Step, x: jax.Array, relevance: jax.Array, epsilon: float) -> jax.Array:
    z, vjp_fn = jax.vjp(lambda a: step.apply(a, step.kernel), x)
    if step.bias is not None:
        z = z + step.bias
    stabilised = z + epsilon * jnp.where(z >= 0, 1.0, -1.0)
    (contribution,) = vjp_fn(relevance / stabilised)
    return x * contribution


def _alpha_beta_rule(step: _Step, x: jax.Array, relevance: jax.Array, alpha: float, beta: float) -> jax.Array:
    x_pos, x_neg = jnp.maximum(x, 0.0), jnp.minimum(x, 0.0)
    w_pos, w_neg = jnp.maximum(step.kernel, 0.0), jnp.minimum(step.kernel, 0.0)

    def shares(w_for_pos_x, w_for_neg_x):
        # Contributions x+ w_for_pos_x + x- w_for_neg_x per output, and the map of output weights to input shares.
        return jax.vjp(lambda xp, xn: step.apply(xp, w_for_pos_x) + step.apply(xn, w_for_neg_x), x_pos, x_neg)

    z_pos, vjp_pos = shares(w_pos, w_neg)
    z_neg, vjp_neg = shares(w_neg, w_pos)
    # An output without inhibitory contributions sends all its relevance to the excitatory ones (keeps conservation,
    # e.g. through the average pool, whose weights are all positive).
    no_neg = z_neg == 0
    c_pos, c_neg = vjp_pos(_safe_divide(jnp.where(no_neg, 1.0, alpha) * relevance, z_pos))
    result = x_pos * c_pos + x_neg * c_neg
    if beta:
        c_pos, c_neg = vjp_neg(_safe_divide(jnp.where(no_neg, 0.0, beta) * relevance, z_neg))
        result = result - (x_pos * c_pos + x_neg * c_neg)
    return result


def _zb_rule(step: _Step, x: jax.Array, relevance: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    w_pos, w_neg = jnp.maximum(step.kernel, 0.0), jnp.minimum(step.kernel, 0.0)

    def z_fn(a, lo, hi):
        return step.apply(a, step.kernel) - step.apply(lo, w_pos) - step.apply(hi, w_neg)

    z, vjp_fn = jax.vjp(z_fn, x, low, high)
    c_x, c_low, c_high = vjp_fn(_safe_divide(relevance, z))
    return x * c_x + low * c_low + high * c_high


def _parse_rule(rule: str, name: str, is_input_layer: bool) -> tuple:
    if not isinstance(rule, str):
        raise ValueError(f"the rule for layer {name!r} must be a rule name, got {rule!r}")
    if rule == "epsilon":
        return ("epsilon",)
    if rule == "zb":
        if not is_input_layer:
            raise ValueError(f"the z^B rule needs pixel bounds and only applies to the first conv, not {name!r}")
        return ("zb",)
    match = _ALPHA_BETA.match(rule)
    if match:
        alpha, beta = float(match.group(1)), float(match.group(2))
        if abs(alpha - beta - 1.0) > 1e-9:
            raise ValueError(f"the alpha-beta rule needs alpha - beta = 1, got {rule!r}")
        return ("alphabeta", alpha, beta)
    raise ValueError(f"unknown LRP rule {rule!r} for layer {name!r}; use 'alpha1beta0' (or 'alpha{{a}}beta{{b}}' "
                     "with a - b = 1), 'epsilon', 'zb' (first conv only) or the preset 'composite'")


def resolve_rules(model: VGG, rule: RuleSpec = "alpha1beta0", input_rule: str | None = "zb") -> dict[str, tuple]:
    """The parsed rule of every linear layer (``linear_layer_names``) for ``lrp``'s ``rule``/``input_rule``.

    - a rule name: that rule at every linear layer, except the first conv, which gets ``input_rule`` (z^B by
      default, as the paper's LRP: z^B at the input, alpha1beta0 everywhere else) unless ``input_rule`` is None;
    - ``"composite"``: ``input_rule`` at the first conv, alpha1beta0 at the other convs, epsilon at ``avgpool`` and
      ``classifier``;
    - a mapping layer name -> rule name: the listed layers get their rules; unlisted ones alpha1beta0, except the
      first conv (``input_rule`` if not None) and ``avgpool`` (the classifier's rule if that is listed);
    - a callable layer name -> rule name: full control, ``input_rule`` is ignored.
    """
    names = linear_layer_names(model)
    first = names[0]
    if callable(rule) and not isinstance(rule, str):
        chosen = {name: rule(name) for name in names}
    elif isinstance(rule, Mapping):
        unknown = sorted(set(rule) - set(names))
        if unknown:
            raise ValueError(f"rules given for unknown layers {unknown}; the linear layers are: {', '.join(names)}")
        defaults = {name: "alpha1beta0" for name in names}
        if input_rule is not None:
            defaults[first] = input_rule
        if "avgpool" in names and "classifier" in rule:
            defaults["avgpool"] = rule["classifier"]
        chosen = {**defaults, **rule}
    elif rule == "composite":
        chosen = {name: "alpha1beta0" if name.startswith("conv") else "epsilon" for name in names}
        if input_rule is not None:
            chosen[first] = input_rule
    elif isinstance(rule, str):
        chosen = {name: rule for name in names}
        if input_rule is not None:
            chosen[first] = input_rule
    else:
        raise ValueError(f"rule must be a rule name, 'composite', a mapping or a callable, got {rule!r}")
    return {name: _parse_rule(chosen[name], name, name == first) for name in names}


def _stop_index(steps: list[_Step], layer: str) -> int:
    # Relevance at ``layer`` is the relevance at the input of the step after the one producing it.
    if layer == "input":
        return 0
    return next(i for i, step in enumerate(steps) if step.point == layer) + 1


def _input_bounds(images: jax.Array, input_bounds: Bounds | None) -> tuple[jax.Array, jax.Array]:
    if input_bounds is None:  # the paper's reference code: scalar bounds per image, its min and max
        low = jnp.min(images, axis=(1, 2, 3), keepdims=True)
        high = jnp.max(images, axis=(1, 2, 3), keepdims=True)
    else:
        low, high = (jnp.asarray(bound, images.dtype) for bound in input_bounds)
    return jnp.broadcast_to(low, images.shape), jnp.broadcast_to(high, images.shape)


def lrp(model: VGG, variables: Mapping, images: jax.Array, target: Target, *, rule: RuleSpec = "alpha1beta0",
        input_rule: str | None = "zb", epsilon: float = 1e-6, input_bounds: Bounds | None = None,
        layer: str = "input") -> jax.Array:
    """Layer-wise relevance propagation maps (B,H,W) of a VGG, eval mode.

    Args:
      model: the ``VGG`` (only its configuration is read).
      variables: ``{'params', 'batch_stats'}`` of ``model``.
      images: (B,S,S,3) float, normalised as the model expects.
      target: (B,) int classes, (B,K) weights or a callable of the logits (``gradcam.target_weights``). The initial
        relevance is ``weights * logits``: the target logit at the target class (LRP's usual start).
      rule: see ``resolve_rules``; the default with ``input_rule="zb"`` is the paper's LRP (z^B at the first conv,
        alpha1beta0 elsewhere).
      input_rule: the rule of the first conv for a named rule or a mapping; None to use ``rule`` there too.
      epsilon: the epsilon rule's stabiliser.
      input_bounds: (low, high) pixel bounds for z^B, scalars or arrays broadcastable to ``images`` (e.g. (3,) per
        channel: the normalised image's least and greatest possible values). None: each image's own min and max
        (the paper's reference code).
      layer: where to read relevance: ``input`` or any ``model.layers`` name (e.g. ``conv5_3``; ``conv*`` is read
        at the ReLU output, which equals the conv output's relevance since ReLU passes it unchanged).

    Returns:
      (B,H,W) float32 relevance at ``layer``, summed over channels. Its spatial sum is the target logit where the
      rules conserve relevance (alpha-beta and z^B do exactly; epsilon up to biases and the stabiliser).
    """
    _check_inputs(model, images, layer)
    rules = resolve_rules(model, rule, input_rule)
    images = images.astype(jnp.float32)
    steps = _steps(model, variables)
    logits, inputs = _forward(steps, images)
    relevance = target_weights(target, logits) * logits
    stop = _stop_index(steps, layer)
    for step, x in zip(steps[stop:][::-1], inputs[stop:][::-1]):
        if step.kind == "relu":
            continue
        if step.kind == "pool":
            relevance = jax.vjp(max_pool_2x2, x)[1](relevance)[0]
            continue
        kind, *args = rules[step.name]
        if kind == "epsilon":
            relevance = _epsilon_rule(step, x, relevance, epsilon)
        elif kind == "alphabeta":
            relevance = _alpha_beta_rule(step, x, relevance, *args)
        else:
            relevance = _zb_rule(step, x, relevance, *_input_bounds(images, input_bounds))
    return jnp.sum(relevance, axis=-1)


def _mwp_rule(step: _Step, x: jax.Array, probability: jax.Array) -> jax.Array:
    w_pos = jnp.maximum(step.kernel, 0.0)
    z, vjp_fn = jax.vjp(lambda a: step.apply(a, w_pos), x)
    (contribution,) = vjp_fn(_safe_divide(probability, jnp.where(z > 0, z, 0.0)))
    return x * contribution


def excitation_backprop(model: VGG, variables: Mapping, images: jax.Array, target: Target, *,
                        layer: str = "input") -> jax.Array:
    """Excitation Backprop (Zhang et al. 2016): the marginal winning probability (B,H,W) at ``layer``.

    The top signal is the target weights themselves (a one-hot for int targets). Each linear layer passes
    ``P_in = x * (W+^T (P_out / (x W+)))``: only excitatory (positive) weights, normalised by the positive-weight
    response and masked to where it is positive; no biases. ReLU passes P unchanged, the max-pool to its winners.
    After a ReLU (x >= 0) this is exactly LRP's alpha1beta0 rule (which also leaves biases out here) started from
    the one-hot instead of the logit, so ``excitation_backprop * logit == lrp(..., rule="alpha1beta0",
    input_rule=None)`` at any layer past the first conv. P is non-negative and its total is conserved (equal to the
    target's total weight) wherever no output with probability mass has a zero positive response; at ``input`` that
    holds only for non-negative pixels (a normalised image has negative ones: the paper reads EBP at conv5_3).

    Args: as ``lrp``; ``layer`` is ``input`` or any ``model.layers`` name (the paper reads ``conv5_3``).
    Returns: (B,H,W) float32, summed over channels.
    """
    _check_inputs(model, images, layer)
    steps = _steps(model, variables)
    logits, inputs = _forward(steps, images.astype(jnp.float32))
    probability = target_weights(target, logits)
    stop = _stop_index(steps, layer)
    for step, x in zip(steps[stop:][::-1], inputs[stop:][::-1]):
        if step.kind == "pool":
            probability = jax.vjp(max_pool_2x2, x)[1](probability)[0]
        elif step.kind == "linear":
            probability = _mwp_rule(step, x, probability)
    return jnp.sum(probability, axis=-1)


__all__ = ["excitation_backprop", "fold_batchnorm", "folded_logits", "linear_layer_names", "lrp",
           "resolve_rules"]
