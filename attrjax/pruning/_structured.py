"""Structured L1 filter pruning (Li et al., "Pruning Filters for Efficient ConvNets") that makes the network
physically smaller: a new VGG with fewer filters and the matching slices of its variables.

Per conv layer, the filters with the largest L1 norm sum_{h,w,i} |W[h,w,i,o]| are kept (ranked per layer, on the
given weights, no data). Slicing follows the kept filters through the network: the conv's kernel and bias, its
BatchNorm's scale, bias, mean and variance, the next conv's input channels, and the classifier's input rows. The
flatten head reads row c*H*W + s for channel c and position s, so a kept channel keeps its H*W consecutive rows
(``repeat_interleave``; the paper's reference code tiles the mask instead and keeps the wrong rows).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attrjax.models import VGG
from attrjax.pruning._masks import check_rate


def vgg16_paper_rates(rate: float) -> list[float]:
    """The paper's VGG16 rates: conv1_1 and the last six convs at ``rate``, the rest untouched."""
    return [rate] + [0.0] * 6 + [rate] * 6


def conv_names(model: VGG) -> list[str]:
    """The VGG's conv layers in forward order (``conv1_1``, ...)."""
    return [name for name in model.layers if name.startswith("conv")]


def l1_kept_filters(model: VGG, params, rates: Sequence[float]) -> dict[str, np.ndarray]:
    """Conv name -> sorted indices of the int(C_out * (1 - rate)) filters with the largest L1 norm."""
    names = conv_names(model)
    if len(rates) != len(names):
        raise ValueError(f"got {len(rates)} pruning rates for the {len(names)} convs of this VGG ({', '.join(names)})")
    return {name: largest_filters(filter_l1_norms(params[name]["kernel"]), rate, name)
            for name, rate in zip(names, rates)}


def filter_l1_norms(kernel) -> np.ndarray:
    """A (..., C_in, C_out) kernel (HWIO conv, or dense) -> (C_out,) L1 norms sum over all other axes of |W|."""
    kernel = np.asarray(kernel)
    return np.abs(kernel).sum(axis=tuple(range(kernel.ndim - 1)))


def largest_filters(scores: np.ndarray, rate: float, name: str) -> np.ndarray:
    """(C,) filter scores -> sorted indices of the int(C * (1 - rate)) largest (ties: the lower index is kept).

    ``name`` names the pruned layer in the errors: a rate outside [0, 1), or one that keeps no filter."""
    check_rate(f"pruning rate of {name}", rate)
    num_keep = int(len(scores) * (1 - rate))
    if num_keep < 1:
        raise ValueError(f"rate {rate} leaves {name} (with {len(scores)} filters) no filter; use a smaller rate")
    return np.sort(np.argsort(-scores, kind="stable")[:num_keep])


def on_host(surgery, tree):
    """``surgery`` (indexing or masking, on a NumPy array) applied to every array of ``tree`` on the host: a pruning
    runs once, and eagerly on the device it would compile one program per weight shape."""
    return jax.tree.map(lambda array: jnp.asarray(surgery(np.asarray(array))), tree)


def zeroed_outside(keep: np.ndarray):
    """The surgery that zeroes every output channel (last axis) that ``keep`` (C,) bool does not keep."""
    return lambda array: np.where(keep, array, np.zeros((), array.dtype))


def _classifier_rows(model: VGG, last_kept: np.ndarray) -> np.ndarray:
    """Rows of the classifier kernel that read the kept channels of the last conv."""
    if model.head_pooling == "avg":
        return last_kept
    positions = model.final_spatial_size**2
    return (last_kept[:, None] * positions + np.arange(positions)[None, :]).ravel()


def prune_filters(model: VGG, variables: dict, rates: Sequence[float]) -> tuple[VGG, dict]:
    """Physically removes the lowest-L1 filters of every conv.

    Args:
      model: a VGG.
      variables: its ``{'params', 'batch_stats'}``.
      rates: one rate in [0, 1) per conv, in forward order (``vgg16_paper_rates(p)`` for the paper's VGG16 scheme).

    Returns:
      ``(pruned_model, pruned_variables)``: a VGG with int(C * (1 - rate)) filters per conv and the sliced
      variables, computing what the original computes with the removed channels held at zero.
    """
    params, stats = variables["params"], variables["batch_stats"]
    kept = l1_kept_filters(model, params, rates)
    new_params, new_stats = dict(params), dict(stats)
    previous = np.arange(3)
    for name in conv_names(model):
        out = kept[name]
        new_params[name] = {"kernel": on_host(lambda x: x[:, :, previous][..., out], params[name]["kernel"]),
                            "bias": on_host(lambda x: x[out], params[name]["bias"])}
        bn = "bn" + name[4:]
        new_params[bn] = on_host(lambda x: x[out], params[bn])
        new_stats[bn] = on_host(lambda x: x[out], stats[bn])
        previous = out
    rows = _classifier_rows(model, previous)
    new_params["classifier"] = {"kernel": on_host(lambda x: x[rows], params["classifier"]["kernel"]),
                                "bias": params["classifier"]["bias"]}
    names = iter(conv_names(model))
    pruned = model.clone(stage_widths=tuple(tuple(len(kept[next(names)]) for _ in stage)
                                            for stage in model.stage_widths))
    return pruned, {"params": new_params, "batch_stats": new_stats}


def zero_filters(model: VGG, variables: dict, rates: Sequence[float]) -> dict:
    """The masked twin of ``prune_filters``: the same filters zeroed in place, with their BatchNorm folded to output
    zero (scale and bias 0), so the network computes exactly what the physically pruned one does."""
    kept = l1_kept_filters(model, variables["params"], rates)
    params = dict(variables["params"])
    for name in conv_names(model):
        keep = np.zeros(params[name]["kernel"].shape[-1], bool)
        keep[kept[name]] = True
        params[name] = on_host(zeroed_outside(keep), params[name])
        bn = "bn" + name[4:]
        params[bn] = on_host(zeroed_outside(keep), params[bn])
    return {"params": params, "batch_stats": variables["batch_stats"]}
