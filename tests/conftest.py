"""Fixtures shared by the test files."""

import os

import jax
import pytest

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
    for key, value in before.items():
        if getattr(jax.config, key) != value:
            jax.config.update(key, value)
