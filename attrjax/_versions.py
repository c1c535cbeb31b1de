"""The dependency versions attrjax is tested with, checked once at import.

``SUPPORTED`` is the one list of ranges: ``pyproject.toml`` states the same ones (a test holds them equal), the
oldest are tested on Python 3.11 and the newest on Python 3.12.
"""

import importlib.metadata
import re

# distribution -> (oldest tested, first version not supported)
SUPPORTED = {
    "jax": ("0.10.2", "0.13"),
    "jaxlib": ("0.10.2", "0.13"),
    "flax": ("0.12.8", "0.13"),
    "optax": ("0.2.8", "0.3"),
    "orbax-checkpoint": ("0.12.8", "0.13"),
    "qwix": ("0.1.8", "0.1.9"),
}


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.12.0.1rc1"`` -> ``(0, 12, 0, 1)``: the leading release numbers."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        raise ValueError(f"cannot read the version {version!r}")
    return tuple(int(part) for part in match.group().split("."))


def specifier(name: str) -> str:
    """``">=0.10.2,<0.13"``: the supported versions of a dependency, as pip writes them."""
    oldest, first_unsupported = SUPPORTED[name]
    return f">={oldest},<{first_unsupported}"


def requirement(name: str) -> str:
    """``"jax>=0.10.2,<0.13"``: the pip requirement of a supported dependency."""
    return name + specifier(name)


def unsupported(installed: dict[str, str]) -> list[str]:
    """The distributions among ``installed`` (name -> version) outside their supported range; those that are not
    installed are left to pip to report."""
    return [name for name, (oldest, first_unsupported) in SUPPORTED.items() if name in installed
            and not version_tuple(oldest) <= version_tuple(installed[name]) < version_tuple(first_unsupported)]


def installed_versions() -> dict[str, str]:
    found = {}
    for name in SUPPORTED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def check() -> None:
    """Raises ``ImportError`` naming every dependency outside the versions attrjax supports, and the fix."""
    installed = installed_versions()
    names = unsupported(installed)
    if names:
        found = ", ".join(f"{name} {installed[name]} (supported: {specifier(name)})" for name in names)
        fix = " ".join(repr(requirement(name)) for name in names)
        raise ImportError(f"attrjax does not support the installed {found}. Install supported versions: "
                          f"pip install {fix}")
