"""Which intermediate outputs of a network are feature maps (B,H,W,C) or token sequences (B,T,D): the images'
axes, traced through its jaxpr.

A feature map is an output whose axes are, in this order, the images' batch, height and width axes and a channel
axis. A token sequence is an output whose axes are the batch, a tokens axis and a channel axis, the tokens being
``prefix`` tokens (class, distillation, register tokens) followed by an h x w grid of patch tokens, row-major; its
tokens axis is labelled ``tokens(4x4)`` (a 4 x 4 grid), or ``tokens(1+4x4)`` after one prefix token. Both are
properties of how the output was computed, not of its shape (an NCHW transpose of an 8 x 8 map with 8 channels has
the same shape), so they are read off the network's jaxpr: every value that depends on the images gets a label per
axis, starting from the images (batch, height, width, channels), and each primitive says what its output axes are:

- elementwise primitives keep their operands' axes (an operand broadcast along an axis leaves it as it is);
- a convolution keeps the batch and the spatial axes it slides over, and its output feature axis is channels when
  its input feature axis was;
- a contraction with a weight (``dot_general``, a dense layer) gives channels when the kernel has exactly one output
  axis and every contracted axis is feature-like (channels, pieces of channels, mixed or constant: ``(C_in, C_out)``
  applied per position, or an attention output projection ``(heads, head_dim, D)``); a kernel with several output
  axes (an attention projection ``(D, heads, head_dim)``) gives mixed axes. A contraction of two values that both
  depend on the images (attention scores Q Kᵀ, weights times values) keeps its operands' batch and free axes, so
  attention keeps the tokens axis of its queries;
- transposes permute, reductions drop axes, pooling keeps them; a reshape keeps the axes it leaves unchanged, splits
  an axis into pieces and merges the pieces back (GroupNorm's groups), merges height and width (or, after a patchify
  reshape, the outer pieces of height and width) into a tokens axis, splits a tokens axis without prefix back into
  height and width, and mixes anything else; concatenating image-independent tokens (a class token) before a tokens
  axis adds them to its prefix, and a slice keeps a tokens axis when it keeps the whole grid; calls (``jit``,
  ``custom_jvp``) are traced into;
- any other primitive mixes all its output axes, so an output is never taken for a map or a token sequence without
  a reason.

Values that do not depend on the images (parameters, constants, random draws) have no labels.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence, cast

import jax
import jax.extend as jex

BATCH, HEIGHT, WIDTH, CHANNELS = "batch", "height", "width", "channels"
CONSTANT = "constant"  # an axis along which the value does not vary with the images (broadcast, size 1)
MIXED = "mixed"  # an axis that is none of the images' axes, or that attrjax cannot trace
IMAGE_AXES = (BATCH, HEIGHT, WIDTH, CHANNELS)
SPATIAL = (HEIGHT, WIDTH)
FEATURE_LIKE = (CHANNELS, MIXED, CONSTANT)  # axes a dense layer may contract into channels (and channel pieces)

Axes = tuple[str, ...] | None  # one label per axis; None: the value does not depend on the images

ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "clamp",
    "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2",
    "expm1", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p", "logistic", "lt", "max", "min",
    "mul", "ne", "neg", "not", "or", "pow", "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign", "sin",
    "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "xor"})
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


class TokenGrid(NamedTuple):
    """The layout of a tokens axis: ``prefix`` tokens, then a ``height`` x ``width`` grid of patch tokens,
    row-major."""

    prefix: int
    height: int
    width: int


def tokens_label(grid: TokenGrid) -> str:
    """``tokens(1+4x4)`` (``tokens(4x4)`` without prefix): the label of a tokens axis laid out as ``grid``."""
    prefix = f"{grid.prefix}+" if grid.prefix else ""
    return f"tokens({prefix}{grid.height}x{grid.width})"


def token_grid(label: str) -> TokenGrid | None:
    """The layout of a tokens axis from its label (``tokens_label``); None for any other axis."""
    match = re.fullmatch(r"tokens\((?:(\d+)\+)?(\d+)x(\d+)\)", label)
    return None if match is None else TokenGrid(int(match[1] or 0), int(match[2]), int(match[3]))


def token_sequence_grid(axes: Axes) -> TokenGrid | None:
    """The token layout of an output with these axes when it is a token sequence (batch, tokens, channels) of the
    images, else None."""
    if axes is None or len(axes) != 3 or (axes[0], axes[2]) != (BATCH, CHANNELS):
        return None
    return token_grid(axes[1])


def _is_feature_like(label: str) -> bool:
    """Whether a dense layer may contract this axis into channels: no batch, spatial or tokens axis (nor a piece of
    one)."""
    return label in FEATURE_LIKE or label.startswith(f"{CHANNELS}[")


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
    if name == "concatenate":  # pieces of one axis (channel groups, a class token before the patch tokens)
        return [_concatenate([_shape(var) for var in eqn.invars], operands, params["dimension"])]
    if name == "stack":  # along a new axis
        merged = [_merge(column) for column in zip(*(axes for axes in operands if axes is not None))]
        return [tuple(merged[:params["axis"]]) + (MIXED,) + tuple(merged[params["axis"]:])]
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
    if name == "slice" and (params.get("strides") is None or set(params["strides"]) == {1}):
        return [_region(first, params["start_indices"], params["limit_indices"])]
    if name in REGIONS:
        return [tuple(MIXED if token_grid(label) else label for label in first)]
    if name == "split":
        return _split(first, params["sizes"], params["axis"])
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
            out.extend(_regroup(tuple(axes[start_i:i]), tuple(shape[start_i:i]), tuple(out_shape[start_j:j])))
    return tuple(out)


def _regroup(axes: tuple[str, ...], sizes: tuple[int, ...], out_sizes: tuple[int, ...]) -> tuple[str, ...]:
    """The labels of axes of ``out_sizes`` that hold the elements of ``axes`` (of ``sizes``): one axis split into
    pieces (a tokens axis without prefix split into its grid is height and width again), the pieces of one axis
    (each in its place, or constant: statistics broadcast over a group) merged, or height and width (or their outer
    pieces, after a patchify reshape) merged into tokens."""
    count = len(out_sizes)
    if len(axes) == 1:
        grid = token_grid(axes[0])
        if grid is not None and grid.prefix == 0 and out_sizes == (grid.height, grid.width):
            return SPATIAL
        return tuple(axes[0] if axes[0] in (CONSTANT, MIXED) else f"{axes[0]}[{index}/{count}]"
                     for index in range(count))
    if count == 1 and _is_patch_grid(axes):
        return (tokens_label(TokenGrid(0, *sizes)),)
    known = [label for label in axes if label != CONSTANT]
    if not known:
        return (CONSTANT,) * count
    whole = known[0].rsplit("[", 1)[0]
    pieces = all(label in (CONSTANT, f"{whole}[{index}/{len(axes)}]") for index, label in enumerate(axes))
    return (whole,) if count == 1 and pieces else (MIXED,) * count


def _is_patch_grid(axes: tuple[str, ...]) -> bool:
    """Whether these axes, merged, are a row-major grid of positions: height and width, or the outer pieces of
    height and width (``height[0/2]``, ``width[0/2]``: the patch grid of a patchify reshape) in this order."""
    if axes == SPATIAL:
        return True
    counts = [match[1] for side, label in zip(SPATIAL, axes) if (match := re.fullmatch(rf"{side}\[0/(\d+)\]", label))]
    return len(axes) == len(counts) == 2 and counts[0] == counts[1]


def _region(axes: tuple[str, ...], starts: Sequence[int], limits: Sequence[int]) -> tuple[str, ...]:
    """A sub-region of a value (a crop of a map) keeps its axes; along a tokens axis only when it keeps the whole
    grid (dropping prefix tokens, say), which it then sits in with a shorter prefix."""
    return tuple(_tokens_region(label, start, limit) for label, start, limit in zip(axes, starts, limits))


def _tokens_region(label: str, start: int, limit: int) -> str:
    grid = token_grid(label)
    if grid is None:
        return label
    whole_grid = start <= grid.prefix and limit == grid.prefix + grid.height * grid.width
    return tokens_label(grid._replace(prefix=grid.prefix - start)) if whole_grid else MIXED


def _split(axes: tuple[str, ...], sizes: Sequence[int], axis: int) -> list[Axes]:
    """Consecutive regions along ``axis``, of ``sizes``."""
    offsets = [sum(sizes[:index]) for index in range(len(sizes) + 1)]
    return [axes[:axis] + (_tokens_region(axes[axis], start, limit),) + axes[axis + 1:]
            for start, limit in zip(offsets, offsets[1:])]


def _concatenate(shapes: Sequence[tuple[int, ...]], operands: Sequence[Axes], dimension: int) -> tuple[str, ...]:
    """Pieces of one axis: each axis is what the operands that depend on the images agree on. Along a tokens axis,
    image-independent operands (a class token, registers) placed before the one that depends on the images join its
    prefix; anything else along it (tokens after the grid, two image-dependent pieces) leaves no grid: mixed."""
    merged = [_merge(column) for column in zip(*(axes for axes in operands if axes is not None))]
    grids = [token_grid(axes[dimension]) for axes in operands if axes is not None]
    if not any(grids):
        return tuple(merged)
    before = [shape[dimension] for shape, axes in zip(shapes, operands) if axes is None]
    grid = grids[0] if len(grids) == 1 and operands[-1] is not None else None
    merged[dimension] = MIXED if grid is None else tokens_label(grid._replace(prefix=grid.prefix + sum(before)))
    return tuple(merged)


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
    the weight's free axis is channels when it is the only one and every contracted axis is feature-like. Of two
    values that depend on the images (attention scores, attention weights times values): each batch axis is what
    both sides agree on, each free axis keeps its operand's label."""
    (contract_lhs, contract_rhs), (batch_lhs, batch_rhs) = eqn.params["dimension_numbers"]
    if all(axes is not None for axes in operands):
        lhs, rhs = cast(list[tuple[str, ...]], operands)
        batch = tuple(_merge((lhs[a], rhs[b])) for a, b in zip(batch_lhs, batch_rhs))
        return batch + tuple(label for axes, contracted, batched in ((lhs, contract_lhs, batch_lhs),
                                                                     (rhs, contract_rhs, batch_rhs))
                             for axis, label in enumerate(axes) if axis not in contracted and axis not in batched)
    data_side = 0 if operands[0] is not None else 1
    axes = cast(tuple[str, ...], operands[data_side])
    contracted = (contract_lhs, contract_rhs)[data_side]
    batched = (batch_lhs, batch_rhs)[data_side]
    data_free = [label for axis, label in enumerate(axes) if axis not in contracted and axis not in batched]
    weight_rank = len(_shape(eqn.invars[1 - data_side]))
    weight_free = weight_rank - len(contract_lhs) - len(batch_lhs)
    channels = weight_free == 1 and all(_is_feature_like(axes[axis]) for axis in contracted)
    weight_labels = [CHANNELS if channels else MIXED] * weight_free
    free = data_free + weight_labels if data_side == 0 else weight_labels + data_free
    return tuple(axes[axis] for axis in batched) + tuple(free)
