"""The VGG family of Park et al. (docs/method.md#models-and-layers) as a Flax linen module split for attribution.

Every network is a sequence of named points: ``input``, ``conv{s}_{j}`` (the ReLU output of the j-th conv of stage
s, 1-based), ``pool{s}`` (the max-pool closing stage s). ``features(x, layer=L)`` runs the network up to and
including L and ``head(a, layer=L)`` runs the rest: the remaining stages, a C,H,W flatten (PyTorch order, so
torchvision checkpoints and structured-pruning column masks map 1:1), dropout and the linear classifier. For any L,
``head(features(x, L), L) == __call__(x)``.

The paper matches attributions at ``pool5`` (7x7 at 227 px) and evaluates Grad-CAM at ``conv5_3`` (14x14).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from attrjax.models._split import FunctionalSplitModel

StageWidths = tuple[tuple[int, ...], ...]

VGG_LAYOUTS: dict[str, StageWidths] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
    # The first three stages of VGG16 / VGG11: at 64 px their last pool is 8x8, so the paper's structure (match at
    # the last pool, evaluate Grad-CAM at the last conv, a purely linear head) holds at laptop scale.
    "vgg16_s3": ((64, 64), (128, 128), (256, 256, 256)),
    "vgg11_s3": ((64,), (128,), (256, 256)),
}
"""Conv widths per stage of torchvision's VGG configurations (each stage ends in a 2x2 max-pool)."""


def _variance_scaling(scale: float, mode: str, distribution: str) -> nn.initializers.Initializer:
    """``jax.nn.initializers.variance_scaling`` for kernels (..., in, out), the same bits drawn as one flat vector.

    Threefry's bits depend on an element's flat index only, so a flat draw reshaped is the same array; but XLA:CPU
    compiles the draw of a 4-D conv kernel shape in seconds (3-7 s each here) and a 1-D one in a fraction of that,
    which made initialising a VGG on CPU take longer than training it for a few steps.
    """
    draw = {"uniform": lambda key, size, dtype: jax.random.uniform(key, (size,), dtype, -1),
            "normal": lambda key, size, dtype: jax.random.normal(key, (size,), dtype)}[distribution]

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        receptive_field = math.prod(shape[:-2])
        fans = {"fan_in": shape[-2] * receptive_field, "fan_out": shape[-1] * receptive_field}
        variance = jnp.array(scale / fans[mode], dtype)
        gain = jnp.sqrt(3 * variance) if distribution == "uniform" else jnp.sqrt(variance)
        return draw(key, math.prod(shape), dtype).reshape(shape) * gain

    return init


# PyTorch's default Conv/Linear init, which the paper's students use: U(+-1/sqrt(fan_in)) for weights and biases.
_torch_kernel_init = _variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    bound = 1.0 / fan_in**0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, floor (an odd last row/column is dropped, as PyTorch's MaxPool2d(2, 2)).

    Written as a reshape + max rather than ``nn.max_pool``: on CPU, XLA lowers the latter's gradient to a slow
    reduce-window + scatter (measured 8-14x slower backward; 2x slower batched Grad-CAM). Gradient ties within a
    window are split evenly instead of going to the first maximum; Grad-CAM's sensitivities (spatial sums of the
    gradient) are the same either way.
    """
    batch, height, width, channels = x.shape
    x = x[:, :height - height % 2, :width - width % 2]
    return jnp.max(x.reshape(batch, height // 2, 2, width // 2, 2, channels), axis=(2, 4))


def scale_widths(layout: StageWidths, width_divisor: int) -> StageWidths:
    """Divides every conv width by ``width_divisor`` (the paper's x2/x4/x8 students), keeping at least 1."""
    if width_divisor < 1:
        raise ValueError(f"width_divisor must be a positive integer, got {width_divisor}")
    return tuple(tuple(max(1, w // width_divisor) for w in stage) for stage in layout)


def layer_names(stage_widths: StageWidths) -> tuple[str, ...]:
    """All attribution points of a layout, in forward order, starting with ``input``."""
    names = ["input"]
    for s, stage in enumerate(stage_widths, start=1):
        names += [f"conv{s}_{j}" for j in range(1, len(stage) + 1)]
        names.append(f"pool{s}")
    return tuple(names)


class VGG(nn.Module):
    """VGG with BatchNorm and a dropout + linear head (no hidden FC layer), split at a named layer.

    Attributes:
      stage_widths: conv output widths per stage; a 2x2 max-pool closes every stage.
      num_classes: K, the logits' last axis.
      image_size: the square input side the head was built for (the flatten size depends on it).
      attribution_layer: the default split point of ``features``/``head``.
      dropout_rate: dropout before the classifier (0.5 in the paper).
      head_pooling: ``flatten`` (the paper: C,H,W flatten into the classifier, position-specific weights) or
        ``avg`` (global average pooling first: translation-invariant, far fewer classifier weights; learns much
        faster from small data where objects appear anywhere).
      dtype: computation dtype (parameters stay float32).
      activation: the nonlinearity after every conv + BatchNorm. ``model.clone(activation=guided_relu)`` is the
        guided-backprop network with the same variables (no hooks).
    """

    stage_widths: StageWidths
    num_classes: int
    image_size: int
    attribution_layer: str = "pool5"
    dropout_rate: float = 0.5
    head_pooling: str = "flatten"
    dtype: DTypeLike = jnp.float32
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    def setup(self):
        self._check_config()
        in_channels = 3
        for name, width in self._convs():
            fan_in = 9 * in_channels
            setattr(self, name, nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, kernel_init=_torch_kernel_init,
                                        bias_init=_torch_bias_init(fan_in), name=name))
            setattr(self, "bn" + name[4:], nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                                                        name="bn" + name[4:]))
            in_channels = width
        self.dropout = nn.Dropout(self.dropout_rate)
        fan_in = in_channels * (self.final_spatial_size**2 if self.head_pooling == "flatten" else 1)
        self.classifier = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_torch_kernel_init,
                                   bias_init=_torch_bias_init(fan_in))

    @property
    def layers(self) -> tuple[str, ...]:
        return layer_names(self.stage_widths)

    @property
    def final_spatial_size(self) -> int:
        size = self.image_size
        for _ in self.stage_widths:
            size //= 2
        return size

    def _convs(self) -> list[tuple[str, int]]:
        return [(f"conv{s}_{j}", w) for s, stage in enumerate(self.stage_widths, start=1)
                for j, w in enumerate(stage, start=1)]

    def _check_config(self):
        if self.final_spatial_size < 1:
            raise ValueError(f"image_size={self.image_size} is too small for {len(self.stage_widths)} pooling "
                             f"stages: it needs at least {2 ** len(self.stage_widths)} px")
        if self.attribution_layer not in self.layers:
            raise ValueError(self._unknown_layer_message(self.attribution_layer))
        if self.head_pooling not in ("flatten", "avg"):
            raise ValueError(f"head_pooling must be 'flatten' or 'avg', got {self.head_pooling!r}")

    def _unknown_layer_message(self, layer: str) -> str:
        return f"unknown attribution layer {layer!r}; this VGG has: {', '.join(self.layers)}"

    def _split_index(self, layer: str | None) -> int:
        layer = self.attribution_layer if layer is None else layer
        if layer not in self.layers:
            raise ValueError(self._unknown_layer_message(layer))
        return self.layers.index(layer)

    def _apply_point(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        if name.startswith("pool"):
            return max_pool_2x2(x)
        x = getattr(self, name)(x)
        x = getattr(self, "bn" + name[4:])(x, use_running_average=not train)
        return self.activation(x)

    def features(self, x: jax.Array, *, layer: str | None = None, train: bool = False) -> jax.Array:
        """Images (B,S,S,3) float -> activations A (B,H,W,C) at ``layer`` (default: ``attribution_layer``)."""
        self._check_images(x)
        stop = self._split_index(layer)
        for name in self.layers[1:stop + 1]:
            x = self._apply_point(name, x, train)
        return x

    def head(self, a: jax.Array, *, layer: str | None = None, train: bool = False) -> jax.Array:
        """Activations A (B,H,W,C) at ``layer`` -> logits (B,K). Dropout needs the ``dropout`` rng when training."""
        start = self._split_index(layer)
        for name in self.layers[start + 1:]:
            a = self._apply_point(name, a, train)
        if self.head_pooling == "avg":
            flat = jnp.mean(a, axis=(1, 2))
        else:
            flat = jnp.transpose(a, (0, 3, 1, 2)).reshape(a.shape[0], -1)  # C,H,W order, as PyTorch flattens
        flat = self.dropout(flat, deterministic=not train)
        return self.classifier(flat)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Images (B,S,S,3) -> logits (B,K)."""
        return self.head(self.features(x, train=train), train=train)

    def _check_images(self, x: jax.Array):
        expected = (self.image_size, self.image_size, 3)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (batch, {self.image_size}, {self.image_size}, 3) in NHWC "
                             f"layout, got {tuple(x.shape)}; resize the inputs or build the model with "
                             f"image_size={x.shape[1] if x.ndim == 4 else '...'}")


def vgg(layout: str | StageWidths = "vgg16", *, num_classes: int = 20, image_size: int = 227,
        width_divisor: int = 1, attribution_layer: str | None = None, dropout_rate: float = 0.5,
        head_pooling: str = "flatten", dtype: DTypeLike = jnp.float32) -> VGG:
    """Builds a VGG from a named layout (``VGG_LAYOUTS``) or explicit stage widths.

    ``width_divisor`` 2/4/8 gives the paper's VGG16_VOC_x2/x4/x8 students. ``attribution_layer`` defaults to the
    last pool (the paper's matching layer).
    """
    if isinstance(layout, str):
        if layout not in VGG_LAYOUTS:
            raise ValueError(f"unknown VGG layout {layout!r}; choose one of {sorted(VGG_LAYOUTS)} or pass widths")
        layout = VGG_LAYOUTS[layout]
    widths = scale_widths(tuple(tuple(stage) for stage in layout), width_divisor)
    if attribution_layer is None:
        attribution_layer = f"pool{len(widths)}"
    return VGG(stage_widths=widths, num_classes=num_classes, image_size=image_size,
               attribution_layer=attribution_layer, dropout_rate=dropout_rate, head_pooling=head_pooling,
               dtype=dtype)


def last_conv_layer(model: VGG) -> str:
    """Name of the last conv ReLU output (the paper's Grad-CAM evaluation layer, conv5_3 for VGG16)."""
    return [name for name in model.layers if name.startswith("conv")][-1]


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def init_variables(model: VGG, rng: jax.Array, batch_size: int = 1) -> dict:
    """Initial ``{'params', 'batch_stats'}`` for ``model``, from one compiled program per model and batch size."""
    images = jnp.zeros((batch_size, model.image_size, model.image_size, 3), jnp.float32)
    return dict(model.init({"params": rng}, images, train=False))


def layer_spatial_size(model: VGG, layer: str) -> int:
    """Side of the (square) activation map at ``layer``: the image size halved once per preceding pool."""
    if layer not in model.layers:
        raise ValueError(f"unknown attribution layer {layer!r}; this VGG has: {', '.join(model.layers)}")
    pools = sum(name.startswith("pool") for name in model.layers[:model.layers.index(layer) + 1])
    return model.image_size // 2**pools


def check_compatible(teacher: VGG, student: VGG, layers: Sequence[str] = ()):
    """Raises if a teacher/student pair cannot be distilled, or matched at ``layers``."""
    if teacher.num_classes != student.num_classes:
        raise ValueError(f"teacher predicts {teacher.num_classes} classes but the student {student.num_classes}; "
                         "distillation needs the same class axis")
    if teacher.image_size != student.image_size:
        raise ValueError(f"teacher expects {teacher.image_size} px images but the student {student.image_size} px")
    for layer in layers:  # a layer name fixes its stage, so equal image sizes give equal map sizes
        for role, model in (("teacher", teacher), ("student", student)):
            if layer not in model.layers:
                raise ValueError(f"the {role} has no layer {layer!r}; it has: {', '.join(model.layers)}")


__all__ = ["VGG", "VGG_LAYOUTS", "vgg", "scale_widths", "layer_names", "last_conv_layer", "init_variables",
           "check_compatible", "layer_spatial_size"]


def vgg_split_model(model: VGG) -> FunctionalSplitModel:
    """``model`` as a split model (``attrjax.models.SplitModel``), split by its own ``features``/``head`` methods at any
    of its layers."""

    def features(variables, images, layer, train, rng):
        del rng  # no dropout before the head
        out = model.apply(variables, images, layer=layer, train=train, method="features",
                          mutable=["batch_stats"] if train else False)
        return out if train else (out, {})

    def head(variables, activations, layer, train, rng):
        rngs = {"dropout": rng} if rng is not None else {}
        out = model.apply(variables, activations, layer=layer, train=train, method="head", rngs=rngs,
                          mutable=["batch_stats"] if train else False)
        return out if train else (out, {})

    return FunctionalSplitModel(init_fn=lambda rng, images: init_variables(model, rng), features_fn=features,
                                head_fn=head, layer_names=model.layers[1:])
