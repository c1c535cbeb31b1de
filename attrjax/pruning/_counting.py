"""Parameter and FLOP counts of any JAX classifier, read off the jaxpr of its forward pass.

``count_params_and_flops`` traces the forward pass of one image with ``jax.make_jaxpr`` and walks its equations,
into the bodies of ``jit``, ``custom_jvp``/``custom_vjp``, ``remat`` and ``scan``. The cost of the network is that
of its ``conv_general_dilated`` and ``dot_general`` equations that the image flows through, counted over their
non-zero weights, so an unstructured-pruned network is cheaper than its dense original:

- a conv uses each of its weights once per output position, so it costs nnz(kernel) * H_out * W_out multiply-adds
  (grouped and depthwise convs alike), the taps that fall on the zero padding included, as the analytic
  H_out * W_out * k * k * C_in * C_out counts them;
- a dense layer (or any contraction with a weight) uses each weight once per element of the input's free axes:
  nnz(kernel) for one image's ``(1, C_in) @ (C_in, C_out)``.

The weights are whatever the image does not flow into: parameters, possibly reshaped, transposed, cast, or
computed from other parameters (then the computation itself, which does not depend on the image, is not counted).
Without concrete values (``jax.ShapeDtypeStruct`` leaves) a weight counts as dense. A contraction of two operands
that both depend on the image (attention scores, say) counts densely too. BatchNorm, activations, pooling, biases
and residual additions are not counted. FLOPs are 2 per multiply-add (torchvision's and fvcore's "FLOPs" are
multiply-adds: half these numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from attrjax._jaxprs import bind, call_body, scan_parts
from attrjax.models._split import SplitModel

_COUNTED = frozenset({"conv_general_dilated", "dot_general"})
# Primitives whose output holds the values of their one operand, rearranged or cast: a weight stays that leaf.
_SAME_VALUES = frozenset({"convert_element_type", "reshape", "transpose", "squeeze", "expand_dims", "copy", "copy_p",
                          "rev", "device_put"})


class _Value(NamedTuple):
    """What the walk knows about one variable of the jaxpr."""

    array: Any  # the concrete value, where it depends on neither the image nor an abstract leaf; else None
    data: bool  # whether it depends on the image
    leaf: int | None  # index of the variables leaf it holds (up to a reshape, transpose or cast); None: computed


def _has_counted(jaxpr: jax_core.Jaxpr) -> bool:
    return any(eqn.primitive.name in _COUNTED or any(map(_has_counted, jax_core.jaxprs_in_params(eqn.params)))
               for eqn in jaxpr.eqns)


class _Walk:
    """Evaluates a jaxpr as far as the values are known, adding up the multiply-adds of the counted equations."""

    def __init__(self):
        self.multiply_adds = 0
        self.weight_leaves: set[int] = set()  # leaves used as the weight of a counted equation

    def run(self, jaxpr: jax_core.Jaxpr, consts, args: list[_Value]) -> list[_Value]:
        env = dict(zip(jaxpr.constvars, (_Value(const, False, None) for const in consts)))
        env.update(zip(jaxpr.invars, args))

        def read(atom):
            return _Value(atom.val, False, None) if isinstance(atom, jax_core.Literal) else env[atom]

        for eqn in jaxpr.eqns:
            env.update(zip(eqn.outvars, self.equation(eqn, [read(atom) for atom in eqn.invars])))
        return [read(atom) for atom in jaxpr.outvars]

    def equation(self, eqn, ins: list[_Value]) -> list[_Value]:
        body = call_body(eqn)
        if body is not None:
            return self.run(*body, ins)
        name = eqn.primitive.name
        if any(value.data for value in ins):
            if name == "scan":
                return self.scan(eqn, ins)
            if name in _COUNTED:
                self.count(eqn, ins)
            elif any(map(_has_counted, jax_core.jaxprs_in_params(eqn.params))):
                raise ValueError(f"cannot count the convolutions and matmuls inside a {name!r} that the images flow "
                                 "through (its trip count or branch is not known when tracing); write the loop as "
                                 "jax.lax.scan or fori_loop with static bounds, or count the model without it")
            return [_Value(None, True, None) for _ in eqn.outvars]
        leaf = ins[0].leaf if name in _SAME_VALUES else None
        if any(value.array is None for value in ins):
            return [_Value(None, False, leaf) for _ in eqn.outvars]
        return [_Value(out, False, leaf) for out in bind(eqn, [value.array for value in ins])]

    def count(self, eqn, ins: list[_Value]):
        if eqn.primitive.name == "conv_general_dilated":
            weight, out_shape = 1, eqn.outvars[0].aval.shape
            out_spec = eqn.params["dimension_numbers"].out_spec  # (batch, feature, spatial...)
            uses = out_shape[out_spec[0]] * math.prod(out_shape[axis] for axis in out_spec[2:])
        else:
            weight = 0 if ins[1].data and not ins[0].data else 1  # the right operand when the image is in both
            (contracting, batch) = eqn.params["dimension_numbers"]
            other_shape = eqn.invars[1 - weight].aval.shape
            reduced = set(contracting[1 - weight]) | set(batch[1 - weight])
            uses = math.prod(size for axis, size in enumerate(other_shape) if axis not in reduced)
        value = ins[weight]
        nonzero = math.prod(eqn.invars[weight].aval.shape) if value.array is None else int(
            np.count_nonzero(np.asarray(value.array)))  # on the host: no program per weight shape
        self.multiply_adds += nonzero * uses
        if value.leaf is not None:
            self.weight_leaves.add(value.leaf)

    def scan(self, eqn, ins: list[_Value]) -> list[_Value]:
        """A scan that the image flows through: its body once per step (once, times the length, when no
        per-step input is known). The carry is taken to depend on the image (it is the activations of a scan over
        layers); the outputs are not evaluated."""
        num_consts, num_carry, body, body_consts = scan_parts(eqn)
        length = eqn.params["length"]
        consts, xs = ins[:num_consts], ins[num_consts + num_carry:]
        if length == 0:
            return [_Value(None, True, None) for _ in eqn.outvars]
        carry = [_Value(None, True, None)] * num_carry
        known_xs = any(x.array is not None for x in xs)
        before = self.multiply_adds
        for step in range(length if known_xs else 1):
            sliced = [x if x.array is None else _Value(x.array[step], False, x.leaf) for x in xs]
            outs = self.run(body, body_consts, consts + carry + sliced)
        if not known_xs:
            self.multiply_adds = before + (self.multiply_adds - before) * length
        return [_Value(None, out.data or index < num_carry, None) for index, out in enumerate(outs)]


def _forward_fn(model) -> Callable:
    if isinstance(model, SplitModel):
        return lambda variables, images: model.apply(variables, images)[0]
    if isinstance(model, nn.Module):
        return model.apply
    if callable(model):
        return model
    raise TypeError(f"cannot count a {type(model).__name__}: pass a function (variables, images) -> logits, a Flax "
                    "linen module or an attrjax.models.SplitModel")


def count_params_and_flops(model: Callable | nn.Module | SplitModel, variables: Any,
                           example_images: jax.Array | jax.ShapeDtypeStruct) -> dict[str, int]:
    """Non-zero parameters and forward FLOPs of one image, of any model (see the module docstring for the rules).

    Args:
      model: a function ``(variables, images (B,H,W,C)) -> logits (B,K)``, a Flax linen module (run as
        ``model.apply(variables, images)``, so in its default mode: eval for attrjax's VGG and ResNet) or a
        ``SplitModel`` (its eval-mode ``apply``). An NNX model counts through its state:
        ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)`` and
        ``count_params_and_flops(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, images)``.
      variables: what ``model`` takes: arrays, or ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape(model.init,
        ...)``) to count a dense network from its shapes alone.
      example_images: images (B,H,W,C) (arrays or a ``jax.ShapeDtypeStruct``) of the size the model takes; only
        the shape of one image is used.

    Returns:
      ``{"params": P, "flops": F}``. P: the parameters (the leaves of ``variables["params"]`` for Flax linen
      variables, every leaf of ``variables`` otherwise; BatchNorm's scale and bias, not its running statistics)
      less the zeros of the leaves that a counted conv or matmul uses as its weight: pruned weights do not count, a
      zero bias does. F: 2 per multiply-add of the convs and matmuls that one image flows through, over their
      non-zero weights, padded conv taps included.
    """
    forward = _forward_fn(model)
    image = jax.ShapeDtypeStruct((1, *example_images.shape[1:]), example_images.dtype)
    try:
        closed = jax.make_jaxpr(forward)(variables, image)
    except (flax.errors.ScopeParamShapeError, flax.errors.ScopeParamNotFoundError) as error:
        raise ValueError(f"the variables do not fit this model ({error}); pass the variables of the model being "
                         "counted") from error
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    args = [_Value(None if isinstance(leaf, jax.ShapeDtypeStruct) else leaf, False, index)
            for index, (_, leaf) in enumerate(leaves)]
    walk = _Walk()
    walk.run(closed.jaxpr, closed.consts, args + [_Value(None, True, None)])
    linen = isinstance(variables, Mapping) and "params" in variables
    num_params = 0
    for index, (path, leaf) in enumerate(leaves):
        if linen and getattr(path[0], "key", None) != "params":
            continue
        num_params += math.prod(leaf.shape)
        if index in walk.weight_leaves and args[index].array is not None:
            num_params -= math.prod(leaf.shape) - int(np.count_nonzero(np.asarray(leaf)))
    return {"params": num_params, "flops": 2 * walk.multiply_adds}


def _bits(dtype) -> int:
    dtype = jnp.dtype(dtype)
    return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8


def array_bytes(array) -> float:
    """Bytes to store one array as a deployed network would: dense at its dtype's width (int4: half a byte), or, for
    a weight (2 or more axes) with zeros, in compressed sparse rows when that is smaller: the non-zero values, a
    16-bit column index per value (32-bit past 65,536 columns) and a 32-bit offset per row; rows are the last axis
    (a linen kernel's output features), columns the others."""
    shape = tuple(array.shape)
    dense = math.prod(shape) * _bits(array.dtype) / 8
    if len(shape) < 2:
        return dense
    columns = math.prod(shape[:-1])
    nonzero = int(np.count_nonzero(np.asarray(array)))
    index_bytes = 2 if columns <= 2 ** 16 else 4
    sparse = nonzero * (_bits(array.dtype) / 8 + index_bytes) + 4 * (shape[-1] + 1)
    return min(dense, sparse)


def storage_bytes(variables) -> int:
    """Bytes of every array in ``variables`` (``array_bytes``): parameters, BatchNorm statistics, and for a deployed
    quantized network its integer weights and float scales. Float32 dense weights take 4 bytes, int8 1, int4 0.5,
    pruned ones their sparse format's share."""
    return math.ceil(sum(array_bytes(leaf) for leaf in jax.tree.leaves(variables)))
