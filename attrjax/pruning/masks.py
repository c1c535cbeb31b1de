"""Unstructured magnitude pruning as data: boolean mask pytrees shaped like the params (True = kept).

The paper's iterative pruning (PAPER.md §5.4) pools the |w| of all conv kernels, sorts them (already-pruned zeros
included) and keeps the weights strictly above ``sorted[int(N * s_k)]`` with s_k = 1 - (1 - p)^k, so one global
threshold serves every layer. ``masked`` wraps any optax transformation so pruned weights stay exactly zero
through momentum and weight decay, and carries the masks in the optimizer state, so they checkpoint and restore
with it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any
Masks = Any
Prunable = Callable[[tuple, jax.Array], bool]


def conv_kernels(path: tuple, leaf: jax.Array) -> bool:
    """The default prunable leaves: 4-D ``kernel`` arrays (conv weights), not biases, BatchNorm or dense heads."""
    return getattr(path[-1], "key", None) == "kernel" and leaf.ndim == 4


def check_rate(name: str, rate: float):
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
      params: a parameter pytree.
      sparsity: target fraction of prunable weights set to zero, in [0, 1). The strict threshold of PAPER.md §5.4
        reaches it to within one weight (plus ties at the threshold).
      scope: ``global`` (one threshold over all prunable leaves, the paper's) or ``layer`` (one per leaf).
      prunable: ``(path, leaf) -> bool`` choosing the leaves to prune; the others get all-True masks.

    Returns:
      A pytree with the structure of ``params`` and boolean leaves of the same shapes.
    """
    check_rate("sparsity", sparsity)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flags = jax.tree_util.tree_map_with_path(prunable, params)
    leaves = [leaf for leaf, flag in zip(jax.tree.leaves(params), jax.tree.leaves(flags)) if flag]
    if not leaves:
        raise ValueError("no prunable leaves in params; pass prunable= to choose which leaves to prune")
    if sparsity == 0.0:
        return jax.tree.map(lambda leaf: jnp.ones(leaf.shape, bool), params)
    if scope == "global":
        threshold = _threshold(jnp.concatenate([jnp.abs(leaf).ravel() for leaf in leaves]), sparsity)

    def mask(leaf, flag):
        if not flag:
            return jnp.ones(leaf.shape, bool)
        cut = threshold if scope == "global" else _threshold(jnp.abs(leaf).ravel(), sparsity)
        return jnp.abs(leaf) > cut

    return jax.tree.map(mask, params, flags)


def check_structure(params: Params, masks: Masks):
    """Raises if ``masks`` does not have the tree structure and leaf shapes of ``params``."""
    params_def, masks_def = jax.tree.structure(params), jax.tree.structure(masks)
    if params_def != masks_def:
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


def masked(inner: optax.GradientTransformation, masks: Masks) -> optax.GradientTransformation:
    """Wraps ``inner`` so pruned weights never move: gradients are masked before ``inner`` (momentum buffers of
    pruned weights stay zero) and updates after it (weight decay or Adam cannot revive them). Start from
    ``apply_masks(params, masks)`` and pruned weights stay exactly zero."""

    def init(params):
        check_structure(params, masks)
        # Copies: the train step donates its state, which would delete the caller's own mask arrays.
        return MaskedState(inner.init(params), jax.tree.map(lambda mask: jnp.array(mask, dtype=bool), masks))

    def update(updates, state, params=None):
        updates, inner_state = inner.update(_zero_pruned(updates, state.masks), state.inner_state, params)
        return _zero_pruned(updates, state.masks), MaskedState(inner_state, state.masks)

    return optax.GradientTransformation(init, update)


def sparsity_summary(params: Params, *, prunable: Prunable = conv_kernels) -> dict:
    """Per prunable leaf (``'conv1_1/kernel'``-style names) and overall: zero count, size and sparsity."""
    rows = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if prunable(path, leaf):
            zeros = int(jnp.sum(leaf == 0))
            rows["/".join(str(getattr(p, "key", p)) for p in path)] = {
                "zeros": zeros, "size": int(leaf.size), "sparsity": zeros / leaf.size}
    total_zeros, total = sum(r["zeros"] for r in rows.values()), sum(r["size"] for r in rows.values())
    return {"layers": rows, "zeros": total_zeros, "size": total, "sparsity": total_zeros / max(total, 1)}
