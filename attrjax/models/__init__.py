"""Flax models that expose ``features``/``head`` for attribution."""

from attrjax.models.vgg import (VGG, VGG_LAYOUTS, check_compatible, init_variables, last_conv_layer, layer_names,
                                layer_spatial_size, scale_widths, vgg)

__all__ = ["VGG", "VGG_LAYOUTS", "check_compatible", "init_variables", "last_conv_layer", "layer_names",
           "layer_spatial_size", "scale_widths", "vgg"]
