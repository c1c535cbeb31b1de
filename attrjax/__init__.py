"""attrjax: compress neural networks (distillation, pruning, quantization) without breaking their attribution maps,
in JAX.

The names here are the front door: the attribution transforms, the propagation rules and composites, the split-model
adapters, the loss terms and ``train``, the evaluators, and the pruning and quantization entry points. Each namespace
holds the rest of its API:

- ``attrjax.attribution``: every attribution transform and the propagation engine;
- ``attrjax.models``: the split-model protocol and adapters, VGG and ResNet, torchvision weights;
- ``attrjax.training``: loss terms, the jit step, the loop, checkpoints, sharding, run records;
- ``attrjax.evaluation`` and ``attrjax.metrics``: evaluators and the metrics they compute;
- ``attrjax.pruning`` and ``attrjax.quantization``: masks, structured pruning, counting; qwix PTQ/QAT and deployment;
- ``attrjax.data``, ``attrjax.distributed``, ``attrjax.utils``: datasets and the input pipeline; multi-process runs;
  work-directory locks, progress, files.

Everything else (modules whose names start with ``_``) may change without notice.
"""

import importlib

from attrjax import _versions

_versions.check()

from attrjax import _deprecation  # noqa: E402 - after the version check, which explains a wrong JAX

_deprecation.install()

from attrjax.attribution import (COMPOSITES, METHODS, AlphaBeta, Composite, ConstantAttention,  # noqa: E402
                                 Epsilon, Flat, Gamma, SumRule, UniformProduct, UnsupportedOp, WinningProbability,
                                 WSquare, ZBox, attention_rollout, class_maps, excitation_backprop, gradient_rollout,
                                 grad_cam, grad_cam_all_classes, guided_backprop, input_x_gradient,
                                 integrated_gradients, lrp, minmax_normalize, rap, resize_maps, saliency, smooth_grad,
                                 top1_target)
from attrjax.evaluation import AttributionEvaluator, ClassificationEvaluator  # noqa: E402
from attrjax.models import (FunctionalSplitModel, LinenSplitModel, ModelLike, NNXSplitModel,  # noqa: E402
                            SplitModel, as_split_model, logits_fn)
from attrjax.pruning import (apply_masks, count_params_and_flops, keep_pruned_at_zero,  # noqa: E402
                             magnitude_masks, prune_filters, prune_resnet_filters)
from attrjax.quantization import Quantization, calibrate, deploy, load_deployed  # noqa: E402
from attrjax.training import (AttributionMatching, DistillationLoss, LossTerm, Objective,  # noqa: E402
                           PropagationMatching, RunOptions, TaskLoss, TrainState, make_train_step, sgd, train)

__version__ = "0.2.0"

__all__ = [
    # attribution
    "METHODS", "class_maps", "grad_cam", "grad_cam_all_classes", "top1_target", "resize_maps", "minmax_normalize",
    "saliency", "input_x_gradient", "integrated_gradients", "smooth_grad", "guided_backprop",
    "lrp", "excitation_backprop", "rap", "UnsupportedOp", "attention_rollout", "gradient_rollout",
    # rules and composites
    "COMPOSITES", "Composite", "Epsilon", "Gamma", "AlphaBeta", "Flat", "WSquare", "ZBox", "WinningProbability",
    "SumRule", "UniformProduct", "ConstantAttention",
    # any model
    "ModelLike", "as_split_model", "logits_fn", "SplitModel", "FunctionalSplitModel", "LinenSplitModel",
    "NNXSplitModel",
    # training: loss terms, the step, the loop
    "Objective", "LossTerm", "TaskLoss", "DistillationLoss", "AttributionMatching", "PropagationMatching",
    "TrainState", "sgd", "make_train_step", "train", "RunOptions",
    # evaluation
    "ClassificationEvaluator", "AttributionEvaluator",
    # compression
    "magnitude_masks", "apply_masks", "keep_pruned_at_zero", "prune_filters", "prune_resnet_filters",
    "count_params_and_flops", "Quantization", "calibrate", "deploy", "load_deployed",
]

_NAMESPACES = ("attribution", "data", "distributed", "evaluation", "metrics", "models", "pruning", "quantization",
               "training", "utils")
_moved = _deprecation.package_getattr(__name__)


def __getattr__(name: str):
    """The namespaces on first use (``attrjax.data`` imports TFDS, so it is not imported with attrjax), and the 0.1
    module paths as stand-ins that warn."""
    if name in _NAMESPACES:
        return importlib.import_module(f"attrjax.{name}")
    return _moved(name)


def __dir__() -> list[str]:
    return sorted({*__all__, *_NAMESPACES, "__version__"})
