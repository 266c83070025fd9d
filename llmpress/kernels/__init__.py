"""Fast paths per storage format and device: torch's CPU int4 op, Triton, CUDA. The formats' own
dequantization (``llmpress.formats``) is the oracle for every path here."""
