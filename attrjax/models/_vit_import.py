"""Pretrained Vision Transformer checkpoints -> attrjax ``ViT`` variables, from four layouts (``VIT_LAYOUTS``).

A checkpoint is a flat ``{key: array}`` (``load_state_dict`` reads ``.safetensors``, ``.npz`` and ``.pth`` without
torch). D is the width, H the heads, C = D/H, M the MLP width, p the patch, T the tokens, K the classes; PyTorch
linear weights are (out, in), its convs OIHW. Block ``i``'s keys, and the rest:

- ``"timm"`` (``timm.models.vision_transformer``): ``patch_embed.proj.weight`` (D,3,p,p) / ``.bias``,
  ``cls_token`` (1,1,D), ``pos_embed`` (1,T,D); ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv`` (3D, D) with the
  query, key and value rows stacked in that order, ``blocks.{i}.attn.proj`` (D,D), ``blocks.{i}.norm2``,
  ``blocks.{i}.mlp.fc1`` (M,D), ``blocks.{i}.mlp.fc2`` (D,M); ``norm``, ``head`` (K,D).
- ``"torchvision"`` (``torchvision.models.vit_*``): ``conv_proj``, ``class_token``, ``encoder.pos_embedding``;
  ``encoder.layers.encoder_layer_{i}.`` + ``ln_1``, ``self_attention.in_proj_weight`` (3D, D) /
  ``in_proj_bias``, ``self_attention.out_proj``, ``ln_2``, ``mlp.0``, ``mlp.3`` (files saved by older torchvision
  releases name them ``mlp.linear_1`` / ``mlp.linear_2``: both are read); ``encoder.ln``, ``heads.head``.
- ``"hf"`` (Hugging Face ``ViTForImageClassification``, e.g. ``model.safetensors``):
  ``vit.embeddings.patch_embeddings.projection``, ``vit.embeddings.cls_token``,
  ``vit.embeddings.position_embeddings``; ``vit.encoder.layer.{i}.`` + ``layernorm_before``,
  ``attention.attention.query`` / ``key`` / ``value`` (D,D), ``attention.output.dense``, ``layernorm_after``,
  ``intermediate.dense``, ``output.dense``; ``vit.layernorm``, ``classifier``. Their configs use
  ``layer_norm_eps=1e-12``: build the ``ViT`` with it.
- ``"big_vision"`` (``.npz`` of the JAX ViT code, flattened with "/"): ``embedding/kernel`` (p,p,3,D) / ``bias``,
  ``cls``, ``pos_embedding``; ``Transformer/encoderblock_{i}/`` + ``LayerNorm_0``,
  ``MultiHeadDotProductAttention_0/{query,key,value}/kernel`` (D,H,C) / ``bias`` (H,C), ``.../out/kernel``
  (H,C,D), ``LayerNorm_1``, ``MlpBlock_0/Dense_0``, ``MlpBlock_0/Dense_1``; ``Transformer/encoder_norm``,
  ``head``. big_vision files put ``params/`` before every key (only those keys are read). Also read, and reported
  under the names above: the original ViT release's files (no prefix, or ``opt/target/``;
  ``Transformer/posembed_input/pos_embedding``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``,
  ``MlpBlock_3``) and scanned encoders (``Transformer/encoderblock/...`` with the blocks stacked on axis 0).
  big_vision adds the position embedding before prepending the class token, so its ``pos_embedding`` has G*G rows
  and the class token none; that equals a zero row for the class token, which the import inserts. These models
  were trained with the tanh GELU: build the ``ViT`` with ``approximate_gelu=True`` to reproduce them exactly.

Position embeddings are not resampled: a checkpoint for another grid is refused, naming the grid and image size it
was trained for. Everything is checked before anything is built; one ``ValueError`` lists missing and unexpected
keys and wrong shapes (the first that does not fit first), with the sizes of the ViT the checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Private helpers of the sibling torchvision-format modules, shared so that every family reports alike.
from attrjax.models._torchvision import (_NOT_FLOAT_ADVICE, _check_new_head, _listing, _strip_data_parallel_prefix,
                                        check_state_dict_fits)
from attrjax.models._vit import ViT

VariablePath = tuple[str, ...]  # ("params", *module path, leaf), as flax.traverse_util.flatten_dict writes it


class _Entry(NamedTuple):
    """One checkpoint tensor: its key, the shape the model needs there, the variables it fills and how."""
    key: str
    shape: tuple[int, ...]
    targets: tuple[VariablePath, ...]
    convert: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # the checkpoint's array -> one array per target


def _copy(key: str, shape: tuple[int, ...], *path: str) -> _Entry:
    return _Entry(key, shape, (("params", *path),), lambda x: (x,))


# ---------------------------------------------------------------------------------------------------------------
# The PyTorch layouts (timm, torchvision, Hugging Face): one table of names each, one mapping


@dataclasses.dataclass(frozen=True)
class _TorchNames:
    """Where a PyTorch layout keeps each module. A module ``m`` holds ``m.weight`` / ``m.bias``, or ``mweight`` /
    ``mbias`` when its name ends in ``_`` (torchvision's ``in_proj_``); block modules follow ``block.format(i)``."""
    patches: str
    cls: str
    pos: str
    block: str
    norm1: str
    qkv: tuple[str, ...]  # one fused (3D, D) projection, or query, key and value apart
    out: str
    norm2: str
    fc1: str
    fc2: str
    norm: str
    head: str


def _weight(module: str) -> str:
    return module + ("weight" if module.endswith("_") else ".weight")


def _bias(module: str) -> str:
    return module + ("bias" if module.endswith("_") else ".bias")


def _layer_norm(module: str, width: int, *path: str) -> list[_Entry]:
    return [_copy(_weight(module), (width,), *path, "scale"), _copy(_bias(module), (width,), *path, "bias")]


def _linear(module: str, outputs: int, inputs: int, *path: str) -> list[_Entry]:
    """A PyTorch Linear (out, in) -> a Dense kernel (in, out)."""
    return [_Entry(_weight(module), (outputs, inputs), (("params", *path, "kernel"),), lambda w: (w.T,)),
            _copy(_bias(module), (outputs,), *path, "bias")]


def _heads_in(module: str, names: tuple[str, ...], model: ViT, block: str) -> list[_Entry]:
    """Query / key / value Linears (rows stacked in ``names``' order when fused: (len*D, D)) -> DenseGeneral
    kernels (D, H, C) and biases (H, C)."""
    width, heads = model.width, model.num_heads
    split = len(names)
    kernels = tuple(("params", block, name, "kernel") for name in names)
    biases = tuple(("params", block, name, "bias") for name in names)
    return [
        _Entry(_weight(module), (split * width, width), kernels,
               lambda w: tuple(part.T.reshape(width, heads, -1) for part in np.split(w, split))),
        _Entry(_bias(module), (split * width,), biases,
               lambda b: tuple(part.reshape(heads, -1) for part in np.split(b, split))),
    ]


def _heads_out(module: str, model: ViT, block: str) -> list[_Entry]:
    """The output projection Linear (D, D) -> a DenseGeneral kernel (H, C, D)."""
    width, heads = model.width, model.num_heads
    return [_Entry(_weight(module), (width, width), (("params", block, "out", "kernel"),),
                   lambda w: (w.T.reshape(heads, -1, width),)),
            _copy(_bias(module), (width,), block, "out", "bias")]


def _torch_entries(names: _TorchNames, model: ViT) -> list[_Entry]:
    width, patch = model.width, model.patch
    entries = [_Entry(_weight(names.patches), (width, 3, patch, patch), (("params", "embedding", "patches", "kernel"),),
                      lambda w: (np.transpose(w, (2, 3, 1, 0)),)),
               _copy(_bias(names.patches), (width,), "embedding", "patches", "bias")]
    if model.pool == "token":
        entries.append(_copy(names.cls, (1, 1, width), "embedding", "cls"))
    entries.append(_copy(names.pos, (1, model.num_tokens, width), "embedding", "pos_embedding"))
    for index in range(model.depth):
        prefix, block = names.block.format(index), f"block{index}"
        entries += _layer_norm(prefix + names.norm1, width, block, "norm1")
        if len(names.qkv) == 1:
            entries += _heads_in(prefix + names.qkv[0], ("query", "key", "value"), model, block)
        else:
            for module, name in zip(names.qkv, ("query", "key", "value")):
                entries += _heads_in(prefix + module, (name,), model, block)
        entries += _heads_out(prefix + names.out, model, block)
        entries += _layer_norm(prefix + names.norm2, width, block, "norm2")
        entries += _linear(prefix + names.fc1, model.mlp_dim, width, block, "fc1")
        entries += _linear(prefix + names.fc2, width, model.mlp_dim, block, "fc2")
    return entries + _layer_norm(names.norm, width, "norm") + _linear(names.head, model.num_classes, width, "head")


_TIMM = _TorchNames(patches="patch_embed.proj", cls="cls_token", pos="pos_embed", block="blocks.{}.", norm1="norm1",
                    qkv=("attn.qkv",), out="attn.proj", norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2", norm="norm",
                    head="head")
_TORCHVISION = _TorchNames(patches="conv_proj", cls="class_token", pos="encoder.pos_embedding",
                           block="encoder.layers.encoder_layer_{}.", norm1="ln_1", qkv=("self_attention.in_proj_",),
                           out="self_attention.out_proj", norm2="ln_2", fc1="mlp.0", fc2="mlp.3", norm="encoder.ln",
                           head="heads.head")
_HF = _TorchNames(patches="vit.embeddings.patch_embeddings.projection", cls="vit.embeddings.cls_token",
                  pos="vit.embeddings.position_embeddings", block="vit.encoder.layer.{}.", norm1="layernorm_before",
                  qkv=("attention.attention.query", "attention.attention.key", "attention.attention.value"),
                  out="attention.output.dense", norm2="layernorm_after", fc1="intermediate.dense",
                  fc2="output.dense", norm="vit.layernorm", head="classifier")


def _torchvision_current_names(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Older torchvision releases named the MLP's Linears ``mlp.linear_1`` / ``mlp.linear_2``, now ``mlp.0`` /
    ``mlp.3``."""
    return {key.replace(".mlp.linear_1.", ".mlp.0.").replace(".mlp.linear_2.", ".mlp.3."): value
            for key, value in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------------
# big_vision: the model's own parameter tree, under other module names

_BIG_VISION_PREFIXES = ("params/", "opt/target/", "")
_OLD_BLOCK_NAMES = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
                    "MlpBlock_3": "MlpBlock_0"}  # the original ViT release -> big_vision
_BIG_VISION_MODULES = {"norm1": "LayerNorm_0", "query": "MultiHeadDotProductAttention_0/query",
                       "key": "MultiHeadDotProductAttention_0/key", "value": "MultiHeadDotProductAttention_0/value",
                       "out": "MultiHeadDotProductAttention_0/out", "norm2": "LayerNorm_1",
                       "fc1": "MlpBlock_0/Dense_0", "fc2": "MlpBlock_0/Dense_1"}


def _big_vision_key(path: VariablePath) -> str:
    """A ``ViT`` variable path -> its big_vision key: ``("params", "block3", "fc1", "kernel")`` ->
    ``"Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel"``."""
    module, leaf = path[1:-1], path[-1]
    if module == ("embedding",):
        return leaf  # cls, pos_embedding
    if module == ("embedding", "patches"):
        return f"embedding/{leaf}"
    if module == ("norm",):
        return f"Transformer/encoder_norm/{leaf}"
    if module == ("head",):
        return f"head/{leaf}"
    block, layer = module
    return f"Transformer/encoderblock_{block[len('block'):]}/{_BIG_VISION_MODULES[layer]}/{leaf}"


def _big_vision_entries(model: ViT) -> list[_Entry]:
    return [_copy(_big_vision_key(path), shape, *path[1:]) for path, shape in _variable_shapes(model).items()]


def _big_vision_current_names(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parameters under big_vision's current names: the prefix dropped (keys outside it, an optimiser's state, are
    not read), scanned blocks unstacked, the original release's names renamed, and a class token given the zero
    position-embedding row that adding the embedding before prepending the token amounts to."""
    prefix = next(prefix for prefix in _BIG_VISION_PREFIXES if prefix + "embedding/kernel" in state_dict)
    params = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    renamed: dict[str, np.ndarray] = {}
    for key, value in params.items():
        if key.startswith("Transformer/encoderblock/"):  # a scanned encoder: blocks stacked on axis 0
            for index, block_value in enumerate(value):
                renamed[key.replace("encoderblock/", f"encoderblock_{index}/")] = block_value
            continue
        for old, new in _OLD_BLOCK_NAMES.items():
            key = key.replace(f"/{old}/", f"/{new}/")
        renamed[key] = value
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in renamed:
            renamed["pos_embedding"] = renamed.pop(old)
    position = renamed.get("pos_embedding")
    if "cls" in renamed and position is not None and np.ndim(position) == 3 and _is_square(position.shape[1]):
        renamed["pos_embedding"] = np.concatenate([np.zeros_like(position[:, :1]), position], axis=1)
    return renamed


# ---------------------------------------------------------------------------------------------------------------
# The layouts, told apart by their keys


@dataclasses.dataclass(frozen=True)
class _Layout:
    """markers: keys that only this layout's checkpoints have (any one tells it); normalise: the state dict under
    the names ``entries`` reads; entries: the model's tensors in forward order. For the sizes a checkpoint holds:
    block, a regex whose group is a block's index; patches / fc1 / head / pos, the keys whose shapes give the width
    and patch, the MLP width, the classes and the tokens (in PyTorch or Flax layout, as ``torch_layout`` says);
    cls, the class token's key (none: global average pooling)."""
    markers: tuple[str, ...]
    normalise: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    entries: Callable[[ViT], list[_Entry]]
    block: str
    patches: str
    fc1: str
    head: str
    pos: str
    cls: str
    torch_layout: bool


def _torch_layout(names: _TorchNames, normalise: Callable[[dict], dict] = dict) -> _Layout:
    return _Layout(markers=(_weight(names.patches),), normalise=normalise,
                   entries=lambda model: _torch_entries(names, model),
                   block=re.escape(names.block).replace(re.escape("{}"), r"(\d+)"), patches=_weight(names.patches),
                   fc1=_weight(names.block.format(0) + names.fc1), head=_weight(names.head), pos=names.pos,
                   cls=names.cls, torch_layout=True)


_LAYOUTS = {
    "timm": _torch_layout(_TIMM),
    "torchvision": _torch_layout(_TORCHVISION, _torchvision_current_names),
    "hf": _torch_layout(_HF),
    "big_vision": _Layout(markers=tuple(prefix + "embedding/kernel" for prefix in _BIG_VISION_PREFIXES),
                          normalise=_big_vision_current_names, entries=_big_vision_entries,
                          block=r"Transformer/encoderblock_(\d+)/", patches="embedding/kernel",
                          fc1="Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", head="head/kernel",
                          pos="pos_embedding", cls="cls", torch_layout=False),
}
VIT_LAYOUTS = tuple(_LAYOUTS)
"""The checkpoint layouts ``import_vit`` reads (``layout=``): timm, torchvision, Hugging Face and big_vision."""


def detect_vit_layout(state_dict: Mapping[str, np.ndarray]) -> str:
    """Which of ``VIT_LAYOUTS`` a ViT checkpoint is in, told by its patch-embedding key."""
    keys = _strip_data_parallel_prefix(state_dict).keys()
    found = [name for name, layout in _LAYOUTS.items() if any(marker in keys for marker in layout.markers)]
    if not found:
        known = "; ".join(f"{name}: {' or '.join(layout.markers)}" for name, layout in _LAYOUTS.items())
        raise ValueError(f"cannot tell which ViT layout this checkpoint is in: it has none of the patch-embedding "
                         f"keys that mark the layouts ({known}). Its keys: {_listing(sorted(keys))}. If it is one of "
                         "them under other names, rename its keys; the layouts are described in "
                         "attrjax.models.import_vit's documentation")
    return found[0]


# ---------------------------------------------------------------------------------------------------------------
# The shared import


def import_vit(state_dict: Mapping[str, np.ndarray], model: ViT, *, layout: str | None = None,
               new_head_variables: Mapping[str, Any] | None = None) -> dict:
    """A pretrained ViT checkpoint -> ``{'params'}`` for ``model`` (float32).

    Args:
      state_dict: a flat ``{key: array}``, e.g. from ``load_state_dict(path)``, in one of ``VIT_LAYOUTS`` (see the
        module docstring; keys may carry DataParallel's ``module.`` prefix).
      model: the ``ViT`` to fill; width, depth, MLP width, patch, image size (the position embedding's grid),
        pooling and, with the checkpoint's head, ``num_classes`` must match. ``num_heads`` is not recorded in the
        PyTorch layouts: take it from the checkpoint's source (the ``vit_*16`` constructors use the standard ones).
      layout: one of ``VIT_LAYOUTS``; None: told from the keys (``detect_vit_layout``).
      new_head_variables: variables of ``model`` (e.g. ``model.init(key, images)``) whose ``params['head']``
        becomes the head; the checkpoint's head (an ImageNet one, say) is then dropped.

    Raises ``ValueError`` for an unknown or undetectable layout, for integer / bool tensors, and, listing every
    problem at once, for missing keys, unexpected keys and wrong shapes (in the checkpoint's layout), with the sizes
    of the ViT the checkpoint holds. float16 / float64 / bfloat16 weights become float32.
    """
    state_dict = _strip_data_parallel_prefix(state_dict)
    if layout is None:
        layout = detect_vit_layout(state_dict)
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown ViT layout {layout!r}: use one of {', '.join(VIT_LAYOUTS)}, or layout=None to "
                         "tell it from the keys")
    spec = _LAYOUTS[layout]
    state_dict = spec.normalise(state_dict)
    entries = spec.entries(model)
    if new_head_variables is not None:
        _check_new_head(new_head_variables, _variable_shapes(model), head="head", init="model.init(key, images)")
        head_keys = {entry.key for entry in entries if entry.targets[0][1] == "head"}
        entries = [entry for entry in entries if entry.key not in head_keys]
        state_dict = {key: value for key, value in state_dict.items() if key not in head_keys}
    _check_floating(state_dict, entries)
    check_state_dict_fits(state_dict, {entry.key: entry.shape for entry in entries}, {entry.key for entry in entries},
                          f"{_describe(model)} ({layout} layout)", lambda wrong: _hints(state_dict, spec, model))

    flat: dict[VariablePath, jax.Array] = {}
    for entry in entries:
        for path, value in zip(entry.targets, entry.convert(np.asarray(state_dict[entry.key], np.float32))):
            flat[path] = jnp.asarray(value)
    if new_head_variables is not None:
        for leaf in ("kernel", "bias"):
            flat[("params", "head", leaf)] = jnp.asarray(new_head_variables["params"]["head"][leaf], jnp.float32)
    return traverse_util.unflatten_dict(flat)


def _variable_shapes(model: ViT) -> dict[VariablePath, tuple[int, ...]]:
    """Variable path -> shape of ``model``'s variables, in creation (forward) order; nothing is computed."""
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(variables).items()}


def _check_floating(state_dict: Mapping[str, np.ndarray], entries: list[_Entry]) -> None:
    not_float = [f"{entry.key} ({np.asarray(state_dict[entry.key]).dtype})" for entry in entries
                 if entry.key in state_dict and not jnp.issubdtype(np.asarray(state_dict[entry.key]).dtype,
                                                                   jnp.floating)]
    if not_float:
        raise ValueError(f"cannot import this ViT checkpoint: integer or bool tensors where float weights are "
                         f"expected ({len(not_float)}): {_listing(not_float)}. {_NOT_FLOAT_ADVICE}")


def _describe(model: ViT) -> str:
    return (f"ViT(num_classes={model.num_classes}, image_size={model.image_size}, patch={model.patch}, "
            f"width={model.width}, depth={model.depth}, num_heads={model.num_heads}, mlp_dim={model.mlp_dim}, "
            f"pool={model.pool!r})")


def _is_square(count: int) -> bool:
    return math.isqrt(count) ** 2 == count


def _checkpoint_sizes(state_dict: Mapping[str, np.ndarray], spec: _Layout) -> dict[str, Any]:
    """The ViT sizes the checkpoint's shapes show (those it has keys for): width, patch, depth, mlp_dim,
    num_classes, pool and the image size its position embedding was trained for."""
    shapes = {key: np.shape(value) for key, value in state_dict.items()}
    sizes: dict[str, Any] = {}
    patches = shapes.get(spec.patches, ())
    if len(patches) == 4:
        sizes["width"], sizes["patch"] = (patches[0], patches[2]) if spec.torch_layout else (patches[3], patches[0])
    blocks = {int(match[1]) for match in (re.match(spec.block, key) for key in shapes) if match}
    if blocks:
        sizes["depth"] = max(blocks) + 1
    fc1, head = shapes.get(spec.fc1, ()), shapes.get(spec.head, ())
    if len(fc1) == 2:
        sizes["mlp_dim"] = fc1[0] if spec.torch_layout else fc1[1]
    if len(head) == 2:
        sizes["num_classes"] = head[0] if spec.torch_layout else head[1]
    sizes["pool"] = "token" if spec.cls in shapes else "gap"
    position = shapes.get(spec.pos, ())
    grid_tokens = position[1] - (sizes["pool"] == "token") if len(position) == 3 else 0
    if _is_square(grid_tokens) and "patch" in sizes:
        sizes["image_size"] = math.isqrt(grid_tokens) * sizes["patch"]
    return sizes


def _hints(state_dict: Mapping[str, np.ndarray], spec: _Layout, model: ViT) -> list[str]:
    """How the ViT the checkpoint holds differs from ``model``, and what to build instead."""
    found = _checkpoint_sizes(state_dict, spec)
    differs = {name: value for name, value in found.items() if value != getattr(model, name)}
    hints = []
    if differs:
        hints.append("the checkpoint holds a ViT with " + ", ".join(f"{name}={value!r}" for name, value in
                                                                    found.items())
                     + "; the model differs in " + ", ".join(f"{name}={getattr(model, name)!r}" for name in differs)
                     + ": build the ViT with the checkpoint's sizes (and the num_heads of its source)")
    if "image_size" in differs:
        hints.append("position embeddings are not resampled to another grid: import at the checkpoint's "
                     f"image_size={found['image_size']}")
    if "num_classes" in differs:
        hints.append("or keep the model's classes and start a new head: import_vit(state_dict, model, "
                     "new_head_variables=model.init(key, images))")
    if spec is _LAYOUTS["timm"] and "fc_norm.weight" in state_dict:
        hints.append("this timm model normalises after pooling (fc_norm, timm's global_pool='avg'); attrjax's ViT "
                     "normalises the tokens before pooling, so it cannot hold these weights")
    return hints


__all__ = ["VIT_LAYOUTS", "detect_vit_layout", "import_vit"]
