"""Small helpers for walking jaxprs, shared by the FLOP counter and the propagation graph."""

from __future__ import annotations

from jax.extend import core as jax_core


def _shapes(atoms) -> list[tuple]:
    return [(tuple(atom.aval.shape), atom.aval.dtype) for atom in atoms]


def call_body(eqn) -> tuple[jax_core.Jaxpr, list] | None:
    """``(jaxpr, consts)`` of an equation that calls one sub-jaxpr on its operands as they are (``jit``,
    ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``, ...); None for any other."""
    jaxprs = [value for value in eqn.params.values() if isinstance(value, (jax_core.Jaxpr, jax_core.ClosedJaxpr))]
    if eqn.primitive.name == "scan" or len(jaxprs) != 1:
        return None
    jaxpr, consts = _body(jaxprs[0])
    if _shapes(jaxpr.invars) != _shapes(eqn.invars) or _shapes(jaxpr.outvars) != _shapes(eqn.outvars):
        return None
    return jaxpr, consts


def _body(value) -> tuple[jax_core.Jaxpr, list]:
    return (value.jaxpr, value.consts) if isinstance(value, jax_core.ClosedJaxpr) else (value, [])


def scan_parts(eqn) -> tuple[int, int, jax_core.Jaxpr, list]:
    """``(num_consts, num_carry, body jaxpr, body consts)`` of a ``scan`` equation: its operands are the consts, the
    initial carry and the scanned inputs, in that order. jax 0.12 describes the operand groups as a flat tree
    ``ft_in`` and the body as an open jaxpr; earlier versions as counts and a closed one."""
    params = eqn.params
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"], *_body(params["jaxpr"])
    consts, carry, _ = params["ft_in"].unpack()  # a flat tree of three groups; iterating one gives its operands
    return len(list(consts)), len(list(carry)), *_body(params["jaxpr"])


def bind(eqn, values: list) -> list:
    """Evaluates one equation on ``values``; always a list of outputs."""
    outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]
