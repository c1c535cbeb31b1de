"""The installed package has a command for every experiment module with a ``main``, and each runs its module's."""

import importlib
import importlib.metadata
import pkgutil

import experiments


def test_every_experiment_module_with_a_main_is_an_installed_command():
    commands = {entry.name: entry for entry in importlib.metadata.entry_points(group="console_scripts")
                if entry.dist is not None and entry.dist.name == "attrjax"}
    runnable = {info.name for info in pkgutil.iter_modules(experiments.__path__)
                if not info.ispkg and hasattr(importlib.import_module(f"experiments.{info.name}"), "main")}
    assert set(commands) == {"attrjax-" + name.replace("_", "-") for name in runnable}
    for name in runnable:
        entry = commands["attrjax-" + name.replace("_", "-")]
        assert entry.load() is importlib.import_module(f"experiments.{name}").main, entry
