"""Names of pytree leaves from their key paths, the same for Flax linen dicts, Flax NNX states and plain lists.

A path is what ``jax.tree_util.tree_flatten_with_path`` gives for a leaf: a tuple of ``DictKey``, ``GetAttrKey``,
``SequenceKey``, ... entries. An NNX state's paths end in the attribute ``value`` (the array inside each variable),
which is left out, so a linen ``{'conv1': {'kernel': w}}`` and an NNX ``conv1.kernel`` both name their leaf
``'conv1/kernel'``.
"""

from __future__ import annotations

from jax.tree_util import GetAttrKey


def key_name(key) -> str | int:
    """A path entry as the name or index it holds (``DictKey``, ``GetAttrKey``, ``SequenceKey``, ...)."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    return str(key)


def path_names(path: tuple) -> list:
    """The path's names and indices, without the ``.value`` attribute that ends each variable's path in an NNX state
    (a dict key named ``"value"`` is kept)."""
    if path and isinstance(path[-1], GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return [key_name(key) for key in path]


def path_name(path: tuple) -> str:
    """A leaf's path as ``'conv1_1/kernel'`` (``'conv1/kernel'`` for an NNX state, ``'0/0'`` in nested lists)."""
    return "/".join(str(name) for name in path_names(path))
