"""The README's functional-API example runs as written."""

import os
import re

import chex
import jax
import jax.numpy as jnp


def test_readme_python_example_runs():
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    exec(blocks[0], namespace)  # noqa: S102 - the README's own code
    chex.assert_shape(namespace["teacher_maps"], (8, 7, 7))
    chex.assert_shape(namespace["grads"], (7, 7, 16, 20))
    assert float(jnp.abs(namespace["grads"]).sum()) > 0


def test_readme_own_model_examples_run():
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    namespace = {}
    exec(blocks[1], namespace)  # noqa: S102 - the linen example
    assert int(namespace["state"].step) == 20 and 0 <= namespace["summary"]["mean_auc"] <= 1
    linen_cosine = namespace["summary"]["map_cosine"]
    exec(blocks[2], namespace)  # noqa: S102 - the NNX example, reusing the linen one's data and objective
    assert int(namespace["state"].step) == 20 and -1 <= namespace["summary"]["map_cosine"] <= 1
    assert -1 <= linen_cosine <= 1
    exec(blocks[3], namespace)  # noqa: S102 - loss terms and evaluators, continuing the NNX example
    logged = namespace["history"][-1].keys()
    assert {"loss", "task_loss", "matching_loss", "matching_loss/bn", "matching_loss/gxa"} <= logged
    assert 0 <= namespace["metrics"]["gradcam/pointing_accuracy"] <= 1
    exec(blocks[5], namespace)  # noqa: S102 - quantization, reusing the linen example's teacher and data
    assert float(namespace["gap"]) < 1e-5
    chex.assert_shape(namespace["qat_lrp"], (16, 32, 32))
    chex.assert_tree_all_finite(namespace["qat_lrp"])
    assert int(namespace["qat_state"].step) == 20
    assert namespace["deployed"].nbytes < 0.4 * 4 * sum(x.size for x in jax.tree.leaves(namespace["teacher_vars"]))


def test_readme_propagation_example_runs():
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    namespace = {}
    exec("import jax, jax.numpy as jnp\n" + blocks[4], namespace)  # noqa: S102 - the propagation example
    for name in ("paper", "custom", "rap_maps"):
        chex.assert_shape(namespace[name], (4, 32, 32))
        chex.assert_tree_all_finite(namespace[name])
    chex.assert_shape(namespace["ebp"], (4, 16, 16))  # layer2_0's map
