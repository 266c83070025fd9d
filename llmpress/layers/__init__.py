"""Compressed modules a saved model is rebuilt from: one module type per storage format."""

import torch

from .base import CompressedLinear, Layout
from .bcq_linear import BCQLinear
from .dual_scale_linear import DualScaleLinear
from .factor_linear import FactorLinear
from .ggml_linear import GGMLLinear
from .harp_linear import HarpLinear
from .online_hadamard import OnlineHadamard
from .quant_linear import QuantLinear
from .tt_linear import TTLinear

# format name in the manifest -> module type, every CompressedLinear registered on definition
# (OnlineHadamard is a transform: the manifest lists it under `transforms`, around a module of
# one of these formats or a plain linear)
LAYER_FORMATS = CompressedLinear.formats


def module_sizes(modules: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """``name -> (stored bits, weights)`` of every compressed module of a manifest's ``modules``
    (built on the meta device: nothing is read or allocated)."""
    sizes = {}
    for name, entry in modules.items():
        module = LAYER_FORMATS[entry["format"]].from_format_params(entry["params"], dtype=torch.float32)
        sizes[name] = (module.stored_bits(), module.in_features * module.out_features)
    return sizes


__all__ = ["LAYER_FORMATS", "BCQLinear", "CompressedLinear", "DualScaleLinear", "FactorLinear", "GGMLLinear", "HarpLinear", "Layout",
           "OnlineHadamard", "QuantLinear", "TTLinear", "module_sizes"]
