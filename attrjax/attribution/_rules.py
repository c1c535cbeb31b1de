"""Propagation rules as small values, and composites that say which layer gets which rule.

A rule maps the relevance ``R`` (shaped like the layer's output) of an ``Affine`` layer ``z = fn(x, W) + b`` to the
relevance of its input ``x``. All rules use the gradient form of LRP: a sum over a linear map's outputs
``sum_j x_i w_ij s_j`` is ``x_i * vjp(fn(., W))(s)_i``, so a convolution of any stride, padding or grouping needs no
unfolding and everything stays batched. Notation: ``+``/``-`` positive and negative parts, ``s/z`` a safe division
that is 0 where ``z`` is 0.

The rules (relevance of input i):

- ``Epsilon(epsilon)``: ``sum_j x_i w_ij / (z_j + epsilon sign z_j) R_j``, ``z_j`` with the bias, ``sign(0) = 1``.
- ``AlphaBeta(alpha, beta)``: ``sum_j (alpha z+_ij / z+_j - beta z-_ij / z-_j) R_j`` with
  ``z+_ij = x+_i w+_ij + x-_i w-_ij`` and ``z-_ij = x+_i w-_ij + x-_i w+_ij``; biases left out; an output with no
  negative part sends all its relevance to the positive one (so relevance is conserved exactly).
- ``ZBox(low, high)`` (z^B): ``sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / (sum_i' same) R_j``; bounds: each image's
  min and max by default.
- ``Gamma(gamma, epsilon)``: the epsilon rule with ``W + gamma W+`` and ``b + gamma b+``.
- ``Flat()``: ``sum_j R_j / (number of inputs of j)``, every connected input alike.
- ``WSquare()``: ``sum_j w_ij^2 / (sum_i' w_i'j^2) R_j``.
- ``WinningProbability()`` (Excitation Backprop): ``x_i w+_ij / (sum_i' x_i' w+_i'j) P_j``, no biases, only where
  that sum is > 0.

A residual sum ``y = a + b + ...`` splits relevance in proportion to each branch's value (``SumRule``), signed or
by positive parts (a difference ``a - b`` is the sum of ``a`` and ``-b``). Elementwise activations pass relevance
unchanged; max-pooling sends it to the arg-max (ties split evenly); layout ops move it with the values.

Transformers (AttnLRP, Achtibat et al., ICML 2024; Ali et al., ICML 2022):

- A normalising scale computed from the input (LayerNorm's and RMSNorm's ``1 / sqrt(var + eps)``) is held constant
  at the current input: the layer is the elementwise linear map ``y = x * s * gamma + beta`` (kind ``norm``), which
  gets its composite's rule (the epsilon rule: ``R_x = x s gamma / y R_y``, the identity when there is no ``beta``);
  the centring ``x - mean(x)`` is a linear map, propagated as a sum of ``x`` and ``-mean(x)`` and the mean pool.
- A softmax ``s = softmax(x)``: ``R_x_i = x_i (R_i - s_i sum_j R_j)``, the first-order expansion at ``x`` without
  its bias term (not conservative). Computed for any layout as ``x * vjp(softmax)(R / s)``.
- A product of two input-dependent values (``Q Kᵀ``, ``A V``, a gate), each output ``o = sum_k a_k b_k``:
  ``UniformProduct``: every term's share ``a_k b_k / o R_o`` goes half to ``a_k``, half to ``b_k``.
  ``ConstantAttention`` (CP-LRP): attention probabilities held constant, so ``A V`` sends everything to ``V`` by
  the epsilon rule with weights ``A``, and nothing reaches the softmax, ``Q`` or ``K``; other products as uniform.
- Pointwise nonlinearities of one value (GELU in both forms, SiLU) pass relevance unchanged.

A ``Composite`` picks one rule per affine layer: by name (``by_name``), then by position (``first``: the layers that
see the images; ``last``: the classifier), then by kind (``conv``, ``dense``, ``pool``, ``elementwise``, ``norm``),
then ``default``; ``sums`` and ``products`` are the rules of sums and products. Presets: ``COMPOSITES``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Union

import jax
import jax.numpy as jnp

from attrjax.attribution._graph import Affine, Graph, Product

Bounds = tuple[Union[float, jax.Array], Union[float, jax.Array]]
KINDS = ("conv", "dense", "pool", "elementwise", "norm")


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, 0 where the denominator is 0 (with a gradient that stays finite)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def positive(a: jax.Array) -> jax.Array:
    """``max(a, 0)``, elementwise."""
    return jnp.maximum(a, 0.0)


def negative(a: jax.Array) -> jax.Array:
    """``min(a, 0)``, elementwise."""
    return jnp.minimum(a, 0.0)


def per_image_sum(x: jax.Array) -> jax.Array:
    """(B, ...) -> (B, 1, ..., 1): the sum over each image's elements, kept broadcastable."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def linearized(layer: Affine, x: jax.Array, weight: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """``(z, send)`` from one linearisation: ``z = fn(x, weight)`` (no bias) and ``send(share) = x * vjp(share)``,
    i.e. ``sum_j x_i w_ij share_j`` for every input i."""
    z, vjp_fn = jax.vjp(lambda a: layer.linear(a, weight), x)
    return z, lambda share: x * vjp_fn(share)[0]


def _stabilise(z: jax.Array, epsilon: float) -> jax.Array:
    return z + epsilon * jnp.where(z >= 0, 1.0, -1.0)


def _check_non_negative(rule: str, **values: float):
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{rule}: {name} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class Epsilon:
    """LRP-epsilon: ``R_i = sum_j x_i w_ij / (z_j + epsilon sign z_j) R_j`` with the bias in ``z_j``; small
    ``epsilon`` is LRP-0, larger values absorb the relevance of weakly activated outputs."""

    epsilon: float = 1e-6

    def __post_init__(self):
        _check_non_negative("Epsilon", epsilon=self.epsilon)

    def __call__(self, layer: Affine, x: jax.Array, relevance: jax.Array) -> jax.Array:
        z, send = linearized(layer, x, layer.weight)
        if layer.bias is not None:
            z = z + layer.bias
        return send(safe_divide(relevance, _stabilise(z, self.epsilon)))


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
    """LRP-alpha-beta: positive contributions get ``alpha`` times their share of the relevance, negative ones
    ``-beta`` times theirs (``alpha - beta = 1`` conserves relevance); ``AlphaBeta(1, 0)`` is the paper's rule."""

    alpha: float = 1.0
    beta: float = 0.0

    def __post_init__(self):
        _check_non_negative("AlphaBeta", beta=self.beta)
        if abs(self.alpha - self.beta - 1.0) > 1e-9:
            raise ValueError(f"AlphaBeta needs alpha - beta = 1 (relevance is conserved), got alpha={self.alpha}, "
                             f"beta={self.beta}")

    def __call__(self, layer: Affine, x: jax.Array, relevance: jax.Array) -> jax.Array:
        x_pos, x_neg = positive(x), negative(x)
        w_pos, w_neg = positive(layer.weight), negative(layer.weight)

        def shares(w_for_pos_x, w_for_neg_x):
            # Contributions x+ w_for_pos_x + x- w_for_neg_x per output, and the map of output shares to inputs.
            return jax.vjp(lambda xp, xn: layer.linear(xp, w_for_pos_x) + layer.linear(xn, w_for_neg_x), x_pos, x_neg)

        z_pos, vjp_pos = shares(w_pos, w_neg)
        z_neg, vjp_neg = shares(w_neg, w_pos)
        # An output without inhibitory contributions sends all its relevance to the excitatory ones (keeps
        # conservation, e.g. through an average pool, whose weights are all positive).
        no_neg = z_neg == 0
        c_pos, c_neg = vjp_pos(safe_divide(jnp.where(no_neg, 1.0, self.alpha) * relevance, z_pos))
        result = x_pos * c_pos + x_neg * c_neg
        if self.beta:
            c_pos, c_neg = vjp_neg(safe_divide(jnp.where(no_neg, 0.0, self.beta) * relevance, z_neg))
            result = result - (x_pos * c_pos + x_neg * c_neg)
        return result


def _check_bounds(low: jax.Array, high: jax.Array, x: jax.Array):
    if isinstance(x, jax.core.Tracer) or isinstance(low, jax.core.Tracer) or isinstance(high, jax.core.Tracer):
        return  # values unknown while tracing
    if bool(jnp.any(x < low - 1e-6)) or bool(jnp.any(x > high + 1e-6)):
        raise ValueError(f"ZBox bounds do not contain the layer's inputs: they range over [{float(jnp.min(x)):.4g}, "
                         f"{float(jnp.max(x)):.4g}]; pass bounds that hold every input value (e.g. the normalised "
                         "image's least and greatest possible values), or None for each image's own min and max")


@dataclasses.dataclass(frozen=True)
class ZBox:
    """z^B with ``low``/``high`` scalars or arrays broadcastable to the inputs; None: each image's own min and max."""

    low: float | jax.Array | None = None
    high: float | jax.Array | None = None

    def __post_init__(self):
        if (self.low is None) != (self.high is None):
            raise ValueError("ZBox needs both bounds or neither (None: each image's min and max)")
        if (self.low is not None and self.high is not None and jnp.ndim(self.low) == 0 and jnp.ndim(self.high) == 0
                and self.low > self.high):
            raise ValueError(f"ZBox needs low <= high, got {self.low} > {self.high}")

    def bounds(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(low, high)`` broadcast to ``x``'s shape; a given bound is checked to hold every value of ``x``."""
        if self.low is None:  # per image, as the paper's reference code does
            low = jnp.min(x, axis=tuple(range(1, x.ndim)), keepdims=True)
            high = jnp.max(x, axis=tuple(range(1, x.ndim)), keepdims=True)
        else:
            low, high = jnp.asarray(self.low, x.dtype), jnp.asarray(self.high, x.dtype)
            _check_bounds(low, high, x)
        return jnp.broadcast_to(low, x.shape), jnp.broadcast_to(high, x.shape)

    def __call__(self, layer: Affine, x: jax.Array, relevance: jax.Array) -> jax.Array:
        low, high = self.bounds(x)
        w_pos, w_neg = positive(layer.weight), negative(layer.weight)

        def z_fn(a, lo, hi):
            return layer.linear(a) - layer.linear(lo, w_pos) - layer.linear(hi, w_neg)

        z, vjp_fn = jax.vjp(z_fn, x, low, high)
        c_x, c_low, c_high = vjp_fn(safe_divide(relevance, z))
        return x * c_x + low * c_low + high * c_high


@dataclasses.dataclass(frozen=True)
class Gamma:
    """LRP-gamma: the epsilon rule on ``W + gamma W+`` and ``b + gamma b+``, favouring positive contributions."""

    gamma: float = 0.25
    epsilon: float = 1e-6

    def __post_init__(self):
        _check_non_negative("Gamma", gamma=self.gamma, epsilon=self.epsilon)

    def __call__(self, layer: Affine, x: jax.Array, relevance: jax.Array) -> jax.Array:
        z, send = linearized(layer, x, layer.weight + self.gamma * positive(layer.weight))
        if layer.bias is not None:
            z = z + layer.bias + self.gamma * positive(layer.bias)
        return send(safe_divide(relevance, _stabilise(z, self.epsilon)))


def _input_free(layer: Affine, x: jax.Array, weight: jax.Array, relevance: jax.Array) -> jax.Array:
    """``sum_j v_ij / (sum_i' v_i'j) R_j`` for coefficients ``v`` = ``weight`` on every input (values ignored)."""
    ones = jnp.ones_like(x)
    z, vjp_fn = jax.vjp(lambda a: layer.linear(a, weight), ones)
    return vjp_fn(safe_divide(relevance, z))[0]


@dataclasses.dataclass(frozen=True)
class Flat:
    """Every input connected to an output gets an equal share of its relevance, whatever its value or weight."""

    def __call__(self, layer: Affine, x: jax.Array, relevance: jax.Array) -> jax.Array:
        return _input_free(layer, x, jnp.ones_like(layer.weight), relevance)


@dataclasses.dataclass(frozen=True)
class WSquare:
    """Inputs share an output's relevance in proportion to their squared weights, whatever their values."""

    def __call__(self, layer: Affine, x: jax.Array, relevance: jax.Array) -> jax.Array:
        return _input_free(layer, x, jnp.square(layer.weight), relevance)


@dataclasses.dataclass(frozen=True)
class WinningProbability:
    """Excitation Backprop's marginal winning probability (the relevance is a probability mass). Defined for
    non-negative inputs (ReLU networks) only."""

    non_negative_inputs = True  # a transformer's graph is refused (its inputs can be negative)

    def __call__(self, layer: Affine, x: jax.Array, relevance: jax.Array) -> jax.Array:
        z, send = linearized(layer, x, positive(layer.weight))
        return send(safe_divide(relevance, jnp.where(z > 0, z, 0.0)))


@dataclasses.dataclass(frozen=True)
class SumRule:
    """A residual sum ``y = a + b + ...``, as a layer with unit weights.

    ``positive=False``: each branch gets its share of the value, ``a / (y + epsilon sign y) R`` (signed; zennit's
    sum rule). ``positive=True``: the alpha1-beta0 view, each branch gets its share of the positive part,
    ``a+ / (a+ + b+ + ...) R``, so non-negative relevance stays non-negative and is conserved exactly.
    """

    epsilon: float = 0.0
    positive: bool = False

    def __post_init__(self):
        _check_non_negative("SumRule", epsilon=self.epsilon)

    def __call__(self, inputs: tuple[jax.Array, ...], relevance: jax.Array) -> tuple[jax.Array, ...]:
        if self.positive:
            inputs = tuple(positive(branch) for branch in inputs)
        share = safe_divide(relevance, _stabilise(sum(inputs[1:], inputs[0]), self.epsilon))
        return tuple(branch * share for branch in inputs)


@dataclasses.dataclass(frozen=True)
class UniformProduct:
    """The uniform rule for a product of two input-dependent values: each term ``a_k b_k`` of an output ``o`` gets
    ``a_k b_k / (o + epsilon sign o) R_o``, half of it to each factor."""

    epsilon: float = 1e-6

    def __post_init__(self):
        _check_non_negative("UniformProduct", epsilon=self.epsilon)

    def receivers(self, node: Product) -> tuple[int, ...]:
        """The inputs of ``node`` that get relevance."""
        return node.inputs

    def __call__(self, node: Product, xs: tuple[jax.Array, jax.Array], relevance: jax.Array) -> tuple:
        z, vjp_fn = jax.vjp(node.fn, *xs)
        shares = vjp_fn(safe_divide(relevance, _stabilise(z, self.epsilon)))
        return tuple(0.5 * x * share for x, share in zip(xs, shares))


@dataclasses.dataclass(frozen=True)
class ConstantAttention:
    """CP-LRP: attention probabilities held constant. A product with a softmax output (``A V``) sends all its
    relevance to the other factor by the epsilon rule with weights ``A``; the probabilities get none (so nothing
    reaches the softmax, the queries or the keys). Other products (gates) follow ``UniformProduct``."""

    epsilon: float = 1e-6

    def __post_init__(self):
        _check_non_negative("ConstantAttention", epsilon=self.epsilon)

    def receivers(self, node: Product) -> tuple[int, ...]:
        """The inputs of ``node`` that get relevance."""
        return node.inputs if node.probabilities is None else (node.inputs[1 - node.probabilities],)

    def __call__(self, node: Product, xs: tuple[jax.Array, jax.Array], relevance: jax.Array) -> tuple:
        if node.probabilities is None:
            return UniformProduct(self.epsilon)(node, xs, relevance)
        other = 1 - node.probabilities

        def linear(x):
            return node.fn(*((x, xs[1]) if other == 0 else (xs[0], x)))

        z, vjp_fn = jax.vjp(linear, xs[other])
        sent = xs[other] * vjp_fn(safe_divide(relevance, _stabilise(z, self.epsilon)))[0]
        return (sent, None) if other == 0 else (None, sent)


def softmax_relevance(fn: Callable[[jax.Array], jax.Array], x: jax.Array, relevance: jax.Array) -> jax.Array:
    """The softmax rule: ``R_x_i = x_i (R_i - s_i sum_j R_j)`` for ``s = fn(x)``, as ``x * vjp(fn)(R / s)`` (which
    is that sum for any layout of the softmax's axes)."""
    s, vjp_fn = jax.vjp(fn, x)
    return x * vjp_fn(safe_divide(relevance, s))[0]


# (layer, its input x, the relevance of its output) -> the relevance of x: every rule above.
Rule = Callable[[Affine, jax.Array, jax.Array], jax.Array]
ProductRule = Union[UniformProduct, ConstantAttention]


@dataclasses.dataclass(frozen=True)
class Composite:
    """Which rule each affine layer gets: ``by_name`` > ``first``/``last`` > ``by_kind`` > ``default``.

    ``first`` is for the layers that see the images (no affine layer before them), ``last`` for those with no
    affine layer after them (the classifier); ``sums`` is the rule of residual additions and differences,
    ``products`` that of products of two input-dependent values (attention, gates).
    """

    default: Rule = AlphaBeta()
    by_kind: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
    first: Rule | None = None
    last: Rule | None = None
    by_name: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
    sums: SumRule = SumRule()
    products: ProductRule = UniformProduct()

    def __post_init__(self):
        unknown = sorted(set(self.by_kind) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown layer kinds {unknown} in by_kind; the kinds are {', '.join(KINDS)}")
        for where, rule in [("default", self.default), ("first", self.first), ("last", self.last),
                            *self.by_kind.items(), *self.by_name.items()]:
            if rule is not None and not callable(rule):
                raise ValueError(f"the rule for {where!r} must be a rule object (e.g. AlphaBeta(), Epsilon()), got "
                                 f"{rule!r}")
        if not isinstance(self.products, (UniformProduct, ConstantAttention)):
            raise ValueError(f"products must be UniformProduct() or ConstantAttention(), got {self.products!r}")

    def resolve(self, graph: Graph) -> dict[Affine, Rule]:
        """The rule of every affine layer of ``graph``; raises if ``by_name`` names a layer it does not have."""
        names = {node.name for node in graph.affine_nodes}
        unknown = sorted(set(self.by_name) - names)
        if unknown:
            raise ValueError(f"the composite names layers {unknown} that this model does not have; its affine layers "
                             f"are: {', '.join(dict.fromkeys(node.name for node in graph.affine_nodes))}")
        first, last = graph.positions()
        rules = {}
        for node in graph.affine_nodes:
            if node.name in self.by_name:
                rules[node] = self.by_name[node.name]
            elif self.first is not None and node.name in first:
                rules[node] = self.first
            elif self.last is not None and node.name in last:
                rules[node] = self.last
            else:
                rules[node] = self.by_kind.get(node.kind, self.default)
        return rules


COMPOSITES: dict[str, Composite] = {
    # The paper's LRP: z^B at the input layer, alpha1-beta0 everywhere else (residual sums too).
    "paper": Composite(default=AlphaBeta(1.0, 0.0), first=ZBox(), sums=SumRule(positive=True)),
    # z^B at the input, alpha1-beta0 in the convs and residual sums, epsilon in the dense layers and pools.
    "composite": Composite(default=AlphaBeta(1.0, 0.0), first=ZBox(), by_kind={"dense": Epsilon(), "pool": Epsilon()},
                           sums=SumRule(positive=True)),
    "epsilon_plus": Composite(default=Epsilon(), by_kind={"conv": AlphaBeta(1.0, 0.0)}),
    "epsilon_plus_flat": Composite(default=Epsilon(), by_kind={"conv": AlphaBeta(1.0, 0.0)}, first=Flat()),
    "epsilon_gamma_box": Composite(default=Epsilon(), by_kind={"conv": Gamma(0.25)}, first=ZBox()),
    "epsilon_alpha2_beta1": Composite(default=Epsilon(), by_kind={"conv": AlphaBeta(2.0, 1.0)}),
    "excitation_backprop": Composite(default=WinningProbability(), sums=SumRule(positive=True)),
    # Transformers. AttnLRP: epsilon everywhere, LayerNorm's scale held, the softmax rule, the uniform rule for
    # products; signed sums (LayerNorm's centring is a difference).
    "attnlrp": Composite(default=Epsilon(), products=UniformProduct()),
    # CP-LRP: as AttnLRP, with the attention probabilities held constant (relevance flows through the values only).
    "cp_lrp": Composite(default=Epsilon(), products=ConstantAttention()),
    # AttnLRP with the gamma rule in the dense layers, which gives less noisy maps on vision transformers.
    "attnlrp_gamma": Composite(default=Epsilon(), by_kind={"dense": Gamma(0.25)}, products=UniformProduct()),
}
"""Preset composites by name (``lrp(..., composite="epsilon_plus")``); ``"paper"`` is the paper's LRP."""


def resolve_composite(composite: str | Composite) -> Composite:
    """A ``Composite`` as it is, or the preset of ``COMPOSITES`` with that name."""
    if isinstance(composite, Composite):
        return composite
    if composite not in COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}; presets: {', '.join(COMPOSITES)}, or pass a Composite")
    return COMPOSITES[composite]


__all__ = ["AlphaBeta", "Bounds", "COMPOSITES", "Composite", "ConstantAttention", "Epsilon", "Flat", "Gamma", "KINDS",
           "ProductRule", "SumRule", "UniformProduct", "WSquare", "WinningProbability", "ZBox", "linearized",
           "per_image_sum", "resolve_composite", "safe_divide", "softmax_relevance"]
