"""Shared benchmark helpers: compile-then-time a jitted callable, XLA FLOP counts, the machine's matmul peak, JSON.

Timings are medians over repeats of one call each, synchronised with ``jax.block_until_ready``; compilation is
done ahead of time (``jitted.lower(...).compile()``), timed on its own as ``compile_s``, and reused by the jitted
callable's own cache, so the timed calls never include it. Compare numbers only within one run: other processes
may share the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_counts: list[list[int]] = []


def _on_duration_event(event: str, duration: float, **kwargs):
    if event == _BACKEND_COMPILE_EVENT:
        for counter in _compile_counts:
            counter[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block: ``with count_compiles() as n: ...; n[0]``."""
    counter = [0]
    _compile_counts.append(counter)
    try:
        yield counter
    finally:
        _compile_counts.remove(counter)


def compile_ahead(jitted: Callable, *args) -> tuple[Any, float]:
    """Traces, lowers and compiles ``jitted`` for ``args``; returns (compiled, seconds). The jitted callable's own
    cache reuses this executable, so later ``jitted(*args)`` calls do not compile again."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def xla_flops(compiled) -> float:
    """FLOPs of one call of a compiled executable from XLA's cost analysis (a dict in jax 0.10, a one-element list
    of dicts in older versions); NaN when the backend reports none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def median_time(call: Callable[[], Any], *, repeats: int, warmup: int = 1) -> dict:
    """Runs ``call()`` ``warmup`` times untimed, then ``repeats`` times timed one by one (each result blocked on).

    Returns ``{"median_s", "min_s", "max_s", "repeats"}``. ``call`` may carry state between calls (e.g. a train
    step feeding its new state back) through a closure.
    """
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def matmul_call(size: int = 2048, dtype=jnp.float32) -> tuple[Callable[[], jax.Array], float]:
    """A compiled, warmed-up (size x size) @ (size x size) ``jnp.dot`` in ``dtype`` as a thunk, and its FLOPs."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    return (lambda: dot(a, b)), 2.0 * size**3


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 GFLOP/s of a (size x size) @ (size x size) ``jnp.dot`` on the default device."""
    call, flops = matmul_call(size)
    return flops / median_time(call, repeats=repeats, warmup=0)["min_s"] / 1e9


def interleaved_times(calls: dict[str, Callable[[], Any]], *, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Times every thunk of ``calls`` once per round, round-robin, so that a change in machine load (other
    processes) hits all of them alike; returns the seconds of each call per name. Ratios of these are what to
    compare on a shared machine."""
    for call in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return times


def add_output_flag(parser: argparse.ArgumentParser):
    parser.add_argument("--out", default=None, help="also write the JSON result to this path")


def emit(result: dict, out: str | None = None):
    """Prints ``result`` as one JSON object on stdout, and writes it to ``out`` when given."""
    text = json.dumps(result, sort_keys=False)
    print(text, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def environment() -> dict:
    """Backend facts worth keeping beside any timing."""
    return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind}


def round_floats(tree, digits: int = 4):
    """Rounds the floats of a JSON-like tree to ``digits`` significant digits for readable output."""
    if isinstance(tree, dict):
        return {k: round_floats(v, digits) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [round_floats(v, digits) for v in tree]
    if isinstance(tree, float) and tree == tree and tree not in (float("inf"), float("-inf")):
        return float(f"{tree:.{digits}g}")
    return tree
