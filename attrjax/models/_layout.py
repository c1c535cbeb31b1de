"""Which intermediate outputs of a network are feature maps (B,H,W,C): the images' axes, traced through its jaxpr.

A feature map is an output whose axes are, in this order, the images' batch, height and width axes and a channel
axis. That is a property of how the output was computed, not of its shape (an NCHW transpose of an 8 x 8 map with
8 channels has the same shape), so it is read off the network's jaxpr: every value that depends on the images gets
a label per axis, starting from the images (batch, height, width, channels), and each primitive says what its
output axes are:

- elementwise primitives keep their operands' axes (an operand broadcast along an axis leaves it as it is);
- a convolution keeps the batch and the spatial axes it slides over, and its output feature axis is channels when
  its input feature axis was;
- a contraction with a weight (``dot_general``, a dense layer) gives channels when it contracts the channel axis
  with a kernel that has exactly one output axis (``(C_in, C_out)`` applied per position); a kernel with several
  output axes (an attention projection ``(D, heads, head_dim)``) gives mixed axes;
- transposes permute, reductions drop axes, pooling keeps them; a reshape keeps the axes it leaves unchanged, splits
  an axis into pieces and merges the pieces back (GroupNorm's groups), and mixes anything else; calls (``jit``,
  ``custom_jvp``) are traced into;
- any other primitive mixes all its output axes, so an output is never taken for a map without a reason.

Values that do not depend on the images (parameters, constants, random draws) have no labels.
"""

from __future__ import annotations

from typing import Callable, Sequence, cast

import jax
import jax.extend as jex

BATCH, HEIGHT, WIDTH, CHANNELS = "batch", "height", "width", "channels"
CONSTANT = "constant"  # an axis along which the value does not vary with the images (broadcast, size 1)
MIXED = "mixed"  # an axis that is none of the images' axes, or that attrjax cannot trace
IMAGE_AXES = (BATCH, HEIGHT, WIDTH, CHANNELS)
SPATIAL = (HEIGHT, WIDTH)

Axes = tuple[str, ...] | None  # one label per axis; None: the value does not depend on the images

ELEMENTWISE = frozenset({
    "abs", "add", "and", "atan2", "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "div", "eq",
    "erf", "erf_inv", "exp", "exp2", "expm1", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p",
    "logistic", "lt", "max", "min", "mul", "ne", "neg", "not", "or", "pow", "reduce_precision", "rem", "round",
    "rsqrt", "select_n", "sign", "sin", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh"})
IDENTITY = frozenset({"optimization_barrier", "sharding_constraint", "device_put"})  # each output is its operand
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                   "custom_vjp_call_jaxpr", "checkpoint", "remat"})
REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
                        "argmax", "argmin"})
WINDOWED = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"})
REGIONS = frozenset({"pad", "slice", "dynamic_slice"})  # a sub-region (or a padded one) of their first operand


def traced_axes(fn: Callable, images: jax.Array, *args) -> list[Axes]:
    """The axes of each output of ``fn(images, *args) -> list of arrays``, traced from the images (labelled
    ``IMAGE_AXES``); ``args`` (variables) have no labels. Nothing is computed.

    The images are traced as a batch of at least two: along an axis of size 1 a value cannot be told from one
    broadcast along it, so a batch of one (an example image) would lose its batch axis at the first reshape."""
    batch = jax.ShapeDtypeStruct((max(2, images.shape[0]), *images.shape[1:]), images.dtype)
    closed = jax.make_jaxpr(fn)(batch, *args)
    inputs: list[Axes] = [IMAGE_AXES] + [None] * (len(closed.jaxpr.invars) - 1)
    return jaxpr_axes(closed.jaxpr, inputs)


def is_feature_map(axes: Axes) -> bool:
    """Whether an output with these axes is a feature map (B,H,W,C) of the images."""
    return axes == IMAGE_AXES


def describe(axes: Axes) -> str:
    """``(batch, channels, height, width)``: the axes, for error messages."""
    return "(independent of the images)" if axes is None else f"({', '.join(axes)})"


def jaxpr_axes(jaxpr, inputs: Sequence[Axes]) -> list[Axes]:
    """The axes of a jaxpr's outputs, from those of its inputs (its constants have none)."""
    env: dict = dict(zip(jaxpr.invars, inputs))

    def read(var) -> Axes:
        return None if isinstance(var, jex.core.Literal) else env.get(var)

    for eqn in jaxpr.eqns:
        operands = [read(var) for var in eqn.invars]
        if all(axes is None for axes in operands):
            continue  # independent of the images
        for var, axes in zip(eqn.outvars, _equation_axes(eqn, operands)):
            env[var] = axes
    return [read(var) for var in jaxpr.outvars]


def _shape(var) -> tuple[int, ...]:
    return tuple(var.aval.shape)


def _merge(labels: Sequence[str]) -> str:
    """One axis of several operands: the label they agree on (constant axes aside), else mixed."""
    known = set(labels) - {CONSTANT}
    return CONSTANT if not known else known.pop() if len(known) == 1 else MIXED


def _elementwise(out_shape: tuple[int, ...], operands: Sequence[tuple[tuple[int, ...], Axes]]) -> tuple[str, ...]:
    """Operands of the output's rank; an operand of size 1 along an axis of the output is broadcast along it."""
    columns: list[list[str]] = [[] for _ in out_shape]
    for shape, axes in operands:
        if axes is None or len(axes) != len(out_shape):
            continue  # independent of the images, or a scalar
        for index, (size, label) in enumerate(zip(shape, axes)):
            columns[index].append(label if size == out_shape[index] else CONSTANT)
    return tuple(_merge(column) for column in columns)


def _equation_axes(eqn, operands: list[Axes]) -> list[Axes]:
    """The axes of one equation's outputs; at least one operand depends on the images."""
    name, params = eqn.primitive.name, eqn.params
    first, out_shape = operands[0], _shape(eqn.outvars[0])
    if name in ELEMENTWISE:
        return [_elementwise(out_shape, [(_shape(var), axes) for var, axes in zip(eqn.invars, operands)])]
    if name in ("concatenate", "stack"):  # pieces of one axis (channel groups, say), or along a new one
        merged = [_merge(column) for column in zip(*(axes for axes in operands if axes is not None))]
        return [tuple(merged) if name == "concatenate" else tuple(merged[:params["axis"]]) + (MIXED,)
                + tuple(merged[params["axis"]:])]
    if name in IDENTITY:
        return list(operands)
    if name in CALLS:
        inner = params.get("jaxpr", params.get("call_jaxpr"))
        return jaxpr_axes(getattr(inner, "jaxpr", inner), operands)
    if first is None:
        return [(MIXED,) * len(_shape(var)) for var in eqn.outvars]  # e.g. data-dependent indices into a constant
    if name == "transpose":
        return [tuple(first[axis] for axis in params["permutation"])]
    if name in REDUCTIONS:
        return [tuple(label for axis, label in enumerate(first) if axis not in params["axes"])]
    if name == "squeeze":
        return [tuple(label for axis, label in enumerate(first) if axis not in params["dimensions"])]
    if name == "broadcast_in_dim":
        return [_broadcast(_shape(eqn.invars[0]), first, out_shape, params["broadcast_dimensions"])]
    if name == "reshape" and params.get("dimensions") is None:
        return [_reshape(_shape(eqn.invars[0]), first, out_shape)]
    if name in WINDOWED:
        return [_windowed(first, params["window_dimensions"], params["window_strides"])]
    if name in REGIONS:
        return [first]
    if name == "split":
        return [first] * len(eqn.outvars)
    if name == "conv_general_dilated":
        return [_conv(first, operands[1], params)]
    if name == "dot_general":
        return [_dot(eqn, operands)]
    return [(MIXED,) * len(_shape(var)) for var in eqn.outvars]


def _broadcast(shape, axes, out_shape, dimensions) -> tuple[str, ...]:
    out = [CONSTANT] * len(out_shape)
    for axis, dimension in enumerate(dimensions):
        out[dimension] = axes[axis] if shape[axis] == out_shape[dimension] else CONSTANT
    return tuple(out)


def _reshape(shape, axes, out_shape) -> tuple[str, ...]:
    """A row-major reshape keeps the axes it leaves unchanged, splits an axis into pieces (``channels[0/2]``,
    ``channels[1/2]``: GroupNorm's groups) and merges the pieces of one axis, in order, back into it; new axes of size
    1 are constant, and any other merge mixes."""
    out: list[str] = []
    i = j = 0
    while i < len(shape) or j < len(out_shape):
        if i < len(shape) and j < len(out_shape) and shape[i] == out_shape[j]:
            out.append(axes[i])
            i, j = i + 1, j + 1
        elif j < len(out_shape) and out_shape[j] == 1:
            out.append(CONSTANT)
            j += 1
        elif i < len(shape) and shape[i] == 1:
            i += 1
        else:  # the shortest runs of axes on both sides with the same number of elements
            start_i, start_j, size_in, size_out = i, j, shape[i], out_shape[j]
            i, j = i + 1, j + 1
            while size_in != size_out:
                if size_in < size_out:
                    size_in, i = size_in * shape[i], i + 1
                else:
                    size_out, j = size_out * out_shape[j], j + 1
            out.extend(_regroup(tuple(axes[start_i:i]), j - start_j))
    return tuple(out)


def _regroup(axes: tuple[str, ...], count: int) -> tuple[str, ...]:
    """The labels of ``count`` axes that hold the elements of ``axes``: one axis split into pieces, or the pieces of
    one axis (each in its place, or constant: statistics broadcast over a group) merged."""
    if len(axes) == 1:
        return tuple(axes[0] if axes[0] in (CONSTANT, MIXED) else f"{axes[0]}[{index}/{count}]"
                     for index in range(count))
    known = [label for label in axes if label != CONSTANT]
    if not known:
        return (CONSTANT,) * count
    whole = known[0].rsplit("[", 1)[0]
    pieces = all(label in (CONSTANT, f"{whole}[{index}/{len(axes)}]") for index, label in enumerate(axes))
    return (whole,) if count == 1 and pieces else (MIXED,) * count


def _windowed(axes, window, strides) -> tuple[str, ...]:
    """Pooling keeps the axes it pools over when they are spatial; pooling across any other axis mixes it."""
    return tuple(label if label in SPATIAL or (size == 1 and stride == 1) else MIXED
                 for label, size, stride in zip(axes, window, strides))


def _conv(lhs: tuple[str, ...], rhs: Axes, params) -> tuple[str, ...]:
    """A convolution with a fixed kernel keeps the batch and spatial axes it slides over; its output features are
    channels when its input features were."""
    lhs_spec, _, out_spec = params["dimension_numbers"]
    out = [MIXED] * len(out_spec)
    if rhs is not None or params["batch_group_count"] != 1:
        return tuple(out)  # a kernel computed from the images, or batch-grouped
    out[out_spec[0]] = lhs[lhs_spec[0]]
    out[out_spec[1]] = CHANNELS if lhs[lhs_spec[1]] in (CHANNELS, CONSTANT) else MIXED
    for lhs_axis, out_axis in zip(lhs_spec[2:], out_spec[2:]):
        out[out_axis] = lhs[lhs_axis] if lhs[lhs_axis] in SPATIAL + (CONSTANT,) else MIXED
    return tuple(out)


def _dot(eqn, operands: list[Axes]) -> tuple[str, ...]:
    """``dot_general`` of the images' values with a weight: batch and free axes of the values keep their labels;
    the weight's free axis is channels when it is the only one and the channel axis was contracted."""
    (contract_lhs, contract_rhs), (batch_lhs, batch_rhs) = eqn.params["dimension_numbers"]
    out_rank = len(_shape(eqn.outvars[0]))
    if all(axes is not None for axes in operands):
        return (MIXED,) * out_rank  # both sides from the images (attention scores, say)
    data_side = 0 if operands[0] is not None else 1
    axes = cast(tuple[str, ...], operands[data_side])
    contracted = (contract_lhs, contract_rhs)[data_side]
    batched = (batch_lhs, batch_rhs)[data_side]
    data_free = [label for axis, label in enumerate(axes) if axis not in contracted and axis not in batched]
    weight_rank = len(_shape(eqn.invars[1 - data_side]))
    weight_free = weight_rank - len(contract_lhs) - len(batch_lhs)
    channels = weight_free == 1 and all(axes[axis] in (CHANNELS, CONSTANT) for axis in contracted)
    weight_labels = [CHANNELS if channels else MIXED] * weight_free
    free = data_free + weight_labels if data_side == 0 else weight_labels + data_free
    return tuple(axes[axis] for axis in batched) + tuple(free)
