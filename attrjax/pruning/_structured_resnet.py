"""Structured L1 filter pruning of ResNets (Li et al.'s recipe) that makes the network physically smaller: a new
``ResNet`` with fewer channels and the matching slices of its variables.

Within each block the inner convs are pruned: conv1 of a basic block, conv1 and conv2 of a bottleneck. Each keeps
its int(C * (1 - rate)) filters of largest L1 norm sum_{h,w,i} |W[h,w,i,o]| (the criterion of the VGG version,
``largest_filters``: ranked per conv, on the given weights, no data, ties to the lower index), and the slices follow
them: the conv's kernel, its BatchNorm's scale, bias, mean and variance, and the next conv's input channels. The
block outputs, which feed the residual sums, keep their channels.

With ``coupled=True`` each stage's residual stream is pruned too. Its channels are shared across the additions, so
they form one group: every block output of the stage (the last conv of each block, and the ``downsample`` conv of
its first block) and, where ``layer1.0``'s shortcut is the identity, the stem. A channel of the group is scored by
the sum of the L1 norms of all the convs that write to it, and a removed channel is removed from every writer, from
every reader (the first conv of each later block of the stage, the next stage's first conv and ``downsample``, or
the rows of ``fc`` after the last stage) and from the identity shortcuts that carry it.

``resnet_masked_twin`` zeroes the same channels in place of removing them (filters and BatchNorm scale and bias set
to 0, so they output exactly 0): the unpruned network then computes what the pruned one computes.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from flax import traverse_util

# Private helpers of the ResNet module, shared so that pruning reads the layout and shapes the model defines.
from attrjax.models._resnet import (_INNER_CONVS, ResNet, _variable_shapes, block_specs, resnet_module_path,
                                   resnet_stem_width, resnet_stream_widths)
from attrjax.pruning._structured import filter_l1_norms, largest_filters, on_host, zeroed_outside

ModulePath = tuple[str, ...]  # a conv's (or fc's) linen module path, e.g. ("layer2_0", "downsample_0")
Rates = float | Sequence[float]
_BATCH_NORM_OF = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "downsample_0": "downsample_1"}


class KeptChannels(NamedTuple):
    """Sorted indices of the channels a conv (or ``fc``) keeps: ``inputs`` of its C_in, ``outputs`` of its C_out."""
    inputs: np.ndarray
    outputs: np.ndarray


def _per_block(model: ResNet, rates: Rates) -> list[float]:
    """One rate (for every block) or one per block in forward order -> one per block."""
    names = [spec.name for spec in block_specs(model.block, tuple(model.stage_sizes), model.width)]
    array = np.asarray(rates, np.float64)
    if array.ndim == 0:
        return [float(array)] * len(names)
    if len(array) != len(names):
        raise ValueError(f"got {len(array)} pruning rates for the {len(names)} blocks of this ResNet "
                         f"({', '.join(names)}); pass one rate per block, in this order, or a single rate")
    return [float(rate) for rate in array]


def _per_stage(model: ResNet, rates: Rates, stream_rates: Rates | None) -> list[float]:
    """The rates of the stages' residual streams: ``stream_rates`` (one, or one per stage), else the one ``rates``."""
    num_stages = len(model.stage_sizes)
    if stream_rates is None:
        if np.ndim(rates) != 0:
            raise ValueError("coupled=True with per-block rates needs the rates of the residual streams: pass "
                             f"stream_rates=... (one rate, or one per stage: {num_stages})")
        stream_rates = rates
    array = np.asarray(stream_rates, np.float64)
    if array.ndim == 0:
        return [float(array)] * num_stages
    if len(array) != num_stages:
        raise ValueError(f"got {len(array)} stream_rates for the {num_stages} stages of this ResNet; pass one "
                         "rate per stage (layer1, layer2, ...) or a single rate")
    return [float(rate) for rate in array]


def stream_writers(model: ResNet, stage: int) -> list[ModulePath]:
    """The convs whose filters are the channels of stage ``stage``'s (0-based) residual stream: each block's last
    conv, the first block's ``downsample`` conv, and the stem's ``conv1`` where ``layer1.0``'s shortcut is the
    identity."""
    specs = block_specs(model.block, tuple(model.stage_sizes), model.width)
    first = sum(model.stage_sizes[:stage])
    last_conv = f"conv{_INNER_CONVS[model.block] + 1}"
    blocks = specs[first:first + model.stage_sizes[stage]]
    writers: list[ModulePath] = [(resnet_module_path(spec.name)[0], last_conv) for spec in blocks]
    if specs[first].downsample:
        writers.append((resnet_module_path(specs[first].name)[0], "downsample_0"))
    elif stage == 0:
        writers.append(("conv1",))
    return writers


def _kernel(params: Mapping[str, Any], path: ModulePath) -> np.ndarray:
    for name in path:
        params = params[name]
    return np.asarray(params["kernel"])


def _kept_streams(model: ResNet, params: Mapping[str, Any], stream_rates: list[float] | None) -> list[np.ndarray]:
    """Per stage, the kept channels of its residual stream: the largest summed L1 norms of its writers (all
    channels without ``stream_rates``)."""
    if stream_rates is None:
        return [np.arange(width) for width in resnet_stream_widths(model)]
    return [largest_filters(np.sum([filter_l1_norms(_kernel(params, path)) for path in stream_writers(model, stage)],
                                   axis=0), rate, f"the residual stream of layer{stage + 1}")
            for stage, rate in enumerate(stream_rates)]


def resnet_kept_channels(model: ResNet, params: Mapping[str, Any], rates: Rates, *, coupled: bool = False,
                         stream_rates: Rates | None = None) -> dict[ModulePath, KeptChannels]:
    """The channels every conv and ``fc`` keeps (module path -> ``KeptChannels``), in forward order.

    Args:
      model: a ResNet (possibly pruned already).
      params: its ``params``.
      rates: one rate in [0, 1) for every block, or one per block in forward order; a bottleneck prunes conv1 and
        conv2 at its rate. conv1 of a (C_out = 8) block at rate 0.3 keeps int(8 * 0.7) = 5 filters.
      coupled: also prune each stage's residual stream as one group (module docstring).
      stream_rates: with ``coupled``, one rate or one per stage for the streams; default: ``rates`` (then one
        number).
    """
    if stream_rates is not None and not coupled:
        raise ValueError("stream_rates prune the residual streams: pass coupled=True with them")
    block_rates = _per_block(model, rates)
    streams = _kept_streams(model, params, _per_stage(model, rates, stream_rates) if coupled else None)
    stem = streams[0] if ("conv1",) in stream_writers(model, 0) else np.arange(resnet_stem_width(model))
    stem_inputs = np.arange(_kernel(params, ("conv1",)).shape[-2])
    kept: dict[ModulePath, KeptChannels] = {("conv1",): KeptChannels(stem_inputs, stem)}
    current = stem
    specs = block_specs(model.block, tuple(model.stage_sizes), model.width)
    stages = [stage for stage, size in enumerate(model.stage_sizes) for _ in range(size)]
    for spec, stage, rate in zip(specs, stages, block_rates):
        block = resnet_module_path(spec.name)[0]
        inner = [largest_filters(filter_l1_norms(_kernel(params, (block, f"conv{k}"))), rate, f"{spec.name}.conv{k}")
                 for k in range(1, _INNER_CONVS[model.block] + 1)]
        for k, (inputs, outputs) in enumerate(zip([current] + inner, inner + [streams[stage]]), start=1):
            kept[(block, f"conv{k}")] = KeptChannels(inputs, outputs)
        if spec.downsample:
            kept[(block, "downsample_0")] = KeptChannels(current, streams[stage])
        current = streams[stage]
    kept[("fc",)] = KeptChannels(current, np.arange(model.num_classes))
    return kept


def _filter_leaves(path: ModulePath) -> list[tuple[str, ...]]:
    """Variable paths of the 1-D leaves indexed by the filters of conv ``path`` (its BatchNorm's), or fc's bias."""
    if path == ("fc",):
        return [("params", "fc", "bias")]
    bn = (*path[:-1], _BATCH_NORM_OF[path[-1]])
    return [("params", *bn, "scale"), ("params", *bn, "bias"), ("batch_stats", *bn, "mean"),
            ("batch_stats", *bn, "var")]


def _check_fits(model: ResNet, variables: Mapping[str, Any]) -> None:
    expected = _variable_shapes(model)
    found = {path: tuple(np.shape(leaf)) for path, leaf in traverse_util.flatten_dict(variables).items()
             if path[0] in ("params", "batch_stats")}
    if found != expected:
        wrong = sorted("/".join(path) for path in set(found) | set(expected) if found.get(path) != expected.get(path))
        raise ValueError(f"variables do not fit this ResNet ({len(wrong)} leaves missing or of another shape, e.g. "
                         f"{', '.join(wrong[:3])}); pass this model's own {{'params', 'batch_stats'}}")


def _pruned_model(model: ResNet, kept: Mapping[ModulePath, KeptChannels], coupled: bool) -> ResNet:
    """``model`` with the kept counts as its ``inner_widths`` (and, coupled, ``stream_widths``)."""
    specs = block_specs(model.block, tuple(model.stage_sizes), model.width)
    blocks = [resnet_module_path(spec.name)[0] for spec in specs]
    inner_widths = tuple(tuple(len(kept[(block, f"conv{k}")].outputs) for k in range(1, _INNER_CONVS[model.block] + 1))
                         for block in blocks)
    stream_widths = model.stream_widths
    if coupled:
        stream_widths = tuple(len(kept[stream_writers(model, stage)[0]].outputs)
                              for stage in range(len(model.stage_sizes)))
    return model.clone(inner_widths=inner_widths, stream_widths=stream_widths)


def prune_resnet_filters(model: ResNet, variables: Mapping[str, Any], rates: Rates, *, coupled: bool = False,
                         stream_rates: Rates | None = None) -> tuple[ResNet, dict]:
    """Physically removes the lowest-L1 filters of every block's inner convs (and, coupled, of the residual streams).

    Args:
      model: a ResNet.
      variables: its ``{'params', 'batch_stats'}``.
      rates: as ``resnet_kept_channels``.
      coupled: as ``resnet_kept_channels``.
      stream_rates: as ``resnet_kept_channels``.

    Returns:
      ``(pruned_model, pruned_variables)``: the same ResNet with ``inner_widths`` (and ``stream_widths``) set to the
      kept counts, and its variables: conv kernels (kh, kw, C_in, C_out) sliced on both channel axes, BatchNorm
      leaves (C,) on theirs, fc's kernel (C, K) on its rows. It computes what ``resnet_masked_twin`` computes.
    """
    _check_fits(model, variables)
    kept = resnet_kept_channels(model, variables["params"], rates, coupled=coupled, stream_rates=stream_rates)
    flat = dict(traverse_util.flatten_dict(variables))
    for path, channels in kept.items():
        kernel = ("params", *path, "kernel")
        flat[kernel] = on_host(lambda x: x[..., channels.inputs, :][..., channels.outputs], flat[kernel])
        for leaf in _filter_leaves(path):
            flat[leaf] = on_host(lambda x: x[channels.outputs], flat[leaf])
    return _pruned_model(model, kept, coupled), traverse_util.unflatten_dict(flat)


def resnet_masked_twin(model: ResNet, variables: Mapping[str, Any], rates: Rates, *, coupled: bool = False,
                       stream_rates: Rates | None = None) -> dict:
    """The variables of ``model`` with the channels that ``prune_resnet_filters`` removes zeroed instead: their conv
    filters and BatchNorm scale and bias are 0, so each outputs exactly 0 after BatchNorm (and ReLU), in eval and
    train mode alike. Same arguments as ``prune_resnet_filters``; same shapes as ``variables``."""
    _check_fits(model, variables)
    kept = resnet_kept_channels(model, variables["params"], rates, coupled=coupled, stream_rates=stream_rates)
    flat = dict(traverse_util.flatten_dict(variables))
    for path, channels in kept.items():
        kernel = ("params", *path, "kernel")
        keep = np.zeros(flat[kernel].shape[-1], bool)
        keep[channels.outputs] = True
        for leaf in [kernel] + [leaf for leaf in _filter_leaves(path) if leaf[0] == "params"]:
            flat[leaf] = on_host(zeroed_outside(keep), flat[leaf])
    return traverse_util.unflatten_dict(flat)


__all__ = ["KeptChannels", "prune_resnet_filters", "resnet_kept_channels", "resnet_masked_twin", "stream_writers"]
