"""The eval-mode computation of any JAX classifier as a small graph that relevance can be sent back through.

``trace_graph(forward, variables, images)`` traces ``forward(variables, images) -> logits`` with
``jax.make_jaxpr`` and interprets its equations (into ``jit``, ``custom_jvp`` and ``custom_vjp`` bodies, so
``jax.nn.relu`` and jitted helpers are seen through). Everything computed from ``variables`` alone is a constant
and is evaluated on the spot; what depends on the images becomes one of four kinds of node:

- ``Affine``: ``y = fn(x, weight) + bias``, ``fn`` linear in ``x`` and in ``weight`` separately. Kinds: ``conv``
  (``conv_general_dilated`` of any kernel, stride, padding, dilation and groups), ``dense`` (``dot_general`` with one
  constant operand), ``pool`` (``reduce_sum`` / ``reduce_window_sum``, times an output scale: sum, mean and average
  pooling) and ``elementwise`` (a constant scale and shift: ``mul``, ``div``, ``neg``, ``add``, ``sub``).
- ``Sum``: the addition of two input-dependent values (a residual connection).
- ``Activation``: an elementwise nonlinearity through which relevance passes unchanged: ``max``/``min``/``clamp``
  with constants (ReLU, ReLU6, clipping), ``tanh``, ``logistic``, a quantizer's ``round`` and casts (a quantized
  network is propagated as its dequantized weights and passes relevance through each activation quantizer, as its
  straight-through gradient does), and whatever else the caller lists in ``passthrough``.
- ``Transport``: an op that only moves or selects values: reshapes, transposes, slices, padding, concatenation,
  and the maxima (``reduce_max``, ``reduce_window_max``, ``max`` of two input-dependent values: max-pooling).
  Relevance follows its gradient: a permutation is undone, a max sends each output's relevance to its arg-max.

Anything else the images flow through (a product of two input-dependent values as in attention or train-mode
BatchNorm, ``exp``, ``LayerNorm``'s division, a loop) raises ``UnsupportedOp``, naming the op and where it is.

Why the jaxpr and not layer interception: it sees every op, including those written with plain ``jnp`` between
layers (a flatten, a mean, a residual ``+``), with no model-specific code, for linen, NNX and plain functions alike;
and nothing can be missed silently, since an op without a rule is an error rather than a gradient.

Then ``fold_affine`` (the canonizer) merges each ``elementwise`` node into the ``Affine`` node before it when that
node's output feeds nothing else: a bias add and an eval-mode BatchNorm (``(z - mean) * scale / sqrt(var + eps) +
shift``) become part of the conv or dense layer, as one linear map with folded weights and bias. A scale folds into a
conv or dense layer when it varies only along the output-feature axis (BatchNorm's does); otherwise the
``elementwise`` node stays on its own. Layer names come from the modules' name scopes (linen: ``layer1_0.conv1``),
else ``{kind}{index}`` in forward order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from attrjax._jaxprs import bind, call_body

# Ops that only move or select values: relevance follows their gradient.
_LAYOUT = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "rev", "slice", "pad",
                     "concatenate", "stack", "copy", "copy_p", "reduce_precision",
                     "dynamic_slice"})
_MAXIMA = frozenset({"reduce_max", "reduce_window_max"})
_SUM_POOLS = frozenset({"reduce_sum", "reduce_window_sum"})
# Elementwise ops besides max/min/clamp with constants that relevance passes unchanged: activations, and the rounding
# and casts of a quantizer (whose gradient, zero almost everywhere, would stop it).
PASSTHROUGH = frozenset({"tanh", "logistic", "round", "convert_element_type"})


class UnsupportedOp(ValueError):
    """The forward pass applies an op to the images that relevance cannot be propagated through."""


@dataclasses.dataclass(frozen=True, eq=False)
class Affine:
    """``y = fn(x, weight) + bias`` with ``fn`` bilinear; ``weight_axes`` maps output axes to weight axes (the axes
    a per-output scale can be folded along)."""

    input: int
    output: int
    name: str
    kind: str  # "conv" | "dense" | "pool" | "elementwise"
    fn: Callable[[jax.Array, jax.Array], jax.Array]
    weight: jax.Array
    bias: jax.Array | None = None
    weight_axes: tuple[tuple[int, int], ...] = ()

    @property
    def inputs(self) -> tuple[int, ...]:
        return (self.input,)

    def linear(self, x: jax.Array, weight: jax.Array | None = None) -> jax.Array:
        """``fn(x, weight)``, the layer's own weight by default: the linear part, without the bias."""
        return self.fn(x, self.weight if weight is None else weight)

    def __call__(self, x: jax.Array) -> jax.Array:
        z = self.linear(x)
        return z if self.bias is None else z + self.bias


@dataclasses.dataclass(frozen=True, eq=False)
class Sum:
    """``y = sum of inputs`` (all input-dependent): a residual connection."""

    inputs: tuple[int, ...]
    output: int
    name: str

    def __call__(self, *xs: jax.Array) -> jax.Array:
        return sum(xs[1:], xs[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Activation:
    """An elementwise nonlinearity; relevance passes through unchanged."""

    input: int
    output: int
    name: str
    fn: Callable[[jax.Array], jax.Array]

    @property
    def inputs(self) -> tuple[int, ...]:
        return (self.input,)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


@dataclasses.dataclass(frozen=True, eq=False)
class Transport:
    """An op that moves or selects values (layout ops, maxima); relevance follows its gradient."""

    inputs: tuple[int, ...]
    output: int
    name: str
    kind: str  # "layout" | "max"
    fn: Callable[..., jax.Array]

    def __call__(self, *xs: jax.Array) -> jax.Array:
        return self.fn(*xs)


Node = Union[Affine, Sum, Activation, Transport]


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """Nodes in forward order over value ids; ``input`` is the images, ``output`` the logits, ``point`` the value
    at the requested layer (None: relevance is read at the input)."""

    nodes: tuple[Node, ...]
    input: int
    output: int
    point: int | None = None

    def forward(self, images: jax.Array) -> dict[int, jax.Array]:
        """Every value of the graph for ``images``: ``values[graph.output]`` are the logits."""
        values = {self.input: images}
        for node in self.nodes:
            values[node.output] = node(*(values[i] for i in node.inputs))
        return values

    @property
    def affine_nodes(self) -> tuple[Affine, ...]:
        return tuple(node for node in self.nodes if isinstance(node, Affine))

    def positions(self) -> tuple[frozenset[str], frozenset[str]]:
        """``(first, last)``: names of the affine layers with no affine layer before them (the ones that see the
        images) and with none after them (the classifier)."""
        upstream: dict[int, bool] = {self.input: False}  # value -> has an affine node on some path behind it
        first = set()
        for node in self.nodes:
            behind = any(upstream[i] for i in node.inputs)
            if isinstance(node, Affine) and not behind:
                first.add(node.name)
            upstream[node.output] = behind or isinstance(node, Affine)
        downstream: dict[int, bool] = {self.output: False}
        last = set()
        for node in reversed(self.nodes):
            ahead = downstream.get(node.output, False)
            if isinstance(node, Affine) and not ahead:
                last.add(node.name)
            for i in node.inputs:
                downstream[i] = downstream.get(i, False) or ahead or isinstance(node, Affine)
        return frozenset(first), frozenset(last)


@dataclasses.dataclass(frozen=True)
class _Const:
    value: Any


def _scope(eqn, prefix: str) -> str:
    """The equation's name scope, under the scope ``prefix`` of the call it is inside."""
    return "/".join(part for part in (prefix, str(eqn.source_info.name_stack)) if part)


def _where(eqn, stack: str) -> str:
    return f"`{eqn.primitive.name}`" + (f" in {stack}" if stack else "")


def _substituted(eqn, const: list, acts: list[int]) -> Callable[..., jax.Array]:
    """The equation as a function of its input-dependent operands (positions ``acts``), constants filled in."""
    def fn(*xs):
        values = list(const)
        for i, x in zip(acts, xs):
            values[i] = x
        return bind(eqn, values)[0]
    return fn


class _Tracer:
    """Interprets a jaxpr into nodes: constants are evaluated, input-dependent values get ids."""

    def __init__(self, passthrough: frozenset[str]):
        self.passthrough = PASSTHROUGH | passthrough
        self.nodes: list[Node] = []
        self.stacks: list[str] = []  # the name scope of each node
        self.next_id = 0
        self.marker: int | None = None  # the id of the zero perturbation that marks the layer to read at
        self.point: int | None = None

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def add(self, node_fn: Callable[[int], Node], stack: str) -> int:
        out = self.new_id()
        self.nodes.append(node_fn(out))
        self.stacks.append(stack)
        return out

    def run(self, jaxpr, consts, args: list, prefix: str = "") -> list:
        env = dict(zip(jaxpr.constvars, map(_Const, consts)))
        env.update(zip(jaxpr.invars, args))

        def read(atom):
            return _Const(atom.val) if isinstance(atom, jax_core.Literal) else env[atom]

        for eqn in jaxpr.eqns:
            ins = [read(atom) for atom in eqn.invars]
            if all(isinstance(value, _Const) for value in ins):
                outs = [_Const(out) for out in bind(eqn, [value.value for value in ins])]
            else:
                outs = self.equation(eqn, ins, prefix)
            env.update(zip(eqn.outvars, outs))
        return [read(atom) for atom in jaxpr.outvars]

    def equation(self, eqn, ins: list, prefix: str) -> list:
        stack = _scope(eqn, prefix)
        body = call_body(eqn)
        if body is not None:
            return self.run(*body, ins, stack)
        if self.marker is not None and self.marker in ins:
            return [self.read_point(eqn, ins, stack)]
        acts = [i for i, value in enumerate(ins) if not isinstance(value, _Const)]
        return [self.node(eqn, ins, acts, stack)]

    def read_point(self, eqn, ins: list, stack: str) -> int:
        other = [value for value in ins if value != self.marker]
        if eqn.primitive.name != "add" or len(other) != 1 or isinstance(other[0], _Const):
            raise UnsupportedOp(f"the layer's marker reached {_where(eqn, stack)}; it must only be added to the "
                                "layer's output (SplitModel.apply_perturbed)")
        self.point = other[0]
        return other[0]

    def unsupported(self, eqn, stack: str, why: str) -> UnsupportedOp:
        unary = len(eqn.invars) == 1
        hint = (f"If this op is an elementwise activation that relevance should pass unchanged, add "
                f"'{eqn.primitive.name}' to passthrough=; otherwise read" if unary else "Read")
        return UnsupportedOp(
            f"cannot propagate relevance through {_where(eqn, stack)}: {why}. Supported are convolutions, dense "
            "layers, sum/mean/average pooling, constant scales and shifts (eval-mode BatchNorm), residual "
            f"additions, max-pooling, layout ops and elementwise activations. {hint} relevance at a layer before "
            "it (layer=) or use a gradient method")

    def node(self, eqn, ins: list, acts: list[int], stack: str) -> int:
        name, params = eqn.primitive.name, eqn.params
        const = [value.value if isinstance(value, _Const) else None for value in ins]
        if name == "conv_general_dilated":
            if acts != [0]:
                raise self.unsupported(eqn, stack, "its kernel depends on the input")
            dims = params["dimension_numbers"]
            conv_axes = ((dims.out_spec[1], dims.rhs_spec[0]),)
            kernel = const[1]
            assert kernel is not None  # acts == [0]: the kernel is a constant

            def conv(x, w, eqn=eqn):
                return bind(eqn, [x, w])[0]

            return self.add(lambda out: Affine(ins[0], out, "", "conv", conv, kernel, None, conv_axes), stack)
        if name == "dot_general":
            if len(acts) != 1:
                raise self.unsupported(eqn, stack, "both operands depend on the input (attention?)")
            act = acts[0]
            (contracting, batch) = params["dimension_numbers"]
            weight_side = 1 - act
            w_shape = eqn.invars[weight_side].aval.shape
            free = [a for a in range(len(w_shape)) if a not in contracting[weight_side] and a not in batch[weight_side]]
            x_ndim = eqn.invars[act].aval.ndim
            x_free = x_ndim - len(contracting[act]) - len(batch[act])
            offset = len(batch[0]) + (x_free if act == 0 else 0)
            dense_axes = tuple((offset + k, axis) for k, axis in enumerate(free))
            weight = const[weight_side]
            assert weight is not None  # acts == [act]: the other operand is a constant

            def dense(x, w, eqn=eqn, act=act):
                return bind(eqn, [x, w] if act == 0 else [w, x])[0]

            return self.add(lambda out: Affine(ins[act], out, "", "dense", dense, weight, None, dense_axes), stack)
        if name in _SUM_POOLS:
            def pool(x, w, eqn=eqn):
                return bind(eqn, [x])[0] * w

            return self.add(lambda out: Affine(ins[0], out, "", "pool", pool, jnp.ones((), eqn.outvars[0].aval.dtype)),
                            stack)
        if name in ("mul", "div", "neg", "add", "sub", "add_any"):
            return self.elementwise_affine(eqn, ins, acts, const, stack)
        if name in _LAYOUT or name in _MAXIMA or name == "max" and len(acts) == 2:
            kind, moved = "layout" if name in _LAYOUT else "max", _substituted(eqn, const, acts)
            return self.add(lambda out: Transport(tuple(ins[i] for i in acts), out, "", kind, moved), stack)
        if name in ("max", "min", "clamp") and len(acts) == 1 or name in self.passthrough and len(ins) == 1:
            activation = _substituted(eqn, const, acts)
            return self.add(lambda out: Activation(ins[acts[0]], out, "", activation), stack)
        why = {"scan": "a loop", "while": "a loop", "cond": "a branch", "select_n": "a selection by an input-dependent "
               "condition"}.get(name, "it has no propagation rule")
        raise self.unsupported(eqn, stack, why)

    def elementwise_affine(self, eqn, ins, acts, const, stack) -> int:
        name, dtype = eqn.primitive.name, eqn.outvars[0].aval.dtype
        if len(acts) == 2:
            if name in ("add", "add_any"):
                return self.add(lambda out: Sum((ins[0], ins[1]), out, ""), stack)
            raise self.unsupported(eqn, stack, f"it combines two input-dependent values ({name}; train-mode "
                                   "BatchNorm, a normalisation or gating?): propagate the eval-mode forward pass")
        act, other = acts[0], 1 - acts[0]
        one = jnp.ones((), dtype)
        if name == "neg":
            weight, bias = -one, None
        elif name == "mul":
            weight, bias = const[other], None
        elif name == "div" and act == 0:
            weight, bias = 1.0 / const[1], None
        elif name in ("add", "add_any"):
            weight, bias = one, const[other]
        elif name == "sub":
            weight, bias = (one, -const[1]) if act == 0 else (-one, const[0])
        else:
            raise self.unsupported(eqn, stack, "the input is in the denominator")

        ndim = eqn.outvars[0].aval.ndim

        def full_rank(value):  # right-aligned broadcasting made explicit, so folding can read the varying axes
            value = jnp.asarray(value, dtype)
            return jnp.reshape(value, (1,) * (ndim - value.ndim) + value.shape)

        def scale(x, w):
            return x * w

        return self.add(lambda out: Affine(ins[act], out, "", "elementwise", scale, full_rank(weight),
                                           None if bias is None else full_rank(bias)), stack)


def _module_path(stack: str, root: str | None) -> str:
    """``VGG.features/VGG._apply_point/conv1_1`` -> ``conv1_1``; ``ResNet/layer1_0/conv1`` -> ``layer1_0.conv1``
    with root ``ResNet``: the module names of a name scope, without method frames and transforms."""
    parts = [part for part in stack.split("/") if part and "." not in part and "(" not in part]
    if root is not None and parts[:1] == [root]:
        parts = parts[1:]
    return ".".join(parts)


def _name_nodes(nodes: list[Node], stacks: list[str]) -> list[Node]:
    firsts = [stack.split("/")[0] for stack in stacks if stack]
    root = firsts[0] if firsts and len(set(firsts)) == 1 and "." not in firsts[0] else None
    counts: dict[str, int] = {}
    named = []
    for node, stack in zip(nodes, stacks):
        kind = getattr(node, "kind", type(node).__name__.lower())
        name = _module_path(stack, root)
        if not name:
            name = f"{kind}{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
        named.append(dataclasses.replace(node, name=name))
    return named


def _fold_scale(node: Affine, scale: jax.Array) -> jax.Array | None:
    """``node``'s weight with ``scale`` (the rank of the output) folded in, or None where it cannot be."""
    if node.kind in ("pool", "elementwise"):
        return node.weight * scale  # fn(x, w) is (something of x) * w: any broadcastable scale folds
    shape = scale.shape
    varying = [axis for axis, size in enumerate(shape) if size != 1]
    axes = dict(node.weight_axes)
    if not all(axis in axes for axis in varying):
        return None
    weight_shape = [1] * node.weight.ndim
    for axis in varying:
        weight_shape[axes[axis]] = shape[axis]
    return node.weight * jnp.reshape(scale, weight_shape)


def fold_affine(graph: Graph) -> Graph:
    """The canonizer: merges each ``elementwise`` affine node into the affine node that feeds it (bias adds and
    eval-mode BatchNorm into their conv or dense layer) where that node's output feeds nothing else."""
    uses: dict[int, int] = {}
    for node in graph.nodes:
        for i in node.inputs:
            uses[i] = uses.get(i, 0) + 1
    kept = {graph.output, graph.point}
    nodes: list[Node] = []
    producer: dict[int, int] = {}  # value -> index in nodes
    for node in graph.nodes:
        if isinstance(node, Affine) and node.kind == "elementwise" and node.input in producer:
            source = producer[node.input]
            previous = nodes[source]
            if isinstance(previous, Affine) and uses[previous.output] == 1 and previous.output not in kept:
                weight = _fold_scale(previous, node.weight)
                if weight is not None:
                    bias = None if previous.bias is None else previous.bias * node.weight
                    if node.bias is not None:
                        bias = node.bias if bias is None else bias + node.bias
                    nodes[source] = dataclasses.replace(previous, output=node.output, weight=weight, bias=bias)
                    del producer[previous.output]
                    producer[node.output] = source
                    continue
        producer[node.output] = len(nodes)
        nodes.append(node)
    return dataclasses.replace(graph, nodes=tuple(nodes))


def trace_graph(forward: Callable[..., jax.Array], variables: Any, images: jax.Array,
                marker: jax.Array | None = None, *, passthrough: Sequence[str] = ()) -> Graph:
    """The canonical graph (BatchNorm and biases folded) of ``forward(variables, images[, marker]) -> logits (B,K)``.

    Args:
      forward: the eval-mode forward pass; the images must only flow through supported ops (module docstring).
      variables: any pytree of arrays; constants of the graph (``jax.grad`` can differentiate through them).
      images: (B,...) the input.
      marker: zeros shaped like the activations at a layer, which ``forward`` adds to that layer's output: its
        sum marks the value relevance is read at (``Graph.point``). None: relevance is read at the images.
      passthrough: extra elementwise primitives (by name, e.g. ``"erf"``) that relevance passes unchanged.
    """
    args = (variables, images) + (() if marker is None else (marker,))
    closed = jax.make_jaxpr(forward)(*args)
    leaves = jax.tree.leaves(variables)
    tracer = _Tracer(frozenset(passthrough))
    image_id = tracer.new_id()
    inputs = [_Const(leaf) for leaf in leaves] + [image_id]
    if marker is not None:
        tracer.marker = tracer.new_id()
        inputs.append(tracer.marker)
    (logits,) = tracer.run(closed.jaxpr, closed.consts, inputs)
    if isinstance(logits, _Const) or logits == image_id:
        raise UnsupportedOp("the forward pass's output does not depend on the images through any layer")
    if marker is not None and tracer.point is None:
        raise UnsupportedOp("the layer to read relevance at was not reached in the forward pass")
    nodes = _name_nodes(tracer.nodes, tracer.stacks)
    return fold_affine(Graph(tuple(nodes), image_id, logits, tracer.point))


__all__ = ["Activation", "Affine", "Graph", "Node", "PASSTHROUGH", "Sum", "Transport", "UnsupportedOp", "fold_affine",
           "trace_graph"]
