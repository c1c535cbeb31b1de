"""Import paths of attrjax 0.1 keep working until 0.3, each with one warning that names the new path.

attrjax 0.2 moved the implementation into private modules (``attrjax.attribution._gradcam``) and made each package's
``__init__`` the list of names users may rely on. An old module path (``attrjax.attribution.gradcam``) imports a
stand-in module whose attributes are the private module's; the first use of each attribute warns
(``DeprecationWarning``) and names its public home, or says that the name is private now.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

REMOVED_IN = "0.3.0"

# Old module path -> the private module that holds its code now.
MOVED_MODULES = {
    **{f"attrjax.attribution.{name}": f"attrjax.attribution._{name}"
       for name in ("gradcam", "gradients", "graph", "methods", "propagation", "rap", "rules")},
    **{f"attrjax.data.{name}": f"attrjax.data._{name}"
       for name in ("images", "loader", "pipeline", "prepared", "shapes", "tfds_datasets")},
    **{f"attrjax.metrics.{name}": f"attrjax.metrics._{name}"
       for name in ("agreement", "classification", "faithfulness", "localization", "statistics")},
    **{f"attrjax.models.{name}": f"attrjax.models._{name}"
       for name in ("adapters", "layout", "resnet", "split", "torchvision", "vgg")},
    **{f"attrjax.pruning.{name}": f"attrjax.pruning._{name}"
       for name in ("counting", "masks", "structured", "structured_resnet")},
    # ``attrjax.train`` is the training loop itself now; its namespace is ``attrjax.training``.
    "attrjax.train": "attrjax.training",
    **{f"attrjax.train.{name}": f"attrjax.training._{name}"
       for name in ("checkpoint", "loop", "metrics", "objective", "run_config", "sharding", "state", "step")},
    **{f"attrjax.{name}": f"attrjax._{name}"
       for name in ("chunking", "distill", "files", "jaxprs", "locking", "matching", "paths", "progress")},
}

# Old names that have no public twin, but a public way to do the same.
REPLACEMENTS = {
    "attrjax.evaluation.localization_report":
        "attrjax.AttributionEvaluator(model, layer=..., prediction_rule=...).evaluate(variables, batches)",
    "attrjax.evaluation.predict": "attrjax.ClassificationEvaluator(model).predictions(variables, batches)",
    "attrjax.evaluation.make_predict_fn": "attrjax.ClassificationEvaluator(model).predict_fn",
}

_warned: set[str] = set()


def warn_once(old: str, message: str, stacklevel: int) -> None:
    """A ``DeprecationWarning`` the first time ``old`` is used in this process."""
    if old not in _warned:
        _warned.add(old)
        warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def public_path(name: str, value: Any) -> str | None:
    """The public dotted path of ``value`` exported as ``name``, or None when no namespace exports it: the front door
    first, then the namespace that exports it (no object is exported by two)."""
    front_door = importlib.import_module("attrjax")
    for namespace in ("attrjax", *(f"attrjax.{name}" for name in front_door._NAMESPACES)):
        module = importlib.import_module(namespace)
        if name in getattr(module, "__all__", ()) and getattr(module, name) is value:
            return f"{namespace}.{name}"
    return None


def moved_message(old: str, name: str, value: Any, private_module: str) -> str:
    """The warning for ``old`` (a dotted path of 0.1) whose object ``value`` lives in ``private_module`` now."""
    new = REPLACEMENTS.get(old) or public_path(name, value)
    if new is not None:
        return f"{old} is deprecated and will be removed in attrjax {REMOVED_IN}: use {new}"
    return (f"{old} is private since attrjax 0.2 ({private_module}.{name}) and may change without notice; "
            f"the old path will be removed in attrjax {REMOVED_IN}")


def moved_attribute(old: str, name: str, private_module: str) -> Any:
    """``private_module.name``, reached through its 0.1 path ``old``: warns the first time (``stacklevel``: the
    user's line, two frames above the ``__getattr__`` that calls this)."""
    value = getattr(importlib.import_module(private_module), name)
    warn_once(old, moved_message(old, name, value, private_module), stacklevel=4)
    return value


class MovedModule(types.ModuleType):
    """Stands in for a module of 0.1: every attribute is the private module's, and warns on first use."""

    def __init__(self, old: str, new: str):
        super().__init__(old, f"Deprecated: moved to {new}.")
        self.__dict__["_attrjax_new_module"] = new

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return moved_attribute(f"{self.__name__}.{name}", name, self.__dict__["_attrjax_new_module"])

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__dict__["_attrjax_new_module"]))


class MovedTrainPackage(MovedModule):
    """Stands in for the 0.1 package ``attrjax.train``. Importing an old path binds it as ``attrjax.train``, where
    the training loop lives now, so it also calls the loop."""

    def __init__(self, old: str, new: str):
        super().__init__(old, new)
        self.__dict__["__path__"] = []  # a package: its old submodules are stand-ins too

    def __call__(self, *args, **kwargs):
        return importlib.import_module("attrjax.training").train(*args, **kwargs)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the old module paths as :class:`MovedModule` stand-ins."""

    def find_spec(self, fullname, path, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        stand_in = MovedTrainPackage if spec.name == "attrjax.train" else MovedModule
        return stand_in(spec.name, MOVED_MODULES[spec.name])

    def exec_module(self, module):
        pass


def install() -> None:
    """Makes the old module paths importable (once per process)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def package_getattr(package: str, moved_names: dict[str, str] | None = None):
    """A package's ``__getattr__``: its old submodules as stand-ins, and ``moved_names`` (name -> the private
    module that defines it: names the package exported in 0.1 and no longer does) with a warning."""
    moved_names = moved_names or {}

    def __getattr__(name: str) -> Any:
        if f"{package}.{name}" in MOVED_MODULES:
            return importlib.import_module(f"{package}.{name}")
        if name in moved_names:
            return moved_attribute(f"{package}.{name}", name, moved_names[name])
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
