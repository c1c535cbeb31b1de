"""Attribution transforms: inputs -> attribution maps, batched and differentiable.

- Grad-CAM and weighted collapsed attributions at a layer (the map the matching loss compares), all classes at once.
- The gradient family: saliency, input x gradient, integrated gradients, SmoothGrad, guided backprop.
- The propagation engine (any model's forward pass as a graph of affine, activation, pooling, normalisation, softmax
  and product nodes, with rules and composites choosing each node's rule): LRP (AttnLRP and CP-LRP for
  transformers), Excitation Backprop and Relative Attributing Propagation.
- Attention rollout and gradient-weighted attention rollout for any transformer.
- ``class_maps``: every method by name, every class of a batch at once (the evaluators' entry point).
"""

from attrjax import _deprecation
from attrjax.attribution._attention import attention_rollout, gradient_rollout
from attrjax.attribution._gradcam import (activation_collapse, grad_cam, grad_cam_all_classes, minmax_normalize,
                                          resize_maps, sensitivities_and_logits, target_weights, top1_target,
                                          weighted_collapse)
from attrjax.attribution._gradients import (guided_backprop, input_gradients, input_x_gradient,
                                            integrated_gradients, saliency, smooth_grad, sum_channels)
from attrjax.attribution._graph import UnsupportedOp
from attrjax.attribution._methods import ATTENTION_METHODS, METHODS, PAPER_METHODS, class_maps
from attrjax.attribution._propagation import (excitation_backprop, lrp, propagate, propagation_graph,
                                              propagation_maps)
from attrjax.attribution._rap import rap, rap_composite
from attrjax.attribution._rules import (COMPOSITES, AlphaBeta, Composite, ConstantAttention, Epsilon, Flat, Gamma,
                                        SumRule, UniformProduct, WinningProbability, WSquare, ZBox)

__all__ = ["ATTENTION_METHODS", "METHODS", "PAPER_METHODS", "class_maps", "attention_rollout", "gradient_rollout",
           "activation_collapse", "grad_cam", "grad_cam_all_classes", "minmax_normalize", "resize_maps",
           "sensitivities_and_logits", "target_weights", "top1_target", "weighted_collapse",
           "guided_backprop", "input_gradients", "input_x_gradient", "integrated_gradients", "saliency",
           "smooth_grad", "sum_channels",
           "UnsupportedOp", "excitation_backprop", "lrp", "propagate", "propagation_graph", "propagation_maps",
           "rap", "rap_composite",
           "COMPOSITES", "AlphaBeta", "Composite", "ConstantAttention", "Epsilon", "Flat", "Gamma", "SumRule",
           "UniformProduct", "WinningProbability", "WSquare", "ZBox"]

# Exported by 0.1 and private since 0.2: the old paths warn until 0.3. The old submodules are stand-ins.
__getattr__ = _deprecation.package_getattr(__name__, {
    "grad_cam_all_classes_from_vjp": "attrjax.attribution._gradcam",
    "sensitivities_from_vjp": "attrjax.attribution._gradcam",
    "guided_relu": "attrjax.attribution._gradients",
    "trace_graph": "attrjax.attribution._graph",
})
