"""Loading models and checkpoints, writing compressed ones."""
