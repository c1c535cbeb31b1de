"""Attribution transforms: inputs -> attribution maps, batched and differentiable.

- ``gradcam``: Grad-CAM / weighted collapsed attributions at a layer (the paper's matched map), all classes at once.
- ``gradients``: saliency, input x gradient, integrated gradients, SmoothGrad, guided backprop.
- ``graph``, ``rules``, ``propagation``: the propagation engine (any model's forward pass as a canonical graph, rules
  and composites) and LRP and Excitation Backprop on it.
- ``rap``: Relative Attributing Propagation on the same engine.
- ``methods``: every method by name, all classes of a batch at once (the evaluation's entry point).
"""

from attrjax.attribution.gradcam import (activation_collapse, grad_cam, grad_cam_all_classes,
                                         grad_cam_all_classes_from_vjp, minmax_normalize,
                                         resize_maps, sensitivities_and_logits, sensitivities_from_vjp, target_weights,
                                         top1_target, weighted_collapse)
from attrjax.attribution.gradients import (guided_backprop, guided_relu, input_gradients, input_x_gradient,
                                           integrated_gradients, saliency, smooth_grad, sum_channels)
from attrjax.attribution.graph import UnsupportedOp, trace_graph
from attrjax.attribution.propagation import (excitation_backprop, lrp, propagate, propagation_graph,
                                             propagation_maps)
from attrjax.attribution.rap import rap, rap_composite
from attrjax.attribution.rules import (COMPOSITES, AlphaBeta, Composite, Epsilon, Flat, Gamma, SumRule,
                                       WinningProbability, WSquare, ZBox)

__all__ = ["activation_collapse", "grad_cam", "grad_cam_all_classes", "grad_cam_all_classes_from_vjp",
           "minmax_normalize", "resize_maps",
           "sensitivities_and_logits", "sensitivities_from_vjp", "target_weights", "top1_target", "weighted_collapse",
           "guided_backprop", "guided_relu", "input_gradients", "input_x_gradient", "integrated_gradients", "saliency",
           "smooth_grad", "sum_channels",
           "UnsupportedOp", "trace_graph", "excitation_backprop", "lrp", "propagate", "propagation_graph",
           "propagation_maps", "rap", "rap_composite",
           "COMPOSITES", "AlphaBeta", "Composite", "Epsilon", "Flat", "Gamma", "SumRule", "WinningProbability",
           "WSquare", "ZBox"]
