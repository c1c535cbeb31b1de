"""Fixtures shared by the test files."""

import jax
import pytest


@pytest.fixture
def every_program_cached(tmp_path_factory):
    """A persistent compilation cache that keeps every program, not only those that take JAX's default 1 s to
    compile: tests that run several tiny training runs (a sweep, a demo and its rerun) compile the same programs
    again in each run, and all of them are faster than that (the tiny sweep: 75 -> 47 s). A sweep run with
    ``compilation_cache=True`` points the cache at its own directory instead."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {key: getattr(jax.config, key) for key in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    for key, value in before.items():
        jax.config.update(key, value)
