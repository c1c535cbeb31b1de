"""Models and the split-model protocol (``SplitModel``, ``as_split_model``) through which attrjax attributes, matches
and trains any classifier: the VGG family, the ResNet family, the ViT family, or a user's own linen or NNX module or
function."""

from attrjax import _deprecation
from attrjax.models._torchvision import (export_vgg, import_vgg, load_state_dict, save_state_dict)
from attrjax.models._vgg import (VGG, VGG_LAYOUTS, check_compatible, init_variables, last_conv_layer, layer_names,
                                layer_spatial_size, scale_widths, vgg)
from attrjax.models._adapters import ModelLike, as_split_model, logits_fn
from attrjax.models._function import PlainFunctionSplitModel
from attrjax.models._split import (FunctionalSplitModel, LayerDescription, LayerLinearization, Linearization,
                                  LinenSplitModel, NNXSplitModel, OutputSelector, SplitModel, format_layers)
from attrjax.models._resnet import (ResNet, export_resnet, import_resnet, resnet18, resnet34, resnet50,
                                   resnet_from_state_dict, resnet_layer_names, resnet_small)
from attrjax.models._vit import ViT, vit_b16, vit_layer_names, vit_s16, vit_small, vit_ti16
from attrjax.models._vit_import import VIT_LAYOUTS, detect_vit_layout, import_vit

__all__ = ["VGG", "VGG_LAYOUTS", "check_compatible", "export_vgg", "import_vgg", "init_variables", "last_conv_layer",
           "layer_names", "layer_spatial_size", "load_state_dict", "save_state_dict",
           "scale_widths", "vgg"]
__all__ += ["ResNet", "export_resnet", "import_resnet", "resnet18", "resnet34", "resnet50", "resnet_from_state_dict",
            "resnet_layer_names", "resnet_small"]
__all__ += ["ViT", "VIT_LAYOUTS", "detect_vit_layout", "import_vit", "vit_b16", "vit_layer_names", "vit_s16",
            "vit_small", "vit_ti16"]
__all__ += ["FunctionalSplitModel", "LayerDescription", "LayerLinearization", "Linearization", "LinenSplitModel",
            "NNXSplitModel", "ModelLike", "OutputSelector", "PlainFunctionSplitModel", "SplitModel", "as_split_model",
            "format_layers", "logits_fn"]

# Exported by 0.1 and private since 0.2: the old paths warn until 0.3. The old submodules are stand-ins.
__getattr__ = _deprecation.package_getattr(__name__, {
    "read_pth_without_torch": "attrjax.models._torchvision",
    "stage_widths_from_state_dict": "attrjax.models._torchvision",
    "resnet_module_path": "attrjax.models._resnet",
})
