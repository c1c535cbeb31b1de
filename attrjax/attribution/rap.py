"""Relative Attributing Propagation (RAP; Nam, Gur, Choi, Wolf & Lee, AAAI 2020) for the VGG family.

Built on the unrolled, BatchNorm-folded steps of ``propagation`` (same forward pass, same hook-free "LRP as a
modified gradient" trick: a sum ``sum_j c_ij S_j`` over a linear map's outputs is ``x_i * vjp(f)(S)_i``). Notation
as there: ``x_i`` a layer input, ``w_ij`` the (folded) weights, ``+``/``-`` positive/negative parts, ``s/z`` a safe
division that is 0 where ``z`` is 0, all sums per image.

1. Target. ``t_k`` = ``gradcam.target_weights`` (a one-hot for int targets): RAP starts from the one-hot itself,
   not from the logit.
2. First propagation, through the classifier (``z_k = sum_i x_i w_ik + b_k``): every input gets its contribution,
   the bias is shared among them in the ratio of the positive to the negative contributions, then positive
   (relevant) and negative (irrelevant) parts are normalised relative to each other:

   - ``Pos = sum_k t_k sum_i (x+_i w+_ik + x-_i w-_ik)``, ``Neg = sum_k t_k sum_i (x+_i w-_ik + x-_i w+_ik)``;
   - ``C_i = sum_k t_k [x_i w_ik + b_k Pos/(Pos+Neg) * x+_i w+_ik / Z++_k + b_k Neg/(Pos+Neg) * x+_i w-_ik / Z+-_k]``
     with ``Z++_k = sum_i x+_i w+_ik`` and ``Z+-_k = sum_i x+_i w-_ik`` (the bias shares go to the inputs' positive
     resp. negative contributions in proportion to them); ``sum_i C_i = sum_k t_k z_k`` (the target logit);
   - ``R_i = (C+_i - C-_i) * sum_i' (C+_i' + C-_i') / sum_i' (C+_i' - C-_i') = |C_i| * sum C / sum |C|``
     (absolute-influence normalisation: the total is still the target logit, the share is each input's absolute
     influence, so after this step every unit carries the logit's sign).

3. Hidden convs (inputs are ReLU outputs, ``x >= 0``, so only the reference code's ``x+`` branch is non-zero):
   with ``P_j = sum_i x_i w+_ij``, ``N_j = sum_i x_i |w-_ij|`` and the absolute influence ``A_j = P_j + N_j``
   (biases left out),

   ``C_i = sum_j [ x_i w+_ij R+_j / P_j + x_i |w-_ij| (R_j / A_j + R-_j / N_j) ]``:
   relevant relevance ``R+_j`` goes in full to the excitatory inputs; the inhibitory inputs get the irrelevant
   ``R-_j`` in full plus their absolute-influence share ``|z_ij| / A_j`` of ``R_j``. That over-counts by
   ``E = sum_i C_i - sum_j R_j``, which the "shift" removes uniformly from the ``n`` non-zero units:
   ``R_i = C_i - [C_i != 0] * E / n``. What is conserved, exactly and per image: the net relevance
   ``sum_i R_i = sum_j R_j`` (relevant mass + irrelevant mass, i.e. ``sum R+ + sum R-``, stays the target logit;
   the two masses individually are not conserved: the shift turns the least relevant units irrelevant, which is how
   RAP's bi-polar maps arise after the all-one-sign first propagation).
4. First conv: z^B with pixel bounds ``l, h`` (``propagation``'s rule), biases left out, exactly conservative:
   ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / (sum_i' same) R_j``.
5. Max-pool: winner-take-all (the gradient of ``max_pool_2x2``; ties split evenly). ReLU and eval-mode dropout pass
   relevance unchanged. The average-pool head (``head_pooling="avg"``) is the linear map ``z = sum_i x_i / (H W)``
   with non-negative weights and inputs: it passes ``R_i = x_i / (H W z) R`` (proportional, as the reference code's
   average pool). The flatten head's C,H,W order is folded into the classifier's map, as in ``propagation``.

So, per image, every layer's relevance sums to the target score ``sum_k t_k z_k`` (the target logit for an int
target) wherever no denominator above vanishes.

Differences from the authors' public PyTorch code (which the paper's evaluation used; see also
docs/method.md#differences-from-the-reference-code):

- BatchNorm is folded into the convs (their BatchNorm relevance step is the identity up to the bias sharing it adds
  back). With a negative BatchNorm scale the folded kernel's signs flip for that channel, so here excitatory and
  inhibitory inputs are those of the post-BatchNorm activation; with positive scales the two agree.
- Their first propagation runs only when the incoming relevance's maximum equals 1 (a one-hot); here the classifier
  always gets it, so (B,K) weights and callables work too (``Pos``/``Neg`` are then sums over the weighted classes).
- Their linear layers' hidden rule (not reached in a VGG with a single classifier) sends ``R-`` to the excitatory
  inputs; only the conv variant (above) is used here. The ``x-`` branches of steps 2-3 are kept only where the inputs
  can be negative (step 2's general form); in a VGG hidden inputs are ReLU outputs.
- No sign flip for a negative target logit (their evaluation intended one): with ``positive_only=False`` the caller
  can flip; with a negative logit the whole first propagation is negative.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from attrjax.attribution.gradcam import Target, target_weights
from attrjax.attribution.propagation import (Bounds, _check_inputs, _forward, _input_bounds, _safe_divide, _Step,
                                             _steps, _stop_index, _zb_rule)
from attrjax.models.vgg import VGG, max_pool_2x2


def _per_image_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def _first_propagation(step: _Step, x: jax.Array, weights: jax.Array) -> jax.Array:
    """Step 2: contributions with the shared bias, then absolute-influence normalisation."""
    x_pos, x_neg = jnp.maximum(x, 0.0), jnp.minimum(x, 0.0)
    w_pos, w_neg = jnp.maximum(step.kernel, 0.0), jnp.minimum(step.kernel, 0.0)

    def part(xs, ws):
        z, vjp_fn = jax.vjp(lambda a: step.apply(a, ws), xs)
        return z, lambda s: xs * vjp_fn(s)[0]

    (z_pp, give_pp), (z_pn, give_pn) = part(x_pos, w_pos), part(x_pos, w_neg)
    (z_np, give_np), (z_nn, give_nn) = part(x_neg, w_pos), part(x_neg, w_neg)
    positive = jnp.sum(weights * (z_pp + z_nn), axis=-1, keepdims=True)
    negative = jnp.sum(weights * (z_pn + z_np), axis=-1, keepdims=True)
    # Each part's contributions x w (times the class weight): R_k = t_k z_k sent back in proportion to z_ik.
    contributions = sum(give(_safe_divide(weights * z, z))
                        for z, give in ((z_pp, give_pp), (z_pn, give_pn), (z_np, give_np), (z_nn, give_nn)))
    bias = weights * step.bias
    total = positive + negative
    contributions = (contributions + give_pp(_safe_divide(bias * _safe_divide(positive, total), z_pp))
                     + give_pn(_safe_divide(bias * _safe_divide(negative, total), z_pn)))
    magnitude = jnp.abs(contributions)
    return magnitude * _safe_divide(_per_image_sum(contributions), _per_image_sum(magnitude))


def _shift(contributions: jax.Array, relevance: jax.Array) -> jax.Array:
    """Removes the excess ``sum C - sum R`` uniformly from the non-zero units of ``C`` (per image)."""
    nonzero = (contributions != 0).astype(contributions.dtype)
    excess = _per_image_sum(contributions) - _per_image_sum(relevance)
    return contributions - nonzero * _safe_divide(excess, _per_image_sum(nonzero))


def _hidden_rule(step: _Step, x: jax.Array, relevance: jax.Array) -> jax.Array:
    """Step 3 for non-negative inputs: positive and negative relevance apart, absolute influence, then the shift."""
    x = jnp.maximum(x, 0.0)
    excitatory, vjp_exc = jax.vjp(lambda a: step.apply(a, jnp.maximum(step.kernel, 0.0)), x)
    inhibitory, vjp_inh = jax.vjp(lambda a: step.apply(a, -jnp.minimum(step.kernel, 0.0)), x)
    influence = excitatory + inhibitory
    relevant, irrelevant = jnp.maximum(relevance, 0.0), jnp.minimum(relevance, 0.0)
    (to_exc,) = vjp_exc(_safe_divide(relevant, excitatory))
    (to_inh,) = vjp_inh(_safe_divide(relevance, influence) + _safe_divide(irrelevant, inhibitory))
    return _shift(x * (to_exc + to_inh), relevance)


def _proportional_rule(step: _Step, x: jax.Array, relevance: jax.Array) -> jax.Array:
    z, vjp_fn = jax.vjp(lambda a: step.apply(a, step.kernel), x)
    return x * vjp_fn(_safe_divide(relevance, z))[0]


def rap(model: VGG, variables: Mapping, images: jax.Array, target: Target, *, input_bounds: Bounds | None = None,
        layer: str = "input", positive_only: bool = True) -> jax.Array:
    """Relative Attributing Propagation maps (B,H,W) of a VGG in eval mode (equations in the module docstring).

    Batched and jit-able: ``jax.jit(functools.partial(rap, model))(variables, images, target)``.

    Args:
      model: the ``VGG`` (only its configuration is read).
      variables: ``{'params', 'batch_stats'}`` of ``model``.
      images: (B,S,S,3) float, normalised as the model expects.
      target: (B,) int classes, (B,K) weights or a callable of the logits (``gradcam.target_weights``); the initial
        relevance is these weights themselves (a one-hot for int targets).
      input_bounds: (low, high) pixel bounds for the first conv's z^B rule, scalars or arrays broadcastable to
        ``images``; None: each image's own min and max (the reference code).
      layer: where to read relevance: ``input`` or any ``model.layers`` name (``conv*`` is read at its ReLU output).
      positive_only: keep only positive (relevant) values, as the paper's localisation evaluation does; False
        returns the signed map, whose spatial sum is the target score ``sum_k t_k logit_k`` (conservation).

    Returns:
      (B,H,W) float32 relevance at ``layer``, summed over channels (then clipped at 0 if ``positive_only``).
    """
    _check_inputs(model, images, layer)
    images = images.astype(jnp.float32)
    steps = _steps(model, variables)
    logits, inputs = _forward(steps, images)
    weights = target_weights(target, logits)
    stop = _stop_index(steps, layer)
    relevance = weights
    for step, x in zip(steps[stop:][::-1], inputs[stop:][::-1]):
        if step.kind == "relu":
            continue
        if step.kind == "pool":
            relevance = jax.vjp(max_pool_2x2, x)[1](relevance)[0]
        elif step.name == "classifier":
            relevance = _first_propagation(step, x, relevance)
        elif step.name == "avgpool":
            relevance = _proportional_rule(step, x, relevance)
        elif step is steps[0]:
            relevance = _zb_rule(step, x, relevance, *_input_bounds(images, input_bounds))
        else:
            relevance = _hidden_rule(step, x, relevance)
    maps = jnp.sum(relevance, axis=-1)
    return jnp.maximum(maps, 0.0) if positive_only else maps


__all__ = ["rap"]
