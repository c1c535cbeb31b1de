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
    jaxpr, consts = ((jaxprs[0].jaxpr, jaxprs[0].consts) if isinstance(jaxprs[0], jax_core.ClosedJaxpr)
                     else (jaxprs[0], []))
    if _shapes(jaxpr.invars) != _shapes(eqn.invars) or _shapes(jaxpr.outvars) != _shapes(eqn.outvars):
        return None
    return jaxpr, consts


def bind(eqn, values: list) -> list:
    """Evaluates one equation on ``values``; always a list of outputs."""
    outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]
