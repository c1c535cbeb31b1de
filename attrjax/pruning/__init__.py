"""Pruning as data: boolean mask pytrees for unstructured magnitude pruning of any parameter tree (with an optax
wrapper that keeps pruned weights at zero), structured L1 filter pruning that returns a physically smaller VGG or
ResNet, and parameter / FLOP counts of any model read off its jaxpr."""

from attrjax import _deprecation
from attrjax.pruning._masks import (MaskedState, apply_masks, check_structure, conv_kernels, iterative_sparsity,
                                   keep_pruned_at_zero, magnitude_masks, nonzero_masks, sparsity_summary)
from attrjax.pruning._counting import array_bytes, count_params_and_flops, storage_bytes
from attrjax.pruning._structured import (filter_l1_norms, l1_kept_filters, prune_filters,
                                        vgg16_paper_rates, zero_filters)
from attrjax.pruning._structured_resnet import (KeptChannels, prune_resnet_filters, resnet_kept_channels,
                                               resnet_masked_twin)

__all__ = ["MaskedState", "apply_masks", "check_structure", "conv_kernels", "iterative_sparsity",
           "keep_pruned_at_zero", "magnitude_masks", "nonzero_masks", "sparsity_summary",
           "array_bytes", "count_params_and_flops", "storage_bytes",
           "filter_l1_norms", "l1_kept_filters", "prune_filters", "vgg16_paper_rates",
           "zero_filters",
           "KeptChannels", "prune_resnet_filters", "resnet_kept_channels", "resnet_masked_twin"]

# Exported by 0.1 and private since 0.2: the old paths warn until 0.3. The old submodules are stand-ins.
__getattr__ = _deprecation.package_getattr(__name__, {
    "stream_writers": "attrjax.pruning._structured_resnet",
    "largest_filters": "attrjax.pruning._structured",
})
