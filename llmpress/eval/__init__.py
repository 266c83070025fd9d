"""Evaluation: perplexity under a named protocol (and, later, the lm-eval stage)."""
