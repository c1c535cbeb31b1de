"""The ResNet family in torchvision's layout as a plain Flax linen module, and torchvision state dicts in / out.

Architecture (torchvision's ``resnet18/34/50``; images NHWC, float):

- stem ``"imagenet"``: ``conv1`` 7x7 stride 2 (padding 3) -> ``bn1`` -> ReLU -> 3x3 max-pool stride 2 (padding 1),
  so 224 px becomes 56x56. Stem ``"small"``: ``conv1`` 3x3 stride 1 (padding 1) -> ``bn1`` -> ReLU, no pool, for
  small inputs (64 px stays 64x64 into ``layer1``).
- stages ``layer1`` ... ``layer4`` of ``stage_sizes[i]`` blocks; stage i (1-based) has ``width * 2**(i-1)`` planes
  and every stage but the first halves the map in its first block. A ``"basic"`` block is 3x3 conv, BN, ReLU, 3x3
  conv, BN; a ``"bottleneck"`` block is 1x1, 3x3 (the strided one, as torchvision), 1x1 to 4x the planes, each with
  BN. The shortcut is the identity, or a strided 1x1 conv + BN (``downsample``) where the shape changes. ReLU after
  the sum. Convs have no bias.
- head: global average pool, then the linear ``fc``.

Pruned widths (``inner_widths``, ``stream_widths``; both None by default, the standard widths above) make a
physically smaller network of the same layout, as structured filter pruning returns it: the inner convs of a block
(conv1 of a basic block, conv1 and conv2 of a bottleneck) and each stage's residual stream (every block output of the
stage, and the stem where ``layer1.0``'s shortcut is the identity) may have fewer channels. Which shortcuts are
``downsample`` convs follows the standard widths, so it never changes with pruning. ``resnet_block_widths`` lists
the channels every conv outputs.

BatchNorm is torchvision's: momentum 0.1 (0.9 in Flax's convention), eps 1e-5, batch statistics when
``train=True`` (updating the ``batch_stats`` collection), running averages otherwise. One difference: PyTorch
updates ``running_var`` with the unbiased batch variance, Flax with the biased one.

Split points. Every block output and the stem output are sown into the ``intermediates`` collection under
torchvision-style names, in forward order (``resnet_layer_names``)::

    logits, state = model.apply(variables, images, mutable=["intermediates"])
    state["intermediates"]["layer4.2"]  # a 1-tuple: the (B, H, W, C) output of torchvision's model.layer4[2]

Every block is its own submodule, so ``capture_intermediates=True`` also records it. torchvision module names map
to linen module paths by joining each index to the name before it (``resnet_module_path``):

- torchvision ``conv1``, ``bn1``, ``fc``: linen ``conv1``, ``bn1``, ``fc``.
- torchvision ``layer{i}[{j}]`` (``layer{i}.{j}`` in its state dict): the block module ``layer{i}_{j}``; its output
  (after the final ReLU) is sown as ``"layer{i}.{j}"`` and, under ``capture_intermediates``, recorded at
  ``intermediates["layer{i}_{j}"]["__call__"]``.
- inside a block, ``conv1``/``bn1``/``conv2``/``bn2`` (and ``conv3``/``bn3`` in a bottleneck) keep their names;
  ``downsample[0]`` / ``downsample[1]`` (the shortcut conv and its BN) are ``downsample_0`` / ``downsample_1``.
- the stem output (torchvision's ``maxpool`` output, or ``relu`` for the small stem) has no module of its own: it is
  sown as ``"stem"``.

State dicts (``import_resnet`` / ``export_resnet``): torchvision's keys, e.g. ``conv1.weight`` (O,I,7,7),
``bn1.weight/bias/running_mean/running_var/num_batches_tracked``, ``layer1.0.conv1.weight``,
``layer2.0.downsample.0.weight``, ``layer2.0.downsample.1.running_var``, ``fc.weight`` (K, C), ``fc.bias`` (K,).
Conv weights OIHW <-> kernels HWIO, ``fc.weight`` <-> its transposed kernel (C, K). Files are read with
``load_state_dict``.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
import numpy as np
from flax import traverse_util

# Private helpers of the sibling VGG modules, shared so that both families initialise, report and convert alike.
from attrjax.models._torchvision import (_NUM_BATCHES_TRACKED, _TO_FLAX, _TO_TORCH, StateDict, _check_new_head,
                                        _listing, _permute, _strip_data_parallel_prefix, check_state_dict_fits,
                                        state_dict_from_variables)
from attrjax.models._vgg import _torch_bias_init, _torch_kernel_init, _variance_scaling

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "small")
_EXPANSION = {"basic": 1, "bottleneck": 4}  # block output channels / planes
_INNER_CONVS = {"basic": 1, "bottleneck": 2}  # convs of a block before the one that writes its output
# torchvision's conv init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), a plain (untruncated) normal.
_kaiming_fan_out = _variance_scaling(2.0, "fan_out", "normal")


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """3x3 max-pool, stride 2, padding 1 (PyTorch's ``MaxPool2d(3, 2, 1)``): (B,H,W,C) -> (B,(H-1)//2+1,...,C).

    The maximum of the nine strided shifts of the -inf-padded map rather than ``nn.max_pool``, whose gradient
    XLA:CPU lowers to a slow reduce-window + scatter (attribution methods differentiate through the stem).
    """
    out_height, out_width = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    shifts = [padded[:, dy:dy + 2 * out_height - 1:2, dx:dx + 2 * out_width - 1:2]
              for dy in range(3) for dx in range(3)]
    return jnp.max(jnp.stack(shifts), axis=0)


def _conv(features: int, size: int, strides: int, dtype: DTypeLike, name: str) -> nn.Conv:
    """A bias-free ``size`` x ``size`` conv with PyTorch's symmetric padding ``size // 2``."""
    return nn.Conv(features, (size, size), strides=strides, padding=size // 2, use_bias=False, dtype=dtype,
                   kernel_init=_kaiming_fan_out, name=name)


def _batch_norm(dtype: DTypeLike, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: (B,H,W,C_in) -> (B,H/strides,W/strides,planes).

    Attributes:
      planes: output channels of both 3x3 convs.
      strides: stride of the first conv and of the shortcut.
      downsample: whether the shortcut is a strided 1x1 conv + BN (needed when the shape changes).
      dtype: computation dtype (parameters stay float32).
      widths: output channels of (conv1, conv2) where pruning made them smaller; None: (planes, planes). The block
        then outputs ``widths[-1]`` channels.
    """

    planes: int
    strides: int = 1
    downsample: bool = False
    dtype: DTypeLike = jnp.float32
    widths: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        inner, features = self.widths or (self.planes, self.planes)
        y = _conv(inner, 3, self.strides, self.dtype, "conv1")(x)
        y = nn.relu(_batch_norm(self.dtype, "bn1")(y, use_running_average=not train))
        y = _conv(features, 3, 1, self.dtype, "conv2")(y)
        y = _batch_norm(self.dtype, "bn2")(y, use_running_average=not train)
        return nn.relu(y + _shortcut(x, features, self.strides, self.downsample, self.dtype, train))


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (stride on the 3x3 conv): (B,H,W,C_in) -> (B,H/strides,W/strides,4*planes).

    Attributes:
      planes: channels of the 1x1 and 3x3 convs; the block outputs ``4 * planes``.
      strides: stride of the 3x3 conv and of the shortcut.
      downsample: whether the shortcut is a strided 1x1 conv + BN (needed when the shape changes).
      dtype: computation dtype (parameters stay float32).
      widths: output channels of (conv1, conv2, conv3) where pruning made them smaller; None: (planes, planes,
        4 * planes). The block then outputs ``widths[-1]`` channels.
    """

    planes: int
    strides: int = 1
    downsample: bool = False
    dtype: DTypeLike = jnp.float32
    widths: tuple[int, int, int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        first, second, features = self.widths or (self.planes, self.planes, 4 * self.planes)
        y = _conv(first, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(_batch_norm(self.dtype, "bn1")(y, use_running_average=not train))
        y = _conv(second, 3, self.strides, self.dtype, "conv2")(y)
        y = nn.relu(_batch_norm(self.dtype, "bn2")(y, use_running_average=not train))
        y = _conv(features, 1, 1, self.dtype, "conv3")(y)
        y = _batch_norm(self.dtype, "bn3")(y, use_running_average=not train)
        return nn.relu(y + _shortcut(x, features, self.strides, self.downsample, self.dtype, train))


def _shortcut(x: jax.Array, features: int, strides: int, downsample: bool, dtype: DTypeLike, train: bool
              ) -> jax.Array:
    """The identity, or torchvision's ``downsample`` (1x1 conv ``downsample_0`` + BN ``downsample_1``).

    Called inside a block's compact ``__call__``, so the two modules become that block's children."""
    if not downsample:
        return x
    x = _conv(features, 1, strides, dtype, "downsample_0")(x)
    return _batch_norm(dtype, "downsample_1")(x, use_running_average=not train)


_BLOCK_MODULES = {"basic": BasicBlock, "bottleneck": Bottleneck}


class BlockSpec(NamedTuple):
    """One residual block of a ResNet: its torchvision name (``layer2.0``) and constructor arguments."""
    name: str
    planes: int
    strides: int
    downsample: bool


def block_specs(block: str, stage_sizes: tuple[int, ...], width: int) -> tuple[BlockSpec, ...]:
    """The blocks in forward order: stage i (1-based) has ``width * 2**(i-1)`` planes, stride 2 in its first block
    for i > 1, and a ``downsample`` shortcut wherever the stride or the channel count changes (as torchvision)."""
    expansion = _EXPANSION[block]
    specs, in_channels = [], width
    for stage, size in enumerate(stage_sizes, start=1):
        planes = width * 2 ** (stage - 1)
        for index in range(size):
            strides = 2 if stage > 1 and index == 0 else 1
            downsample = strides != 1 or in_channels != planes * expansion
            specs.append(BlockSpec(f"layer{stage}.{index}", planes, strides, downsample))
            in_channels = planes * expansion
    return tuple(specs)


class ResNet(nn.Module):
    """ResNet in torchvision's layout: images (B,H,W,3) float -> logits (B, num_classes).

    Attributes:
      block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50 and deeper).
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-34/50.
      num_classes: K, the logits' last axis.
      width: channels of the stem and planes of ``layer1`` (64 in torchvision; ``64 // divisor`` for narrow
        students). Stage i has ``width * 2**(i-1)`` planes.
      stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool, 4x smaller maps) or ``"small"`` (one 3x3/1 conv, no pool).
      dtype: computation dtype (parameters stay float32).
      inner_widths: per block in forward order, the output channels of its inner convs where pruning made them
        smaller: ``(conv1,)`` for a basic block, ``(conv1, conv2)`` for a bottleneck; None: the standard widths.
      stream_widths: per stage, the channels of its residual stream (every block output; also the stem output where
        ``layer1.0`` has no ``downsample``); None: the standard ``width * 2**(i-1)`` (times 4 for bottlenecks).

    Block outputs and the stem output are sown into ``intermediates`` (see the module docstring for names and the
    mapping to module paths).
    """

    block: str
    stage_sizes: tuple[int, ...]
    num_classes: int
    width: int = 64
    stem: str = "imagenet"
    dtype: DTypeLike = jnp.float32
    inner_widths: tuple[tuple[int, ...], ...] | None = None
    stream_widths: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Images (B,H,W,3) -> logits (B,K). ``train=True`` normalises with batch statistics and updates
        ``batch_stats`` (pass ``mutable=["batch_stats"]``)."""
        self._check_config()
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (batch, height, width, channels) in NHWC layout, got shape "
                             f"{tuple(x.shape)}; add a batch axis or transpose NCHW arrays with (0, 2, 3, 1)")
        x = self._stem(x, train)
        self.sow("intermediates", "stem", x)
        block_module = _BLOCK_MODULES[self.block]
        specs = block_specs(self.block, tuple(self.stage_sizes), self.width)
        for spec, widths in zip(specs, resnet_block_widths(self)):
            x = block_module(planes=spec.planes, strides=spec.strides, downsample=spec.downsample, dtype=self.dtype,
                             widths=widths, name=resnet_module_path(spec.name)[0])(x, train)
            self.sow("intermediates", spec.name, x)
        pooled = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_torch_kernel_init,
                        bias_init=_torch_bias_init(x.shape[-1]), name="fc")(pooled)

    def _stem(self, x: jax.Array, train: bool) -> jax.Array:
        """(B,H,W,3) -> (B,H/4,W/4,C) for the ImageNet stem, (B,H,W,C) for the small one; C = ``width`` unless
        pruning made it smaller (``resnet_stem_width``)."""
        imagenet = self.stem == "imagenet"
        x = _conv(resnet_stem_width(self), 7 if imagenet else 3, 2 if imagenet else 1, self.dtype, "conv1")(x)
        x = nn.relu(_batch_norm(self.dtype, "bn1")(x, use_running_average=not train))
        return max_pool_3x3_stride2(x) if imagenet else x

    def _check_config(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if not self.stage_sizes or min(self.stage_sizes) < 1:
            raise ValueError(f"stage_sizes must be one or more positive block counts, got {self.stage_sizes}")
        if self.width < 1 or self.num_classes < 1:
            raise ValueError(f"width and num_classes must be positive, got width={self.width}, "
                             f"num_classes={self.num_classes}")
        if self.stream_widths is not None and (len(self.stream_widths) != len(self.stage_sizes)
                                               or min(self.stream_widths) < 1):
            raise ValueError(f"stream_widths must be one positive channel count per stage ({len(self.stage_sizes)}),"
                             f" got {self.stream_widths}")
        if self.inner_widths is not None:
            num_blocks, per_block = sum(self.stage_sizes), _INNER_CONVS[self.block]
            if len(self.inner_widths) != num_blocks or any(
                    len(widths) != per_block or min(widths) < 1 for widths in self.inner_widths):
                raise ValueError(f"inner_widths must be, per block ({num_blocks}), a tuple of {per_block} positive "
                                 f"channel count(s) (the inner convs of a {self.block} block), got {self.inner_widths}")


def _base_width(width_divisor: int, base: int) -> int:
    if width_divisor < 1:
        raise ValueError(f"width_divisor must be a positive integer, got {width_divisor}")
    return max(1, base // width_divisor)


def resnet18(num_classes: int, *, width_divisor: int = 1, stem: str = "imagenet", dtype: DTypeLike = jnp.float32
             ) -> ResNet:
    """torchvision's ResNet-18 (basic blocks, (2, 2, 2, 2)); ``width_divisor`` 2/4/8 gives narrower students."""
    return ResNet(block="basic", stage_sizes=(2, 2, 2, 2), num_classes=num_classes,
                  width=_base_width(width_divisor, 64), stem=stem, dtype=dtype)


def resnet34(num_classes: int, *, width_divisor: int = 1, stem: str = "imagenet", dtype: DTypeLike = jnp.float32
             ) -> ResNet:
    """torchvision's ResNet-34 (basic blocks, (3, 4, 6, 3))."""
    return ResNet(block="basic", stage_sizes=(3, 4, 6, 3), num_classes=num_classes,
                  width=_base_width(width_divisor, 64), stem=stem, dtype=dtype)


def resnet50(num_classes: int, *, width_divisor: int = 1, stem: str = "imagenet", dtype: DTypeLike = jnp.float32
             ) -> ResNet:
    """torchvision's ResNet-50 (bottleneck blocks, (3, 4, 6, 3); 2048 channels into ``fc`` at full width)."""
    return ResNet(block="bottleneck", stage_sizes=(3, 4, 6, 3), num_classes=num_classes,
                  width=_base_width(width_divisor, 64), stem=stem, dtype=dtype)


def resnet_small(num_classes: int, *, stage_sizes: tuple[int, ...] = (1, 1, 1, 1), width_divisor: int = 1,
                 dtype: DTypeLike = jnp.float32) -> ResNet:
    """A laptop-scale ResNet for 64 px images: basic blocks, base width ``16 // width_divisor``, the small stem.

    At 64 px the maps are 64x64 (stem, ``layer1``), 32x32, 16x16 and 8x8 (``layer4``, 128 channels).
    """
    return ResNet(block="basic", stage_sizes=tuple(stage_sizes), num_classes=num_classes,
                  width=_base_width(width_divisor, 16), stem="small", dtype=dtype)


def resnet_stream_widths(model: ResNet) -> tuple[int, ...]:
    """Channels of each stage's residual stream (its block outputs): ``stream_widths``, or the standard
    ``width * 2**(i-1)`` (times 4 for bottlenecks)."""
    if model.stream_widths is not None:
        return tuple(model.stream_widths)
    return tuple(model.width * 2 ** stage * _EXPANSION[model.block] for stage in range(len(model.stage_sizes)))


def resnet_stem_width(model: ResNet) -> int:
    """Channels out of the stem: ``width``, or the first stage's stream width where ``layer1.0``'s shortcut is the
    identity (the stem output is then added to that stream, so a pruned stream prunes the stem too)."""
    first = block_specs(model.block, tuple(model.stage_sizes), model.width)[0]
    return model.width if first.downsample or model.stream_widths is None else model.stream_widths[0]


def resnet_block_widths(model: ResNet) -> tuple[tuple[int, ...], ...]:
    """Per block in forward order, the output channels of its convs: ``(conv1, conv2)`` for a basic block,
    ``(conv1, conv2, conv3)`` for a bottleneck. The last is the block output, its stage's stream width."""
    specs = block_specs(model.block, tuple(model.stage_sizes), model.width)
    streams = resnet_stream_widths(model)
    stage_of = [stage for stage, size in enumerate(model.stage_sizes) for _ in range(size)]
    inner = model.inner_widths or [(spec.planes,) * _INNER_CONVS[model.block] for spec in specs]
    return tuple(tuple(widths) + (streams[stage],) for widths, stage in zip(inner, stage_of))


def resnet_layer_names(model: ResNet) -> tuple[str, ...]:
    """The sown split points in forward order: ``("stem", "layer1.0", ..., "layer4.{n-1}")``."""
    return ("stem",) + tuple(spec.name for spec in block_specs(model.block, tuple(model.stage_sizes), model.width))


def resnet_module_path(name: str) -> tuple[str, ...]:
    """torchvision module name -> linen module path in ``ResNet``: each index joins the name before it.

    ``"layer4.2"`` -> ``("layer4_2",)``, ``"layer1.0.downsample.1"`` -> ``("layer1_0", "downsample_1")``,
    ``"conv1"`` -> ``("conv1",)``. ``"stem"`` has no module of its own: read it from the sown intermediates.
    """
    if name == "stem":
        raise ValueError("'stem' (conv1 -> bn1 -> ReLU [-> max-pool]) is no single module; read its output from the "
                         "sown intermediates: model.apply(variables, x, mutable=['intermediates'])")
    path: list[str] = []
    for part in name.split("."):
        if part.isdigit() and path:
            path[-1] += f"_{part}"
        else:
            path.append(part)
    return tuple(path)


# ---------------------------------------------------------------------------------------------------------------
# torchvision state dicts <-> ResNet variables

VariablePath = tuple[str, ...]  # (collection, *module path, leaf), as flax.traverse_util.flatten_dict writes it
# torchvision parameter or buffer -> (collection, Flax leaf), per module kind
_LEAVES: dict[str, dict[str, tuple[str, str] | None]] = {
    "conv": {"weight": ("params", "kernel")},
    "bn": {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
           "running_var": ("batch_stats", "var"), "num_batches_tracked": _NUM_BATCHES_TRACKED},
    "fc": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
}
_HEAD_KEYS = ("fc.weight", "fc.bias")


def _torchvision_modules(model: ResNet) -> Iterator[tuple[str, str]]:
    """(torchvision module name, kind) of every module with state, in torchvision's ``state_dict`` order."""
    yield "conv1", "conv"
    yield "bn1", "bn"
    convs = 3 if model.block == "bottleneck" else 2
    for spec in block_specs(model.block, tuple(model.stage_sizes), model.width):
        for index in range(1, convs + 1):
            yield f"{spec.name}.conv{index}", "conv"
            yield f"{spec.name}.bn{index}", "bn"
        if spec.downsample:
            yield f"{spec.name}.downsample.0", "conv"
            yield f"{spec.name}.downsample.1", "bn"
    yield "fc", "fc"


def _key_map(model: ResNet) -> dict[str, VariablePath | None]:
    """torchvision key -> variable path of ``model`` (None: ``num_batches_tracked``, not kept), in torchvision's
    order."""
    keys: dict[str, VariablePath | None] = {}
    for module, kind in _torchvision_modules(model):
        for leaf, target in _LEAVES[kind].items():
            keys[f"{module}.{leaf}"] = None if target is None else (target[0], *resnet_module_path(module), target[1])
    return keys


def _variable_shapes(model: ResNet) -> dict[VariablePath, tuple[int, ...]]:
    """Variable path -> shape of ``model``'s variables (no computation: ``jax.eval_shape`` of the init)."""
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(variables).items()}


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return _permute(flax_shape, _TO_TORCH[len(flax_shape)])


def import_resnet(state_dict: Mapping[str, np.ndarray], model: ResNet, *,
                  new_head_variables: Mapping[str, Any] | None = None) -> dict:
    """torchvision-layout state dict -> ``{'params', 'batch_stats'}`` for ``model`` (float32).

    Args:
      state_dict: torchvision ResNet keys (module docstring); ``num_batches_tracked`` optional and ignored; keys
        may carry DataParallel's ``module.`` prefix. ``fc.*`` is needed unless ``new_head_variables`` is given.
      model: the ResNet to fill; block type, stage sizes, width, stem and (with the checkpoint's head)
        ``num_classes`` must match. ``resnet_from_state_dict(state_dict)`` builds one that does.
      new_head_variables: variables of ``model`` (e.g. ``model.init(key, images)``) whose ``params['fc']``
        becomes the head; the checkpoint's ``fc`` (an ImageNet 1000-class one, say) is then dropped.

    Everything is checked before anything is built: one ``ValueError`` lists missing keys, unexpected keys, wrong
    shapes (PyTorch layout) and integer / bool weights, with hints on which model would fit. float16 / float64 /
    bfloat16 weights become float32; integers are never cast. ``import_resnet(export_resnet(v, m), m) == v``.
    """
    state_dict = _strip_data_parallel_prefix(state_dict)
    key_map = _key_map(model)
    shapes = _variable_shapes(model)
    if new_head_variables is not None:
        _check_new_head(new_head_variables, shapes, head="fc", init="model.init(key, images)")
        key_map = {key: path for key, path in key_map.items() if key not in _HEAD_KEYS}
        state_dict = {key: value for key, value in state_dict.items() if key not in _HEAD_KEYS}
    _check_state_dict(state_dict, model, key_map, shapes)

    flat: dict[VariablePath, jax.Array] = {}
    for key, path in key_map.items():
        if path is not None:
            value = np.asarray(state_dict[key], np.float32)
            flat[path] = jnp.asarray(np.transpose(value, _TO_FLAX[value.ndim]))
    if new_head_variables is not None:
        for leaf in ("kernel", "bias"):
            flat[("params", "fc", leaf)] = jnp.asarray(new_head_variables["params"]["fc"][leaf], jnp.float32)
    return traverse_util.unflatten_dict(flat)


def export_resnet(variables: Mapping[str, Any], model: ResNet) -> StateDict:
    """``{'params', 'batch_stats'}`` of ``model`` -> torchvision state dict (float32 NumPy, torchvision's key
    order and layouts: OIHW convs, (K, C) ``fc.weight``), with ``num_batches_tracked`` = int64 0 so that
    ``torchvision.models.resnet*().load_state_dict`` accepts it strictly (for the ImageNet stem)."""
    return state_dict_from_variables(variables, _key_map(model), _variable_shapes(model), _describe(model),
                                     hint="pass the variables this model's init or import_resnet returned")


def resnet_from_state_dict(state_dict: Mapping[str, np.ndarray], *, num_classes: int | None = None,
                           dtype: DTypeLike = jnp.float32) -> ResNet:
    """The ``ResNet`` a torchvision-layout state dict fits: block type (``conv3`` present: bottleneck), blocks per
    stage, width (``conv1``'s filters), stem (7x7 ``conv1``: imagenet, 3x3: small), ``num_classes`` (rows of
    ``fc.weight``, unless given: pass it to import with a new head), and, for a pruned network, ``inner_widths`` /
    ``stream_widths`` (the blocks' conv filters, where they differ from the standard widths)."""
    state_dict = _strip_data_parallel_prefix(state_dict)
    conv1 = state_dict.get("conv1.weight")
    if conv1 is None or np.ndim(conv1) != 4 or np.shape(conv1)[2] not in (3, 7):
        found = "missing" if conv1 is None else f"shape {np.shape(conv1)}"
        raise ValueError(f"not a torchvision ResNet state dict: conv1.weight should be a 7x7 (or, for the small "
                         f"stem, 3x3) conv (O, I, k, k), found {found}")
    stage_sizes = _blocks_per_stage(state_dict)
    if num_classes is None:
        if "fc.weight" not in state_dict:
            raise ValueError("the state dict has no fc.weight to read num_classes from: pass num_classes=...")
        num_classes = int(np.shape(state_dict["fc.weight"])[0])
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    model = ResNet(block=block, stage_sizes=stage_sizes, num_classes=num_classes,
                   width=int(np.shape(conv1)[0]), stem="imagenet" if np.shape(conv1)[2] == 7 else "small", dtype=dtype)
    return model.clone(**_pruned_widths(state_dict, model))


def _pruned_widths(state_dict: Mapping[str, np.ndarray], model: ResNet) -> dict[str, Any]:
    """``inner_widths`` / ``stream_widths`` read off the blocks' conv filters, those that differ from ``model``'s
    standard widths (a pruned checkpoint); none where a block conv is missing or not 4-D."""
    specs = block_specs(model.block, tuple(model.stage_sizes), model.width)
    convs = range(1, _INNER_CONVS[model.block] + 2)
    shapes = [[np.shape(state_dict.get(f"{spec.name}.conv{k}.weight", ())) for k in convs] for spec in specs]
    if any(len(shape) != 4 for block in shapes for shape in block):
        return {}
    found = tuple(tuple(int(shape[0]) for shape in block) for block in shapes)
    first_blocks = np.cumsum((0,) + tuple(model.stage_sizes[:-1]))
    widths = {"inner_widths": tuple(block[:-1] for block in found),
              "stream_widths": tuple(found[index][-1] for index in first_blocks)}
    standard = {"inner_widths": tuple(block[:-1] for block in resnet_block_widths(model)),
                "stream_widths": resnet_stream_widths(model)}
    return {field: value for field, value in widths.items() if value != standard[field]}


def _blocks_per_stage(state_dict: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    """Blocks per stage from the ``layer{i}.{j}.*`` keys; stages and blocks must be numbered 1.. / 0.. without gaps."""
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        match = re.match(r"layer(\d+)\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    stages = sorted(blocks)
    numbered = stages == list(range(1, len(stages) + 1)) and all(
        sorted(indices) == list(range(len(indices))) for indices in blocks.values())
    if not stages or not numbered:
        found = _listing([f"layer{stage}.{index}" for stage in stages for index in sorted(blocks[stage])]) or "none"
        raise ValueError("not a torchvision ResNet state dict: expected blocks layer1.0, layer1.1, ..., layer2.0, ... "
                         f"numbered without gaps, found {found}")
    return tuple(len(blocks[stage]) for stage in stages)


def _describe(model: ResNet) -> str:
    pruned = "".join(f", {field}={getattr(model, field)}" for field in ("inner_widths", "stream_widths")
                     if getattr(model, field) is not None)
    return (f"ResNet(block={model.block!r}, stage_sizes={tuple(model.stage_sizes)}, "
            f"num_classes={model.num_classes}, width={model.width}, stem={model.stem!r}{pruned})")


def _check_state_dict(state_dict: Mapping[str, np.ndarray], model: ResNet,
                      key_map: Mapping[str, VariablePath | None], shapes: Mapping[VariablePath, tuple[int, ...]]
                      ) -> None:
    """Raises one ValueError listing every way ``state_dict`` does not fit ``key_map``, with hints."""
    required = {key: _torch_shape(shapes[path]) for key, path in key_map.items() if path is not None}
    check_state_dict_fits(state_dict, required, key_map, _describe(model), lambda wrong: _hints(state_dict, model))


def _hints(state_dict: Mapping[str, np.ndarray], model: ResNet) -> list[str]:
    """What differs between the ResNet the checkpoint describes and ``model``, and how to build a matching one."""
    try:
        found = resnet_from_state_dict(state_dict, num_classes=model.num_classes)
    except ValueError as error:
        return [str(error)]
    hints = []
    if found.block != model.block:
        hints.append(f"the checkpoint has {found.block} blocks, the model {model.block} blocks "
                     f"(torchvision: resnet18/34 basic, resnet50 and deeper bottleneck); build it with "
                     f"block={found.block!r}")
    if tuple(found.stage_sizes) != tuple(model.stage_sizes):
        hints.append(f"the checkpoint has {tuple(found.stage_sizes)} blocks per stage, the model "
                     f"{tuple(model.stage_sizes)}")
    if found.width != model.width:
        hints.append(f"the checkpoint's conv1 has {found.width} filters, the model's width is {model.width}: "
                     f"build it with width={found.width} (or the width_divisor that gives it)")
    same_layout = (found.block, tuple(found.stage_sizes), found.width) == (model.block, tuple(model.stage_sizes),
                                                                           model.width)
    if same_layout and resnet_block_widths(found) != resnet_block_widths(model):
        name, found_widths, widths = next(
            (spec.name, a, b) for spec, a, b in zip(block_specs(model.block, tuple(model.stage_sizes), model.width),
                                                    resnet_block_widths(found), resnet_block_widths(model)) if a != b)
        hints.append(f"the checkpoint's {name} convs output {found_widths} channels, the model's {widths} (a pruned "
                     "network has other widths)")
    if found.stem != model.stem:
        hints.append(f"the checkpoint's conv1 is the {found.stem!r} stem, the model has stem={model.stem!r}")
    classes = np.shape(state_dict["fc.weight"])[0] if np.ndim(state_dict.get("fc.weight", ())) == 2 else None
    if classes is not None and classes != model.num_classes:
        hints.append(f"the checkpoint's fc predicts {classes} classes, the model {model.num_classes}: build the "
                     f"model with num_classes={classes}, or drop the checkpoint's head and start a new one with "
                     "import_resnet(state_dict, model, new_head_variables=model.init(key, images))")
    if hints:
        hints.append("resnet_from_state_dict(state_dict) builds the model this checkpoint fits")
    return hints


__all__ = ["BLOCKS", "STEMS", "BasicBlock", "BlockSpec", "Bottleneck", "ResNet", "block_specs", "export_resnet",
           "import_resnet", "max_pool_3x3_stride2", "resnet18", "resnet34", "resnet50", "resnet_block_widths",
           "resnet_from_state_dict", "resnet_layer_names", "resnet_module_path", "resnet_small", "resnet_stem_width",
           "resnet_stream_widths"]
