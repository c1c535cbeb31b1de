"""Pruning as data: boolean mask pytrees for unstructured magnitude pruning and an optax wrapper that keeps
pruned weights at zero."""

from attrjax.pruning.masks import (MaskedState, apply_masks, check_structure, conv_kernels, iterative_sparsity,
                                   magnitude_masks, masked, sparsity_summary)

__all__ = ["MaskedState", "apply_masks", "check_structure", "conv_kernels", "iterative_sparsity",
           "magnitude_masks", "masked", "sparsity_summary"]
