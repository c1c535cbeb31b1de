"""Attribution transforms: inputs -> attribution maps, batched and differentiable."""

from attrjax.attribution.gradcam import (activation_collapse, grad_cam, grad_cam_all_classes, minmax_normalize,
                                         resize_maps, sensitivities_and_logits, target_weights, top1_target,
                                         weighted_collapse)

__all__ = ["activation_collapse", "grad_cam", "grad_cam_all_classes", "minmax_normalize", "resize_maps",
           "sensitivities_and_logits", "target_weights", "top1_target", "weighted_collapse"]
