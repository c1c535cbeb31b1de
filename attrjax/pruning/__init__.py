"""Pruning as data: boolean mask pytrees for unstructured magnitude pruning of any parameter tree (with an optax
wrapper that keeps pruned weights at zero), structured L1 filter pruning that returns a physically smaller VGG, and
parameter / FLOP counts of any model read off its jaxpr."""

from attrjax.pruning.masks import (MaskedState, apply_masks, check_structure, conv_kernels, iterative_sparsity,
                                   keep_pruned_at_zero, magnitude_masks, nonzero_masks, sparsity_summary)
from attrjax.pruning.counting import count_params_and_flops
from attrjax.pruning.structured import l1_kept_filters, prune_filters, vgg16_paper_rates, zero_filters

__all__ = ["MaskedState", "apply_masks", "check_structure", "conv_kernels", "iterative_sparsity",
           "keep_pruned_at_zero", "magnitude_masks", "nonzero_masks", "sparsity_summary", "count_params_and_flops",
           "l1_kept_filters", "prune_filters", "vgg16_paper_rates", "zero_filters"]
