"""Evaluators: a model's classification quality, and how well an attribution method's maps localise, agree with a
reference's and explain the prediction, over padded eval batches, on every device of every process.

Build an evaluator once per model (its functions compile on the first batch) and run it on any variables of that
model. The functions below it are its parts, for users who score their own batches.
"""

from attrjax import _deprecation
from attrjax._evaluation import (AGREEMENT_KEYS, AttributionEvaluator, ClassificationEvaluator, batch_scores,
                                 classification_report, evaluation_maps, make_attribution_fn, summarize_scores)

__all__ = ["AGREEMENT_KEYS", "AttributionEvaluator", "ClassificationEvaluator", "batch_scores",
           "classification_report", "evaluation_maps", "make_attribution_fn", "summarize_scores"]

# One way to do each thing: these 0.1 functions duplicate the evaluators.
__getattr__ = _deprecation.package_getattr(__name__, {name: "attrjax._evaluation" for name in (
    "localization_report", "make_predict_fn", "predict")})
