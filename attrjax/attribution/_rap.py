"""Relative Attributing Propagation (RAP; Nam, Gur, Choi, Wolf & Lee, AAAI 2020) for any model.

The same engine as LRP (``propagation.propagate`` over the BatchNorm-folded canonical graph, with the gradient form
of the rules: a sum ``sum_j c_ij S_j`` over a linear map's outputs is ``x_i * vjp(f)(S)_i``) with RAP's rules as a
composite (``rap_composite``). Notation as in ``rules``: ``x_i`` a layer input, ``w_ij`` the (folded) weights,
``+``/``-`` positive/negative parts, ``s/z`` a safe division that is 0 where ``z`` is 0, all sums per image.

1. Target. ``t_k`` = ``gradcam.target_weights`` (a one-hot for int targets): RAP starts from the one-hot itself,
   not from the logit.
2. First propagation, through the classifier (the last affine layer, ``z_k = sum_i x_i w_ik + b_k``): every input
   gets its contribution, the bias is shared among them in the ratio of the positive to the negative contributions,
   then positive (relevant) and negative (irrelevant) parts are normalised relative to each other:

   - ``Pos = sum_k t_k sum_i (x+_i w+_ik + x-_i w-_ik)``, ``Neg = sum_k t_k sum_i (x+_i w-_ik + x-_i w+_ik)``;
   - ``C_i = sum_k t_k [x_i w_ik + b_k Pos/(Pos+Neg) * x+_i w+_ik / Z++_k + b_k Neg/(Pos+Neg) * x+_i w-_ik / Z+-_k]``
     with ``Z++_k = sum_i x+_i w+_ik`` and ``Z+-_k = sum_i x+_i w-_ik`` (the bias shares go to the inputs' positive
     resp. negative contributions in proportion to them); ``sum_i C_i = sum_k t_k z_k`` (the target logit);
   - ``R_i = (C+_i - C-_i) * sum_i' (C+_i' + C-_i') / sum_i' (C+_i' - C-_i') = |C_i| * sum C / sum |C|``
     (absolute-influence normalisation: the total is still the target logit, the share is each input's absolute
     influence, so after this step every unit carries the logit's sign).

3. Hidden layers (``RapHidden``; inputs are ReLU outputs, ``x >= 0``, so only the reference code's ``x+`` branch
   is non-zero): with ``P_j = sum_i x_i w+_ij``, ``N_j = sum_i x_i |w-_ij|`` and the absolute influence
   ``A_j = P_j + N_j`` (biases left out),

   ``C_i = sum_j [ x_i w+_ij R+_j / P_j + x_i |w-_ij| (R_j / A_j + R-_j / N_j) ]``:
   relevant relevance ``R+_j`` goes in full to the excitatory inputs; the inhibitory inputs get the irrelevant
   ``R-_j`` in full plus their absolute-influence share ``|z_ij| / A_j`` of ``R_j``. That over-counts by
   ``E = sum_i C_i - sum_j R_j``, which the "shift" removes uniformly from the ``n`` non-zero units:
   ``R_i = C_i - [C_i != 0] * E / n``. What is conserved, exactly and per image: the net relevance
   ``sum_i R_i = sum_j R_j`` (relevant mass + irrelevant mass, i.e. ``sum R+ + sum R-``, stays the target logit;
   the two masses individually are not conserved: the shift turns the least relevant units irrelevant, which is how
   RAP's bi-polar maps arise after the all-one-sign first propagation).
4. First layer: z^B with pixel bounds ``l, h`` (``rules.ZBox``), biases left out, exactly conservative:
   ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / (sum_i' same) R_j``.
5. Max-pool: winner-take-all (its gradient; ties split evenly). Activations and eval-mode dropout pass relevance
   unchanged, layout ops (a flatten) move it with the values. Average and global pools ``z = sum_i x_i / (H W)``
   pass ``R_i = x_i / (H W z) R`` (proportional, as the reference code's average pool: ``rules.Epsilon(0)``), and a
   residual sum splits relevance in proportion to its branches (``rules.SumRule``).

So, per image, every layer's relevance sums to the target score ``sum_k t_k z_k`` (the target logit for an int
target) wherever no denominator above vanishes.

Differences from the authors' public PyTorch code (which the paper's evaluation used; see also
docs/method.md#differences-from-the-reference-code):

- BatchNorm is folded into the convs (their BatchNorm relevance step is the identity up to the bias sharing it adds
  back). With a negative BatchNorm scale the folded kernel's signs flip for that channel, so here excitatory and
  inhibitory inputs are those of the post-BatchNorm activation; with positive scales the two agree.
- Their first propagation runs only when the incoming relevance's maximum equals 1 (a one-hot); here the classifier
  always gets it, so (B,K) weights and callables work too (``Pos``/``Neg`` are then sums over the weighted classes).
- Their linear layers' hidden rule (not reached in a network with a single dense layer) sends ``R-`` to the excitatory
  inputs; only the conv variant (above) is used here. The ``x-`` branches of steps 2-3 are kept only where the inputs
  can be negative (step 2's general form); in a VGG or ResNet hidden inputs are ReLU outputs.
- No sign flip for a negative target logit (their evaluation intended one): with ``positive_only=False`` the caller
  can flip; with a negative logit the whole first propagation is negative.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from attrjax.attribution._gradcam import Target
from attrjax.attribution._graph import Affine
from attrjax.attribution._propagation import propagation_maps
from attrjax.attribution._rules import (Bounds, Composite, Epsilon, ZBox, linearized, negative, per_image_sum, positive,
                                       safe_divide)
from attrjax.models import ModelLike


@dataclasses.dataclass(frozen=True)
class RapFirst:
    """Step 2: contributions with the shared bias, then absolute-influence normalisation."""

    non_negative_inputs = True  # RAP's hidden rule is defined for ReLU networks: a transformer's graph is refused

    def __call__(self, layer: Affine, x: jax.Array, weights: jax.Array) -> jax.Array:
        x_pos, x_neg = positive(x), negative(x)
        w_pos, w_neg = positive(layer.weight), negative(layer.weight)

        (z_pp, give_pp), (z_pn, give_pn) = linearized(layer, x_pos, w_pos), linearized(layer, x_pos, w_neg)
        (z_np, give_np), (z_nn, give_nn) = linearized(layer, x_neg, w_pos), linearized(layer, x_neg, w_neg)
        positive_total = jnp.sum(weights * (z_pp + z_nn), axis=-1, keepdims=True)
        negative_total = jnp.sum(weights * (z_pn + z_np), axis=-1, keepdims=True)
        # Each part's contributions x w (times the class weight): R_k = t_k z_k sent back in proportion to z_ik.
        contributions = (give_pp(safe_divide(weights * z_pp, z_pp)) + give_pn(safe_divide(weights * z_pn, z_pn))
                         + give_np(safe_divide(weights * z_np, z_np)) + give_nn(safe_divide(weights * z_nn, z_nn)))
        if layer.bias is not None:
            bias = weights * layer.bias
            total = positive_total + negative_total
            contributions = (contributions + give_pp(safe_divide(bias * safe_divide(positive_total, total), z_pp))
                             + give_pn(safe_divide(bias * safe_divide(negative_total, total), z_pn)))
        magnitude = jnp.abs(contributions)
        return magnitude * safe_divide(per_image_sum(contributions), per_image_sum(magnitude))


def _shift(contributions: jax.Array, relevance: jax.Array) -> jax.Array:
    """Removes the excess ``sum C - sum R`` uniformly from the non-zero units of ``C`` (per image)."""
    nonzero = (contributions != 0).astype(contributions.dtype)
    excess = per_image_sum(contributions) - per_image_sum(relevance)
    return contributions - nonzero * safe_divide(excess, per_image_sum(nonzero))


@dataclasses.dataclass(frozen=True)
class RapHidden:
    """Step 3 for non-negative inputs: positive and negative relevance apart, absolute influence, then the shift.

    ``shift=False`` leaves the shift out: an ablation (``experiments.rap_border``), no longer conservative.
    """

    shift: bool = True
    non_negative_inputs = True  # as RapFirst

    def __call__(self, layer: Affine, x: jax.Array, relevance: jax.Array) -> jax.Array:
        x = positive(x)
        excitatory, vjp_exc = jax.vjp(lambda a: layer.linear(a, positive(layer.weight)), x)
        inhibitory, vjp_inh = jax.vjp(lambda a: layer.linear(a, -negative(layer.weight)), x)
        influence = excitatory + inhibitory
        relevant, irrelevant = positive(relevance), negative(relevance)
        (to_exc,) = vjp_exc(safe_divide(relevant, excitatory))
        (to_inh,) = vjp_inh(safe_divide(relevance, influence) + safe_divide(irrelevant, inhibitory))
        contributions = x * (to_exc + to_inh)
        return _shift(contributions, relevance) if self.shift else contributions


def rap_composite(input_bounds: Bounds | None = None) -> Composite:
    """RAP's rules: ``RapFirst`` at the classifier, z^B at the input layer (``input_bounds``; None: each image's
    min and max), proportional through pools, ``RapHidden`` everywhere else."""
    return Composite(default=RapHidden(), first=ZBox(*(input_bounds or (None, None))), last=RapFirst(),
                     by_kind={"pool": Epsilon(0.0)})


def rap(model: ModelLike, variables: Mapping, images: jax.Array, target: Target, *, input_bounds: Bounds | None = None,
        layer: str = "input", positive_only: bool = True, passthrough: Sequence[str] = ()) -> jax.Array:
    """Relative Attributing Propagation maps (B,H,W) of any model in eval mode.

    RAP (Nam et al., AAAI 2020) starts from the target weights themselves (a one-hot for an int target). Through the
    classifier every input gets its contribution ``x_i w_ik`` plus a share of the bias, and the contributions are
    renormalised by absolute influence (``R_i = |C_i| sum C / sum |C|``), so every unit carries the target's sign.
    Through each hidden layer relevant relevance goes to the excitatory inputs (``x_i w+_ij``) and irrelevant
    relevance to the inhibitory ones (``x_i |w-_ij|``), which also get their absolute-influence share; the over-count
    is removed uniformly from the non-zero units, so the signed map's spatial sum is the target score. The input layer
    uses the z^B rule. BatchNorm is folded into the layer before it.

    Batched and jit-able: ``jax.jit(functools.partial(rap, model))(variables, images, target)``.

    Args:
      model: anything ``attrjax.models.as_split_model`` takes; variables: its variables.
      images: (B,S,S,3) float, normalised as the model expects.
      target: (B,) int classes, (B,K) weights or a callable of the logits (``target_weights``); the initial
        relevance is these weights themselves (a one-hot for int targets).
      input_bounds: (low, high) pixel bounds for the input layer's z^B rule, scalars or arrays broadcastable to
        ``images``; None: each image's own min and max (the reference code).
      layer: where to read relevance: ``input`` or any of the model's layers.
      positive_only: keep only positive (relevant) values, as the paper's localisation evaluation does; False
        returns the signed map, whose spatial sum is the target score ``sum_k t_k logit_k`` (conservation).
      passthrough: extra elementwise primitives relevance passes unchanged.

    Returns:
      (B,H,W) float32 relevance at ``layer``, summed over channels (then clipped at 0 if ``positive_only``).
    """
    maps = propagation_maps(model, variables, images, target, rap_composite(input_bounds), start="weight",
                            layer=layer, passthrough=passthrough)
    return jnp.maximum(maps, 0.0) if positive_only else maps


__all__ = ["RapFirst", "RapHidden", "rap", "rap_composite"]
