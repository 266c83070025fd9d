"""Dequantization kernels. ``reference`` (torch, any device) is the oracle for every other path."""
