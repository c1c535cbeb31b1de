"""Classification and attribution-quality metrics: pure jax.numpy, batched, jit-able.

Undefined values (no positive label, empty mask, ...) are NaN, so ``jnp.nanmean`` gives the dataset average.
"""

from attrjax import _deprecation
from attrjax.metrics._agreement import importance_ranks, map_cosine, same_peak, spearman_rank, top_k_iou
from attrjax.metrics._classification import class_average_precision, f1_samples, sample_average_precision
from attrjax.metrics._faithfulness import curve_auc, deletion_curve, insertion_curve
from attrjax.metrics._localization import (class_masks, localization_scores, mask_auc, pointing_game,
                                          predicted_classes, summarize_localization)
from attrjax.metrics._statistics import excludes_zero, mean_interval, paired_difference

__all__ = ["class_average_precision", "class_masks", "curve_auc", "deletion_curve", "f1_samples",
           "importance_ranks", "insertion_curve", "localization_scores", "map_cosine", "mask_auc",
           "pointing_game", "predicted_classes", "same_peak", "sample_average_precision", "spearman_rank",
           "summarize_localization", "top_k_iou"]
__all__ += ["excludes_zero", "mean_interval", "paired_difference"]

# Exported by 0.1 and private since 0.2: the old paths warn until 0.3. The old submodules are stand-ins.
__getattr__ = _deprecation.package_getattr(__name__)
