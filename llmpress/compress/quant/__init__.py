"""Quantizers: pure functions from a weight (and its statistics) to codes and grid parameters."""

from .result import QuantizedWeight

__all__ = ["QuantizedWeight"]
