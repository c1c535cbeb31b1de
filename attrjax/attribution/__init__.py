"""Attribution transforms: inputs -> attribution maps, batched and differentiable.

- ``gradcam``: Grad-CAM / weighted collapsed attributions at a layer (the paper's matched map), all classes at once.
- ``gradients``: saliency, input x gradient, integrated gradients, SmoothGrad, guided backprop.
- ``propagation``: LRP (alpha-beta, epsilon, z^B, composites) and Excitation Backprop for the VGG family.
- ``rap``: Relative Attributing Propagation.
- ``methods``: every method by name, all classes of a batch at once (the evaluation's entry point).
"""

from attrjax.attribution.gradcam import (activation_collapse, grad_cam, grad_cam_all_classes,
                                         grad_cam_all_classes_from_vjp, minmax_normalize,
                                         resize_maps, sensitivities_and_logits, sensitivities_from_vjp, target_weights,
                                         top1_target, weighted_collapse)
from attrjax.attribution.gradients import (guided_backprop, guided_relu, input_gradients, input_x_gradient,
                                           integrated_gradients, saliency, smooth_grad, sum_channels)
from attrjax.attribution.propagation import (excitation_backprop, fold_batchnorm, folded_logits, linear_layer_names,
                                             lrp, resolve_rules)
from attrjax.attribution.rap import rap

__all__ = ["activation_collapse", "grad_cam", "grad_cam_all_classes", "grad_cam_all_classes_from_vjp",
           "minmax_normalize", "resize_maps",
           "sensitivities_and_logits", "sensitivities_from_vjp", "target_weights", "top1_target", "weighted_collapse",
           "guided_backprop", "guided_relu", "input_gradients", "input_x_gradient", "integrated_gradients", "saliency",
           "smooth_grad", "sum_channels",
           "excitation_backprop", "fold_batchnorm", "folded_logits", "linear_layer_names", "lrp", "resolve_rules",
           "rap"]
