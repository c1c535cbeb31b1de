"""The supported versions are stated once and enforced at import; the front door is the curated API; the 0.1 import
paths keep working with one warning each that names the new path."""

import importlib
import os
import re
import subprocess
import sys
import tomllib
import warnings

import pytest

import attrjax
from attrjax import _deprecation, _versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.oldest
NAMESPACES = ("attribution", "data", "distributed", "evaluation", "metrics", "models", "pruning", "quantization",
              "training", "utils")


def test_pyproject_and_the_oldest_pins_state_the_supported_ranges():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    stated = dict(re.fullmatch(r"([\w-]+)(.*)", requirement).groups() for requirement in dependencies)
    with open(os.path.join(ROOT, "ci", "oldest.txt")) as f:
        pinned = dict(line.strip().split("==") for line in f if line.strip() and not line.startswith("#"))
    for name in _versions.SUPPORTED:
        assert name + stated[name] == _versions.requirement(name)
        assert pinned[name] == _versions.SUPPORTED[name][0]


def test_versions_outside_the_ranges_are_named_with_the_fix(monkeypatch):
    assert _versions.version_tuple("0.12.0.1rc1") == (0, 12, 0, 1)
    installed = {"jax": "0.12.1", "jaxlib": "0.9.0", "flax": "0.13.0", "optax": "0.2.8", "qwix": "0.1.8"}
    assert _versions.unsupported(installed) == ["jaxlib", "flax"]
    monkeypatch.setattr(_versions, "installed_versions", lambda: installed)
    with pytest.raises(ImportError, match=re.escape(
            "attrjax does not support the installed jaxlib 0.9.0 (supported: >=0.10.2,<0.13), flax 0.13.0 "
            "(supported: >=0.12.8,<0.13). Install supported versions: pip install 'jaxlib>=0.10.2,<0.13' "
            "'flax>=0.12.8,<0.13'")):
        _versions.check()


def test_importing_attrjax_beside_an_unsupported_jax_fails_with_one_message(tmp_path):
    """A real import, in a fresh interpreter that finds a jax 0.9.0 distribution first on its path."""
    info = tmp_path / "jax-0.9.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jax\nVersion: 0.9.0\n")
    result = subprocess.run([sys.executable, "-c", "import attrjax"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: attrjax does not support the installed jax 0.9.0 (supported: >=0.10.2,<0.13). Install "
        "supported versions: pip install 'jax>=0.10.2,<0.13'")


def test_the_front_door_is_the_namespaces_own_objects():
    assert len(attrjax.__all__) == len(set(attrjax.__all__))
    homes = {}
    for namespace in NAMESPACES:
        module = getattr(attrjax, namespace)
        assert module is importlib.import_module(f"attrjax.{namespace}")
        for name in module.__all__:
            homes.setdefault(name, getattr(module, name))
    # attrjax.train is the loop; once a 0.1 path under attrjax.train is imported, Python binds the old package's
    # stand-in there, which calls the loop.
    assert attrjax.train is attrjax.training.train or isinstance(attrjax.train, _deprecation.MovedTrainPackage)
    for name in set(attrjax.__all__) - {"train"}:
        assert getattr(attrjax, name) is homes[name], name  # each top-level name is also in its namespace
    for namespace in NAMESPACES:  # implementation modules stay out of the curated lists
        assert not [name for name in getattr(attrjax, namespace).__all__ if name.startswith("_")]


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_deprecation, "_warned", set())


def test_an_old_module_path_warns_once_and_names_the_new_one(fresh_warnings):
    with pytest.warns(DeprecationWarning) as caught:
        from attrjax.attribution.gradcam import grad_cam
        from attrjax.attribution.gradcam import grad_cam as again  # noqa: F401 - the same name a second time
    assert grad_cam is attrjax.grad_cam
    assert [str(w.message) for w in caught] == [
        "attrjax.attribution.gradcam.grad_cam is deprecated and will be removed in attrjax 0.3.0: use attrjax.grad_cam"]
    assert caught[0].filename == __file__  # attributed to the line that imports it


def test_old_names_without_a_public_twin_say_so_or_name_the_replacement(fresh_warnings):
    with pytest.warns(DeprecationWarning, match=r"attrjax\.models\.read_pth_without_torch is private since attrjax "
                                                r"0\.2 \(attrjax\.models\._torchvision\.read_pth_without_torch\)"):
        from attrjax.models import read_pth_without_torch  # noqa: F401
    with pytest.warns(DeprecationWarning, match=re.escape(
            "attrjax.evaluation.localization_report is deprecated and will be removed in attrjax 0.3.0: use "
            "attrjax.AttributionEvaluator(model, layer=..., prediction_rule=...).evaluate(variables, batches)")):
        from attrjax.evaluation import localization_report  # noqa: F401
    with pytest.raises(AttributeError, match="module 'attrjax.models' has no attribute 'no_such_name'"):
        attrjax.models.no_such_name  # noqa: B018


def test_the_old_training_package_imports_and_the_loop_is_still_attrjax_train(fresh_warnings):
    with pytest.warns(DeprecationWarning, match=r"attrjax\.train\.TrainState is deprecated .* use attrjax\."
                                                r"TrainState"):
        from attrjax.train import TrainState
    with pytest.warns(DeprecationWarning, match=r"attrjax\.train\.loop\.run_record is deprecated .* use "
                                                r"attrjax\.training\.run_record"):
        from attrjax.train.loop import run_record
    assert TrainState is attrjax.TrainState and run_record is attrjax.training.run_record
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callable(attrjax.train)  # the loop, or the old package's stand-in, which calls the loop


def test_every_0_1_module_path_still_imports(fresh_warnings):
    for old, new in _deprecation.MOVED_MODULES.items():
        assert importlib.import_module(old).__name__ == old
        importlib.import_module(new)
