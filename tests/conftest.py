"""Fixtures shared by the test files."""

import os

# Set before JAX starts its backend (here and in the child processes some tests start, which inherit it): the suite
# compiles thousands of small programs, and LLVM at -O1 without its most expensive passes compiles them faster (the
# suite: 610 -> 549 s on 2 cores), at the price of slower code, which tiny test models do not feel. Every program is
# the same XLA program; comparisons within the suite (resumed against uninterrupted, batched against one at a time)
# compare runs of the same compiler.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=1",
                                    "--xla_llvm_disable_expensive_passes=true"]).strip()
# The experiments' XLA flags (YNN fusions off) as well, whatever test module starts the backend first.
import experiments  # noqa: E402,F401

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache as persistent_cache  # noqa: E402

_CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(scope="session", autouse=True)
def every_program_cached(tmp_path_factory):
    """One persistent compilation cache for the whole suite, shared by the xdist workers, that keeps every program
    (not only those that take JAX's default 1 s to compile). Tests build the same tiny models' steps, evaluators
    and attribution functions again and again, each a new jit of an identical program; with the cache each
    compiles once per suite (a tiny sweep alone: 75 -> 47 s)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    before = {key: getattr(jax.config, key) for key in _CACHE_KEYS}
    jax.config.update("jax_compilation_cache_dir", str(shared / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    for key, value in before.items():
        jax.config.update(key, value)


@pytest.fixture(autouse=True)
def _cache_settings_restored():
    """A test that points the cache elsewhere (a sweep run with ``compilation_cache=True`` uses its own directory)
    leaves the suite's setting as it found it."""
    before = {key: getattr(jax.config, key) for key in _CACHE_KEYS}
    yield
    if any(getattr(jax.config, key) != value for key, value in before.items()):
        for key, value in before.items():
            jax.config.update(key, value)
        persistent_cache.reset_cache()  # reopened at the next compilation, in the suite's directory
