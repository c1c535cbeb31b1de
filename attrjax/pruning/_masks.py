"""Unstructured magnitude pruning as data: boolean mask pytrees shaped like the params (True = kept).

Iterative pruning as in the paper pools the |w| of all conv kernels, sorts them (already-pruned zeros included)
and keeps the weights strictly above ``sorted[int(N * s_k)]`` with s_k = 1 - (1 - p)^k, so one global threshold
serves every layer. ``keep_pruned_at_zero`` wraps any optax transformation so pruned weights stay exactly zero
through momentum and weight decay, and carries the masks in the optimizer state, so they checkpoint and restore
with it.

Masks work on any parameter pytree: Flax linen ``params``, Flax NNX states (``nnx.split(model, nnx.Param, ...)``)
and plain dicts, lists and tuples of arrays. Which leaves are pruned is a ``prunable(path, leaf) -> bool`` choice;
the default, ``conv_kernels``, picks the conv weights.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from attrjax._paths import path_name, path_names

Params = Any
Masks = Any
Prunable = Callable[[tuple, jax.Array], bool]

KERNEL_NAMES = ("kernel", "weight", "w")  # Flax, PyTorch-style state dicts, Haiku


def conv_kernels(path: tuple, leaf: Any) -> bool:
    """The default prunable leaves: the conv weights, i.e. rank-4 arrays named ``kernel`` (Flax linen and NNX),
    ``weight`` (PyTorch-style state dicts) or ``w`` (Haiku), or without a name (a rank-4 array directly in a list
    or tuple, e.g. stax-style ``[(w, b), ...]``). Biases, BatchNorm and dense (rank-2) kernels are not pruned; a
    rank-4 array under any other name (``{'conv1': w}``) is not either: pass ``prunable=`` for such trees.

    Args:
      path: the leaf's key path (as ``jax.tree_util.tree_flatten_with_path`` gives it; an NNX state's paths end in
        ``value``, which is skipped, and with NNX variables as leaves they end at the name itself).
      leaf: an array, or an NNX variable holding one.
    """
    names = path_names(path)
    name = names[-1] if names else 0
    return getattr(leaf, "ndim", None) == 4 and (name in KERNEL_NAMES or isinstance(name, int))


def _prunable_flags(params: Params, prunable: Prunable) -> list[bool]:
    """``prunable`` of every leaf of ``params``, in flattening order; raises if it selects none."""
    flags = [bool(prunable(path, leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not any(flags):
        raise ValueError("no prunable leaves in params (the default, conv_kernels, takes rank-4 arrays named "
                         f"{', '.join(KERNEL_NAMES)} or unnamed); pass prunable=(path, leaf) -> bool to choose which "
                         "leaves to prune")
    return flags


def check_rate(name: str, rate: float) -> None:
    """Raises unless ``rate`` (the fraction pruned) lies in [0, 1)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {rate}")


def iterative_sparsity(rate: float, round_index: int) -> float:
    """Target sparsity after ``round_index`` (1-based) rounds that each prune ``rate`` of the remaining weights."""
    check_rate("rate", rate)
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    return 1.0 - (1.0 - rate) ** round_index


def _threshold(magnitudes: jax.Array, sparsity: float) -> jax.Array:
    """``sorted(magnitudes)[int(N * sparsity)]``; weights strictly above it are kept."""
    return jnp.sort(magnitudes)[int(magnitudes.size * sparsity)]


def magnitude_masks(params: Params, sparsity: float, *, scope: str = "global",
                    prunable: Prunable = conv_kernels) -> Masks:
    """Boolean masks (True = kept) that prune the smallest-magnitude ``sparsity`` of the prunable weights.

    Args:
      params: a parameter pytree (linen params, an NNX state, nested dicts/lists of arrays).
      sparsity: target fraction of prunable weights set to zero, in [0, 1). The strict threshold (weights strictly
        above ``sorted(|w|)[int(N * sparsity)]`` are kept) reaches it to within one weight (plus ties at the
        threshold).
      scope: ``global`` (one threshold over all prunable leaves, the paper's) or ``layer`` (one per leaf).
      prunable: ``(path, leaf) -> bool`` choosing the leaves to prune; the others get all-True masks.

    Returns:
      A pytree with the structure of ``params`` and boolean leaves of the same shapes.
    """
    check_rate("sparsity", sparsity)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flags = _prunable_flags(params, prunable)
    leaves, treedef = jax.tree.flatten(params)
    if sparsity == 0.0:
        return jax.tree.map(lambda leaf: jnp.ones(leaf.shape, bool), params)
    if scope == "global":
        threshold = _threshold(jnp.concatenate([jnp.abs(leaf).ravel() for leaf, flag in zip(leaves, flags) if flag]),
                               sparsity)

    def mask(leaf, flag):
        if not flag:
            return jnp.ones(leaf.shape, bool)
        cut = threshold if scope == "global" else _threshold(jnp.abs(leaf).ravel(), sparsity)
        return jnp.abs(leaf) > cut

    return jax.tree.unflatten(treedef, [mask(leaf, flag) for leaf, flag in zip(leaves, flags)])


def check_structure(params: Params, masks: Masks):
    """Raises if ``masks`` does not have the tree structure and leaf shapes of ``params``."""
    params_def, masks_def = jax.tree.structure(params), jax.tree.structure(masks)
    # jaxlib ships no stubs for its pytree module, so mypy cannot resolve jax's PyTreeDef annotation.
    if params_def != masks_def:  # type: ignore[operator]
        raise ValueError(f"masks do not match the params' tree structure:\n  params: {params_def}\n  masks:  "
                         f"{masks_def}\nbuild the masks from these params (magnitude_masks(params, ...))")
    for (path, leaf), mask in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(masks)):
        if leaf.shape != mask.shape:
            raise ValueError(f"mask at {jax.tree_util.keystr(path)} has shape {mask.shape}, the params "
                             f"{leaf.shape}")


def _zero_pruned(tree, masks):
    return jax.tree.map(lambda leaf, mask: jnp.where(mask, leaf, jnp.zeros_like(leaf)), tree, masks)


def apply_masks(params: Params, masks: Masks) -> Params:
    """Zeroes the pruned weights: ``where(mask, w, 0)`` leaf by leaf."""
    check_structure(params, masks)
    return _zero_pruned(params, masks)


class MaskedState(NamedTuple):
    """The wrapped optimizer's state plus the masks, so a checkpoint of the optimizer state holds both."""

    inner_state: Any
    masks: Masks


def nonzero_masks(params: Params, *, prunable: Prunable = conv_kernels) -> Masks:
    """The masks that ``apply_masks`` left in ``params``: a prunable weight is kept iff it is non-zero; every other
    leaf (biases, BatchNorm, which may well be zero) is all True. Traceable, so ``jax.eval_shape`` gives their
    shapes from the params' shapes alone."""
    leaves, treedef = jax.tree.flatten(params)
    flags = _prunable_flags(params, prunable)
    return jax.tree.unflatten(treedef, [jnp.asarray(leaf) != 0 if flag else jnp.ones(leaf.shape, bool)
                                        for leaf, flag in zip(leaves, flags)])


def keep_pruned_at_zero(inner: optax.GradientTransformation, masks: Masks | None = None, *,
                        prunable: Prunable = conv_kernels) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so pruned weights never move, and carries the masks in its state (``MaskedState``).

    Gradients are masked before ``inner`` (momentum buffers of pruned weights stay zero) and updates after it
    (weight decay or Adam cannot revive them). Start from ``apply_masks(params, masks)`` and pruned weights stay
    exactly zero. Extra keyword arguments of ``update`` go to ``inner`` (which may ignore them).

    Args:
      inner: any optax transformation.
      masks: boolean masks shaped like the params (True = trained), e.g. from ``magnitude_masks``. ``None``: ``init``
        derives them from the params it is given (``nonzero_masks``: the zero prunable weights are the pruned
        ones). That also builds the template of a checkpoint to restore from any params of the right shapes (the
        restored masks replace the derived ones), and ``jax.eval_shape(tx.init, params)`` needs shapes only.
      prunable: with ``masks=None``, the leaves whose zeros are pruned weights (as in ``magnitude_masks``).
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        if masks is None:
            return MaskedState(inner.init(params), nonzero_masks(params, prunable=prunable))
        check_structure(params, masks)
        # Copies: the train step donates its state, which would delete the caller's own mask arrays.
        return MaskedState(inner.init(params), jax.tree.map(lambda mask: jnp.array(mask, dtype=bool), masks))

    def update(updates, state, params=None, **extra_args):
        updates, inner_state = inner.update(_zero_pruned(updates, state.masks), state.inner_state, params,
                                            **extra_args)
        return _zero_pruned(updates, state.masks), MaskedState(inner_state, state.masks)

    return optax.GradientTransformationExtraArgs(init, update)


def sparsity_summary(params: Params, *, prunable: Prunable = conv_kernels) -> dict:
    """Per prunable leaf (``'conv1_1/kernel'``-style names, ``'conv1/kernel'`` in an NNX state) and overall: zero
    count, size and sparsity. Raises if ``prunable`` selects no leaf."""
    rows = {}
    for (path, leaf), flag in zip(jax.tree_util.tree_flatten_with_path(params)[0], _prunable_flags(params, prunable)):
        if flag:
            zeros = int(jnp.sum(leaf == 0))
            rows[path_name(path)] = {"zeros": zeros, "size": int(leaf.size), "sparsity": zeros / leaf.size}
    total_zeros, total = sum(r["zeros"] for r in rows.values()), sum(r["size"] for r in rows.values())
    return {"layers": rows, "zeros": total_zeros, "size": total, "sparsity": total_zeros / total}
