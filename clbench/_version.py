"""The package version (one place; `clbench.__version__` re-exports it)."""

__version__ = "0.1.0"
