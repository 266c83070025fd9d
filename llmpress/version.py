"""The package version (a leaf module, so that any floor can name it)."""

__version__ = "0.1.0"
