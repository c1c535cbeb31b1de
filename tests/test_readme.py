"""The README's examples run as written. Each ```python block follows an ``<!-- example: NAME -->`` marker, by which
the tests find it, so adding or moving a block cannot break the test of another."""

import os
import re

import chex
import jax
import jax.numpy as jnp
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _examples() -> dict[str, str]:
    with open(README) as f:
        text = f.read()
    named = dict(re.findall(r"<!-- example: ([\w-]+) -->\n```python\n(.*?)```", text, flags=re.S))
    assert len(named) == text.count("```python"), "every ```python block of README.md needs an example marker"
    return named


def _run(name: str, namespace: dict) -> dict:
    exec(_examples()[name], namespace)  # noqa: S102 - the README's own code
    return namespace


def test_every_example_has_its_own_name():
    with open(README) as f:
        names = re.findall(r"<!-- example: ([\w-]+) -->", f.read())
    assert len(names) == len(set(names)) >= 6, names


@pytest.mark.oldest
def test_readme_python_example_runs():
    namespace = _run("functional", {})
    chex.assert_shape(namespace["teacher_maps"], (8, 7, 7))
    chex.assert_shape(namespace["grads"], (7, 7, 16, 20))
    assert float(jnp.abs(namespace["grads"]).sum()) > 0


def test_readme_own_model_examples_run():
    namespace = _run("linen", {})
    assert int(namespace["state"].step) == 20 and 0 <= namespace["summary"]["mean_auc"] <= 1
    linen_cosine = namespace["summary"]["map_cosine"]
    _run("nnx", namespace)  # reuses the linen example's data and objective
    assert int(namespace["state"].step) == 20 and -1 <= namespace["summary"]["map_cosine"] <= 1
    assert -1 <= linen_cosine <= 1
    _run("loss-terms", namespace)  # continues the NNX example
    logged = namespace["history"][-1].keys()
    assert {"loss", "task_loss", "matching_loss", "matching_loss/bn", "matching_loss/gxa"} <= logged
    assert 0 <= namespace["metrics"]["gradcam/pointing_accuracy"] <= 1
    _run("quantization", namespace)  # reuses the linen example's teacher and data
    assert float(namespace["gap"]) < 1e-5
    chex.assert_shape(namespace["qat_lrp"], (16, 32, 32))
    chex.assert_tree_all_finite(namespace["qat_lrp"])
    assert int(namespace["qat_state"].step) == 20
    assert namespace["deployed"].nbytes < 0.4 * 4 * sum(x.size for x in jax.tree.leaves(namespace["teacher_vars"]))


def test_readme_propagation_example_runs():
    namespace = _run("propagation", {"jax": jax, "jnp": jnp})
    for name in ("paper", "custom", "rap_maps"):
        chex.assert_shape(namespace[name], (4, 32, 32))
        chex.assert_tree_all_finite(namespace[name])
    chex.assert_shape(namespace["ebp"], (4, 16, 16))  # layer2_0's map


def test_readme_vit_example_runs():
    namespace = _run("vit", {})
    chex.assert_shape(namespace["gradcam"], (8, 5, 4, 4))
    for name in ("attnlrp", "cp_lrp"):
        chex.assert_shape(namespace[name], (8, 32, 32))
        chex.assert_tree_all_finite(namespace[name])
    chex.assert_shape(namespace["rollout"], (8, 4, 4))
    chex.assert_shape(namespace["rollouts"], (8, 5, 4, 4))
    assert int(namespace["state"].step) == 4 and float(namespace["history"][-1]["matching_loss"]) > 0
