"""Classification and attribution-quality metrics: pure jax.numpy, batched, jit-able.

Undefined values (no positive label, empty mask, ...) are NaN, so ``jnp.nanmean`` gives the dataset average.
"""

from attrjax.metrics.agreement import importance_ranks, map_cosine, same_peak, spearman_rank, top_k_iou
from attrjax.metrics.classification import class_average_precision, f1_samples, sample_average_precision
from attrjax.metrics.faithfulness import curve_auc, deletion_curve, insertion_curve
from attrjax.metrics.localization import (class_masks, localization_scores, mask_auc, pointing_game,
                                          predicted_classes, summarize_localization)

__all__ = ["class_average_precision", "class_masks", "curve_auc", "deletion_curve", "f1_samples",
           "importance_ranks", "insertion_curve", "localization_scores", "map_cosine", "mask_auc",
           "pointing_game", "predicted_classes", "same_peak", "sample_average_precision", "spearman_rank",
           "summarize_localization", "top_k_iou"]
