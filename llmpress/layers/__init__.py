"""Compressed modules a saved model is rebuilt from: one module type per storage format."""

from .bcq_linear import BCQLinear
from .dual_scale_linear import DualScaleLinear
from .factor_linear import FactorLinear
from .online_hadamard import OnlineHadamard
from .quant_linear import QuantLinear
from .tt_linear import TTLinear

# format name in the manifest -> module type (OnlineHadamard is a transform: the manifest lists
# it under `transforms`, around a module of one of these formats or a plain linear)
LAYER_FORMATS = {layer.format_name: layer for layer in (QuantLinear, FactorLinear, TTLinear, BCQLinear, DualScaleLinear)}

__all__ = ["LAYER_FORMATS", "BCQLinear", "DualScaleLinear", "FactorLinear", "OnlineHadamard", "QuantLinear", "TTLinear"]
