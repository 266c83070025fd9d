"""Compressed modules a saved model is rebuilt from: one module type per storage format."""

from .quant_linear import QuantLinear

# format name in the manifest -> module type
LAYER_FORMATS = {QuantLinear.format_name: QuantLinear}

__all__ = ["LAYER_FORMATS", "QuantLinear"]
