"""The eval-mode computation of any JAX classifier as a small graph that relevance can be sent back through.

``trace_graph(forward, variables, images)`` traces ``forward(variables, images) -> logits`` with
``jax.make_jaxpr`` and interprets its equations (into ``jit``, ``custom_jvp`` and ``custom_vjp`` bodies, so
``jax.nn.relu`` and jitted helpers are seen through). Everything computed from ``variables`` alone is a constant
and is evaluated on the spot; every equation that depends on the images becomes a node:

- ``Affine``: ``y = fn(x, weight) + bias``, ``fn`` linear in ``x`` and in ``weight`` separately. Kinds: ``conv``
  (``conv_general_dilated`` of any kernel, stride, padding, dilation and groups), ``dense`` (``dot_general`` with one
  constant operand), ``pool`` (``reduce_sum`` / ``reduce_window_sum``, times an output scale: sum, mean and average
  pooling), ``elementwise`` (a constant scale and shift: ``mul``, ``div``, ``neg``, ``add``, ``sub``) and ``norm``:
  a scale that is itself computed from the input but *held constant at the current input* (``Affine.held``), as
  LayerNorm's and RMSNorm's ``1 / sqrt(var + eps)`` or a squeeze-and-excitation gate. Relevance goes to ``x`` only.
- ``Sum``: the addition or subtraction of input-dependent values: a residual connection, or LayerNorm's centring
  ``x - mean(x)`` (whose mean is a ``pool`` of ``x``: together, the centring is one linear map).
- ``Product``: the product of two input-dependent values: attention's ``Q Kᵀ`` and ``A V`` (``dot_general``), a gate
  (``mul``). ``Product.probabilities`` marks an operand that is a softmax output (attention probabilities).
- ``Softmax``: a softmax as one unit, from its input (the scores) to its output: ``jax.nn.softmax`` where the jaxpr
  shows the call, and the pattern ``exp(x - max x) / sum exp(x - max x)`` wherever it is written out.
- ``Activation``: an elementwise nonlinearity through which relevance passes unchanged: ``max``/``min``/``clamp``
  with constants (ReLU, ReLU6, clipping), ``tanh``, ``logistic``, ``stop_gradient``, a quantizer's ``round`` and
  casts (a quantized network is propagated as its dequantized weights and passes relevance through each activation
  quantizer, as its straight-through gradient does), whatever else the caller lists in ``passthrough``, and a value
  gated by a pointwise function of itself (``composed``): GELU in its erf and tanh forms, SiLU.
- ``Transport``: an op that only moves or selects values: reshapes, transposes, slices, padding, concatenation,
  and the maxima (``reduce_max``, ``reduce_window_max``, ``max`` of two input-dependent values: max-pooling).
  Relevance follows its gradient: a permutation is undone, a max sends each output's relevance to its arg-max.
- ``Opaque``: anything else (``exp`` outside a softmax, a division by an input-dependent value, normalisation by
  statistics over the batch as in train-mode BatchNorm, a loop). Its forward is computed, but relevance reaching it
  raises ``UnsupportedOp`` naming the op and where it is: parts of the computation that relevance never reaches
  (the variance of a LayerNorm, whose scale is held constant) need no rule.

A *statistic* of a value is computed from a reduction of it (its mean, variance or maximum, up to pointwise
functions and centring); a ``mul``/``div`` of a value by a statistic of itself is a ``norm`` node (the statistic
held constant), a ``sub`` is a ``Sum``. A statistic over the batch axis couples the images, and relevance through it
is refused.

Why the jaxpr and not layer interception: it sees every op, including those written with plain ``jnp`` between
layers (a flatten, a mean, a residual ``+``, an attention einsum), with no model-specific code, for linen, NNX and
plain functions alike; and nothing can be missed silently, since an op without a rule is an error rather than a
gradient. Why rules on nodes rather than a rewritten forward pass whose gradient times input is the relevance: a
rule is a value a composite can choose per layer kind, and the same backward loop serves LRP, Excitation Backprop
and RAP.

Then ``fold_affine`` (the canonizer) merges each ``elementwise`` node into the ``Affine`` node before it when that
node's output feeds nothing else: a bias add and an eval-mode BatchNorm (``(z - mean) * scale / sqrt(var + eps) +
shift``) become part of the conv or dense layer, as one linear map with folded weights and bias; LayerNorm's affine
part folds into its ``norm`` node the same way. A scale folds into a conv or dense layer when it varies only along the
output-feature axis (BatchNorm's does); otherwise the ``elementwise`` node stays on its own. Layer names come from the
modules' name scopes (linen: ``layer1_0.conv1``), else ``{kind}{index}`` in forward order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from attrjax._jaxprs import bind, call_body
from attrjax.models._layout import ELEMENTWISE

# Ops that only move or select values: relevance follows their gradient.
_LAYOUT = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "rev", "slice", "pad",
                     "concatenate", "stack", "copy", "copy_p", "reduce_precision",
                     "dynamic_slice"})
_MAXIMA = frozenset({"reduce_max", "reduce_window_max"})
_SUM_POOLS = frozenset({"reduce_sum", "reduce_window_sum"})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min"})  # what makes a statistic
# Elementwise ops besides max/min/clamp with constants that relevance passes unchanged: activations, and the rounding
# and casts of a quantizer (whose gradient, zero almost everywhere, would stop it).
PASSTHROUGH = frozenset({"tanh", "logistic", "round", "convert_element_type", "stop_gradient"})
_POINTWISE = ELEMENTWISE | {"erfc", "add_any"}  # ops that build pointwise functions (GELU's, SiLU's pieces)
_COMBINING = frozenset({"add", "add_any", "sub", "mul", "div", "max", "min"})  # two operands into one value
_SOFTMAX_CALLS = frozenset({"_softmax", "softmax"})  # names of jax.nn.softmax's custom_jvp body


class UnsupportedOp(ValueError):
    """The forward pass applies an op to the images that relevance cannot be propagated through."""


@dataclasses.dataclass(frozen=True, eq=False)
class Affine:
    """``y = fn(x, weight) + bias`` with ``fn`` bilinear; ``weight_axes`` maps output axes to weight axes (the axes
    a per-output scale can be folded along). With ``held``, the weight is ``weight * values[held]``: a graph value
    held constant at the current input (a ``norm`` node's scale), which receives no relevance."""

    input: int
    output: int
    name: str
    kind: str  # "conv" | "dense" | "pool" | "elementwise" | "norm"
    fn: Callable[[jax.Array, jax.Array], jax.Array]
    weight: jax.Array
    bias: jax.Array | None = None
    weight_axes: tuple[tuple[int, int], ...] = ()
    held: int | None = None

    @property
    def inputs(self) -> tuple[int, ...]:
        return (self.input,) if self.held is None else (self.input, self.held)

    def linear(self, x: jax.Array, weight: jax.Array | None = None) -> jax.Array:
        """``fn(x, weight)``, the layer's own weight by default: the linear part, without the bias."""
        return self.fn(x, self.weight if weight is None else weight)

    def bound(self, values: dict[int, jax.Array]) -> "Affine":
        """This layer with its held value read from ``values`` into its weight: what the rules see."""
        if self.held is None:
            return self
        return dataclasses.replace(self, weight=self.weight * values[self.held], held=None)

    def __call__(self, x: jax.Array, *held: jax.Array) -> jax.Array:
        z = self.fn(x, self.weight * held[0]) if held else self.linear(x)
        return z if self.bias is None else z + self.bias


@dataclasses.dataclass(frozen=True, eq=False)
class Sum:
    """``y = sum of signs[i] * inputs[i]`` (all input-dependent): a residual connection (signs all +1), or a
    difference such as LayerNorm's centring ``x - mean(x)``."""

    inputs: tuple[int, ...]
    output: int
    name: str
    signs: tuple[float, ...] | None = None  # None: all +1

    def signed(self, xs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        """The summands: each input times its sign."""
        return tuple(xs) if self.signs is None else tuple(x if s == 1 else s * x for s, x in zip(self.signs, xs))

    def __call__(self, *xs: jax.Array) -> jax.Array:
        terms = self.signed(xs)
        return sum(terms[1:], terms[0])


@dataclasses.dataclass(frozen=True, eq=False)
class _Unary:
    """``y = fn(x)`` of one input-dependent value."""

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
class Activation(_Unary):
    """An elementwise nonlinearity; relevance passes through unchanged. ``composed``: a pointwise function of its
    input built from several ops (GELU, SiLU), rather than one activation op."""

    composed: bool = False


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


@dataclasses.dataclass(frozen=True, eq=False)
class Product:
    """``y = fn(a, b)``, bilinear in two input-dependent values (``Q Kᵀ``, ``A V``, a gate). ``probabilities``: the
    index (0 or 1) of an operand that is a softmax output (attention probabilities), else None."""

    inputs: tuple[int, int]
    output: int
    name: str
    fn: Callable[[jax.Array, jax.Array], jax.Array]
    probabilities: int | None = None
    kind: str = "product"

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return self.fn(a, b)


@dataclasses.dataclass(frozen=True, eq=False)
class Softmax(_Unary):
    """A softmax as one unit: ``fn`` maps its input (the scores) to its output (the probabilities)."""

    kind: str = "softmax"


@dataclasses.dataclass(frozen=True, eq=False)
class Opaque:
    """An op without a propagation rule: computed in the forward pass; relevance reaching it is an error that says
    ``where`` it is and ``why`` it has no rule. ``primitive``: the op's name."""

    inputs: tuple[int, ...]
    output: int
    name: str
    fn: Callable[..., jax.Array]
    primitive: str
    where: str
    why: str
    kind: str = "opaque"

    def __call__(self, *xs: jax.Array) -> jax.Array:
        return self.fn(*xs)


Node = Union[Affine, Sum, Activation, Transport, Product, Softmax, Opaque]


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """Nodes in forward order over value ids; ``input`` is the images, ``output`` the logits, ``point`` the value
    at the requested layer (None: relevance is read at the input). A layer's activations may be laid out
    differently from the value they perturb (a token layer's (B,h,w,D) map of its (B,T,D) tokens):
    ``point_layout`` maps the activations to that value, and ``marker_shape`` is the activations' shape."""

    nodes: tuple[Node, ...]
    input: int
    output: int
    point: int | None = None
    point_layout: Callable[[jax.Array], jax.Array] | None = None
    marker_shape: jax.ShapeDtypeStruct | None = None

    def forward(self, images: jax.Array, perturbations: dict[int, jax.Array] | None = None) -> dict[int, jax.Array]:
        """Every value of the graph for ``images``: ``values[graph.output]`` are the logits. ``perturbations`` are
        added to the values with those ids as they are computed (their gradients are the values' gradients)."""
        perturbations = perturbations or {}
        values = {self.input: images}
        for node in self.nodes:
            value = node(*(values[i] for i in node.inputs))
            values[node.output] = value + perturbations[node.output] if node.output in perturbations else value
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


@dataclasses.dataclass(frozen=True)
class _FromMarker:
    """A value computed from the layer marker alone (reshaped into the layer's tokens, say): ``fn(marker)``; None:
    the marker itself."""

    fn: Callable[[jax.Array], jax.Array] | None = None


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


def _composed(eqn, ins: list, pieces: dict[int, Callable]) -> Callable[[jax.Array], jax.Array]:
    """The equation as a function of one value ``x``: operand ``i`` is ``pieces[i](x)``, the others constants."""
    def fn(x):
        return bind(eqn, [pieces[i](x) if i in pieces else value.value for i, value in enumerate(ins)])[0]
    return fn


def _body_name(eqn) -> str | None:
    """The name of the function a ``custom_jvp_call`` or ``jit`` equation calls (``_softmax`` for jax.nn.softmax)."""
    if "name" in eqn.params:
        return eqn.params["name"]
    body = eqn.params.get("call_jaxpr")
    info = getattr(getattr(body, "jaxpr", body), "debug_info", None)
    return getattr(info, "func_name", None)


@dataclasses.dataclass(frozen=True)
class _Statistic:
    """What a statistic was reduced from: ``root`` (the value reduced), ``axes`` (of the reduction), ``batch``
    (whether it reduced over the batch axis)."""

    root: int
    axes: tuple[int, ...]
    batch: bool


class _Tracer:
    """Interprets a jaxpr into nodes: constants are evaluated, input-dependent values get ids."""

    def __init__(self, passthrough: frozenset[str], batch_size: int):
        self.passthrough = PASSTHROUGH | passthrough
        self.batch_size = batch_size
        self.nodes: list[Node] = []
        self.stacks: list[str] = []  # the name scope of each node
        self.next_id = 0
        self.point: int | None = None
        self.point_layout: Callable | None = None
        self.producer: dict[int, Node] = {}
        self.statistics: dict[int, _Statistic] = {}
        self.pointwise: dict[int, tuple[int, Callable]] = {}  # value -> (the value it is a pointwise function of, fn)
        self.probabilities: set[int] = set()  # softmax outputs, and their moved or cast copies

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def add(self, node_fn: Callable[[int], Node], stack: str) -> int:
        out = self.new_id()
        node = node_fn(out)
        self.nodes.append(node)
        self.stacks.append(stack)
        self.producer[out] = node
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
        if any(isinstance(value, _FromMarker) for value in ins):
            return [self.from_marker(eqn, ins, stack)]
        body = call_body(eqn)
        if body is not None and eqn.primitive.name == "custom_jvp_call" and _body_name(eqn) in _SOFTMAX_CALLS:
            jaxpr, consts = body
            return [self.softmax(ins[0], lambda x: jax.core.eval_jaxpr(jaxpr, consts, x)[0], stack)]
        if body is not None:
            return self.run(*body, ins, stack)
        acts = [i for i, value in enumerate(ins) if not isinstance(value, _Const)]
        out = self.node(eqn, ins, acts, stack)
        self.classify(eqn, ins, acts, out)
        return [out]

    def from_marker(self, eqn, ins: list, stack: str):
        """The marker (zeros at the layer) is moved into the layer's layout by layout ops of its own, then added to
        the layer's output: that output is the point relevance is read at."""
        marked = [i for i, value in enumerate(ins) if isinstance(value, _FromMarker)]
        others = [value for value in ins if not isinstance(value, (_FromMarker, _Const))]
        if not others and eqn.primitive.name in _LAYOUT | {"convert_element_type"}:
            pieces = {i: ins[i].fn or (lambda m: m) for i in marked}
            return _FromMarker(_composed(eqn, ins, pieces))
        if eqn.primitive.name in ("add", "add_any") and len(marked) == 1 and len(others) == 1:
            (self.point,) = others
            self.point_layout = ins[marked[0]].fn
            return self.point
        raise UnsupportedOp(f"the layer's marker reached {_where(eqn, stack)}; it must only be added to the "
                            "layer's output (SplitModel.apply_perturbed)")

    def classify(self, eqn, ins: list, acts: list[int], out: int) -> None:
        """Records what ``out`` is besides its node: a statistic, a pointwise function of one value, attention
        probabilities."""
        name, deps = eqn.primitive.name, [ins[i] for i in acts]
        if name in _REDUCTIONS:
            shape = eqn.invars[0].aval.shape
            axes = tuple(eqn.params["axes"])
            self.statistics[out] = _Statistic(deps[0], axes, 0 in axes and shape[0] == self.batch_size)
        elif all(dep in self.statistics for dep in deps):
            self.statistics[out] = dataclasses.replace(self.statistics[deps[0]],
                                                       batch=any(self.statistics[d].batch for d in deps))
        # A constant shift of a value that is not yet a pointwise function of another is a bias, the end of the
        # layer before (fold_affine merges it there): the pointwise functions of its output start after it.
        bias = name in ("add", "sub") and len(acts) == 1 and deps[0] not in self.pointwise
        if (name in _POINTWISE and not bias
                and all(eqn.invars[i].aval.shape == eqn.outvars[0].aval.shape for i in acts)):
            sources = {self.source(dep)[0] for dep in deps}
            if len(sources) == 1:
                pieces = {i: self.source(ins[i])[1] for i in acts}
                self.pointwise[out] = (sources.pop(), _composed(eqn, ins, pieces))
        node = self.producer[out]
        if deps and all(dep in self.probabilities for dep in deps) and (
                isinstance(node, Transport) and node.kind == "layout" or name == "convert_element_type"):
            self.probabilities.add(out)

    def self_gated(self, a: int, b: int) -> bool:
        """Whether ``a * b`` is a value gated by a pointwise function of itself (``x * sigmoid(x)``: SiLU; ``0.5 x *
        (1 + erf(x / sqrt 2))``: GELU): both are pointwise functions of one value, one of them a multiple of it."""
        source = self.source(a)[0]
        if self.source(b)[0] != source:
            return False

        def multiple(value):
            node = self.producer.get(value)
            return value == source or (isinstance(node, Affine) and node.kind == "elementwise" and node.bias is None
                                       and node.input == source)

        return multiple(a) or multiple(b)

    def source(self, value: int) -> tuple[int, Callable]:
        """``(s, fn)`` with ``value == fn(s)`` and ``s`` the earliest value it is a pointwise function of."""
        return self.pointwise.get(value, (value, lambda x: x))

    def opaque(self, eqn, ins: list, acts: list[int], stack: str, why: str) -> int:
        fn = _substituted(eqn, [value.value if isinstance(value, _Const) else None for value in ins], acts)
        return self.add(lambda out: Opaque(tuple(ins[i] for i in acts), out, "", fn, eqn.primitive.name,
                                           _where(eqn, stack), why), stack)

    def node(self, eqn, ins: list, acts: list[int], stack: str) -> int:
        name, params = eqn.primitive.name, eqn.params
        const = [value.value if isinstance(value, _Const) else None for value in ins]
        if name == "conv_general_dilated":
            if acts != [0]:
                return self.opaque(eqn, ins, acts, stack, "its kernel depends on the input")
            dims = params["dimension_numbers"]
            conv_axes = ((dims.out_spec[1], dims.rhs_spec[0]),)
            kernel = const[1]
            assert kernel is not None  # acts == [0]: the kernel is a constant

            def conv(x, w, eqn=eqn):
                return bind(eqn, [x, w])[0]

            return self.add(lambda out: Affine(ins[0], out, "", "conv", conv, kernel, None, conv_axes), stack)
        if name == "dot_general":
            if len(acts) == 2:
                return self.product(eqn, ins, stack)
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
            assert weight is not None  # one input-dependent operand: the other is a constant

            def dense(x, w, eqn=eqn, act=act):
                return bind(eqn, [x, w] if act == 0 else [w, x])[0]

            return self.add(lambda out: Affine(ins[act], out, "", "dense", dense, weight, None, dense_axes), stack)
        if name in _SUM_POOLS:
            def pool(x, w, eqn=eqn):
                return bind(eqn, [x])[0] * w

            return self.add(lambda out: Affine(ins[0], out, "", "pool", pool, jnp.ones((), eqn.outvars[0].aval.dtype)),
                            stack)
        if name in _COMBINING and len(acts) == 2:
            return self.combination(eqn, ins, stack)
        if name in ("mul", "div", "neg", "add", "sub", "add_any"):
            return self.elementwise_affine(eqn, ins, acts, const, stack)
        if name in _LAYOUT or name in _MAXIMA:
            kind, moved = "layout" if name in _LAYOUT else "max", _substituted(eqn, const, acts)
            return self.add(lambda out: Transport(tuple(ins[i] for i in acts), out, "", kind, moved), stack)
        if name in ("max", "min", "clamp") and len(acts) == 1 or name in self.passthrough and len(ins) == 1:
            activation = _substituted(eqn, const, acts)
            return self.add(lambda out: Activation(ins[acts[0]], out, "", activation), stack)
        why = {"scan": "a loop", "while": "a loop", "cond": "a branch", "select_n": "a selection by an input-dependent "
               "condition", "exp": "it has no propagation rule (a softmax written by hand? jax.nn.softmax is "
               "propagated as one unit)"}.get(name, "it has no propagation rule")
        return self.opaque(eqn, ins, acts, stack, why)

    def product(self, eqn, ins: list, stack: str) -> int:
        def fn(a, b, eqn=eqn):
            return bind(eqn, [a, b])[0]

        held = [index for index in (0, 1) if ins[index] in self.probabilities]
        probabilities = held[0] if len(held) == 1 else None
        return self.add(lambda out: Product((ins[0], ins[1]), out, "", fn, probabilities), stack)

    def combination(self, eqn, ins: list, stack: str) -> int:
        """``add``, ``sub``, ``mul``, ``div``, ``max`` or ``min`` of two input-dependent values."""
        name, (a, b) = eqn.primitive.name, ins
        held = [self.statistic_of(a, b), self.statistic_of(b, a)]  # each: a statistic of the other operand
        batch = any(self.statistics[value].batch for value, is_held in zip(ins, held) if is_held)
        if name in ("max", "min"):
            if name == "max":
                maximum = _substituted(eqn, [None, None], [0, 1])
                return self.add(lambda out: Transport((a, b), out, "", "max", maximum), stack)
            return self.opaque(eqn, ins, [0, 1], stack, "it has no propagation rule")
        if name == "mul" and not any(held) and self.self_gated(a, b):
            source = self.source(a)[0]
            fn = _composed(eqn, ins, {0: self.source(a)[1], 1: self.source(b)[1]})
            return self.add(lambda out: Activation(source, out, "", fn, composed=True), stack)
        if batch:
            return self.opaque(eqn, ins, [0, 1], stack, "it combines a value with statistics over the batch "
                               "(train-mode BatchNorm?), which couples the images: propagate the eval-mode forward "
                               "pass")
        if name in ("add", "add_any"):
            return self.add(lambda out: Sum((a, b), out, ""), stack)
        if name == "sub":
            return self.add(lambda out: Sum((a, b), out, "", (1.0, -1.0)), stack)
        if name == "mul" and any(held):
            value, scale = (b, a) if held[0] else (a, b)
            return self.norm(eqn, value, scale, stack)
        if name == "mul":
            return self.product(eqn, ins, stack)
        if held[1]:  # div by a statistic of the numerator
            softmax = self.softmax_pattern(a, b)
            if softmax is not None:
                scores, axes = softmax
                return self.softmax(scores, lambda x: jax.nn.softmax(x, axis=axes), stack)
            reciprocal = self.add(lambda out: Opaque((b,), out, "", lambda s: 1 / s, "div", _where(eqn, stack),
                                                     "a normalising scale"), stack)
            self.statistics[reciprocal] = self.statistics[b]
            return self.norm(eqn, a, reciprocal, stack)
        return self.opaque(eqn, ins, [0, 1], stack, "it divides by an input-dependent value")

    def base(self, value: int) -> int:
        """The value ``value`` is computed from by pointwise functions, constant scales and shifts and centring
        (``v - mean(v)``): the value whose statistics a normalisation of ``value`` takes."""
        while True:
            value = self.source(value)[0]
            node = self.producer.get(value)
            if isinstance(node, Affine) and node.kind == "elementwise":
                value = node.input
            elif (uncentred := self.uncentred(value)) != value:
                value = uncentred
            else:
                return value

    def uncentred(self, value: int) -> int:
        """``v`` for ``value = v - s`` with ``s`` a statistic of ``v`` (its mean, its maximum), else ``value``."""
        node = self.producer.get(value)
        if isinstance(node, Sum) and node.signs == (1.0, -1.0) and self.statistic_of(node.inputs[1], node.inputs[0]):
            return node.inputs[0]
        return value

    def statistic_of(self, statistic: int, value: int) -> bool:
        """Whether ``statistic`` was reduced from ``value`` (up to pointwise functions and centring): LayerNorm's
        mean and scale of its input, a softmax's sum of its exponentials, a gate computed from a pooled input."""
        return statistic in self.statistics and self.base(self.statistics[statistic].root) == self.base(value)

    def norm(self, eqn, value: int, scale: int, stack: str) -> int:
        """``value * scale`` with ``scale`` a statistic, held constant at the current input."""
        dtype = eqn.outvars[0].aval.dtype

        def multiply(x, w):
            return x * w

        return self.add(lambda out: Affine(value, out, "", "norm", multiply, jnp.ones((), dtype), held=scale), stack)

    def softmax_pattern(self, numerator: int, denominator: int) -> tuple[int, tuple[int, ...]] | None:
        """``(x, axes)`` when ``numerator / denominator`` is ``exp(z) / sum(exp(z))`` over ``axes`` (``z = x - max(x)``
        or any ``z = x``): a softmax of ``x``; None if the division is not one."""
        statistic, exp = self.statistics[denominator], self.producer.get(numerator)
        if statistic.root != numerator or not (isinstance(exp, Opaque) and exp.primitive == "exp"):
            return None
        return self.uncentred(exp.inputs[0]), statistic.axes

    def softmax(self, scores: int, fn: Callable[[jax.Array], jax.Array], stack: str) -> int:
        """A softmax unit of ``scores``; its output is attention probabilities (``Product.probabilities``)."""
        out = self.add(lambda out: Softmax(scores, out, "", fn), stack)
        self.probabilities.add(out)
        return out

    def elementwise_affine(self, eqn, ins, acts, const, stack) -> int:
        name, dtype = eqn.primitive.name, eqn.outvars[0].aval.dtype
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
            return self.opaque(eqn, ins, acts, stack, "the input is in the denominator")

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


def node_kind(node: Node) -> str:
    """``conv``, ``dense``, ``norm``, ``softmax``, ``product``, ``sum``, ``activation``, ...: what a node is."""
    return getattr(node, "kind", type(node).__name__.lower())


def _name_nodes(nodes: list[Node], stacks: list[str]) -> list[Node]:
    firsts = [stack.split("/")[0] for stack in stacks if stack]
    root = firsts[0] if firsts and len(set(firsts)) == 1 and "." not in firsts[0] else None
    counts: dict[str, int] = {}
    named = []
    for node, stack in zip(nodes, stacks):
        kind = node_kind(node)
        name = _module_path(stack, root)
        if not name:
            name = f"{kind}{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
        named.append(dataclasses.replace(node, name=name))
    return named


def _fold_scale(node: Affine, scale: jax.Array) -> jax.Array | None:
    """``node``'s weight with ``scale`` (the rank of the output) folded in, or None where it cannot be."""
    if node.kind in ("pool", "elementwise", "norm"):
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
    eval-mode BatchNorm into their conv or dense layer, LayerNorm's scale and shift into its ``norm`` node) where
    that node's output feeds nothing else."""
    uses: dict[int, int] = {}
    for node in graph.nodes:
        for i in node.inputs:
            uses[i] = uses.get(i, 0) + 1
    kept = {graph.output, graph.point}
    nodes: list[Node] = []
    producer: dict[int, int] = {}  # value -> index in nodes
    for node in graph.nodes:
        if isinstance(node, Affine) and node.kind == "elementwise" and node.held is None and node.input in producer:
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
    tracer = _Tracer(frozenset(passthrough), images.shape[0] if images.shape[0] > 1 else -1)
    image_id = tracer.new_id()
    inputs: list = [_Const(leaf) for leaf in leaves] + [image_id]
    if marker is not None:
        inputs.append(_FromMarker())
    (logits,) = tracer.run(closed.jaxpr, closed.consts, inputs)
    if isinstance(logits, _Const) or logits == image_id:
        raise UnsupportedOp("the forward pass's output does not depend on the images through any layer")
    if marker is not None and tracer.point is None:
        raise UnsupportedOp("the layer to read relevance at was not reached in the forward pass")
    nodes = _name_nodes(tracer.nodes, tracer.stacks)
    marker_shape = None if marker is None else jax.ShapeDtypeStruct(marker.shape, marker.dtype)
    return fold_affine(Graph(tuple(nodes), image_id, _unnormalised(tracer, logits), tracer.point,
                             tracer.point_layout, marker_shape))


def _unnormalised(tracer: _Tracer, output: int) -> int:
    """The logits before a final softmax or log-softmax (``x - logsumexp(x)``, ``x - max(x)``): relevance starts
    at the scores the classifier computes, not at their normalisation, which changes no class's rank."""
    while True:
        node = tracer.producer.get(output)
        if isinstance(node, Softmax):
            output = node.input
        elif tracer.uncentred(output) != output:
            output = tracer.uncentred(output)
        else:
            return output


__all__ = ["Activation", "Affine", "Graph", "Node", "Opaque", "PASSTHROUGH", "Product", "Softmax", "Sum", "Transport",
           "UnsupportedOp", "fold_affine", "trace_graph"]
