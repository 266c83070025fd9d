"""The bottom floor: one module per storage format (its dataclass, packing, dequantization and
stored bits). Nothing here imports the rest of llmpress but its error types."""
