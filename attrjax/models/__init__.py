"""Models and the split-model protocol (``attrjax.models.split``) through which attrjax attributes, matches and
trains any classifier: the VGG family, the ResNet family, or a user's own linen module."""

from attrjax.models.torchvision import (export_vgg, import_vgg, load_state_dict, read_pth_without_torch,
                                        save_state_dict, stage_widths_from_state_dict)
from attrjax.models.vgg import (VGG, VGG_LAYOUTS, check_compatible, init_variables, last_conv_layer, layer_names,
                                layer_spatial_size, scale_widths, vgg)
from attrjax.models.adapters import ModelLike, as_split_model, logits_fn
from attrjax.models.split import (FunctionalSplitModel, LayerLinearization, Linearization, LinenSplitModel,
                                  NNXSplitModel, SplitModel)
from attrjax.models.resnet import (ResNet, export_resnet, import_resnet, resnet18, resnet34, resnet50,
                                   resnet_from_state_dict, resnet_layer_names, resnet_module_path, resnet_small)

__all__ = ["VGG", "VGG_LAYOUTS", "check_compatible", "export_vgg", "import_vgg", "init_variables", "last_conv_layer",
           "layer_names", "layer_spatial_size", "load_state_dict", "read_pth_without_torch", "save_state_dict",
           "scale_widths", "stage_widths_from_state_dict", "vgg"]
__all__ += ["ResNet", "export_resnet", "import_resnet", "resnet18", "resnet34", "resnet50", "resnet_from_state_dict",
            "resnet_layer_names", "resnet_module_path", "resnet_small"]
__all__ += ["FunctionalSplitModel", "LayerLinearization", "Linearization", "LinenSplitModel", "NNXSplitModel",
            "ModelLike", "SplitModel", "as_split_model", "logits_fn"]
