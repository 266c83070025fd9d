"""Quantizers: pure functions from a weight (and its statistics) to codes and grid parameters."""
