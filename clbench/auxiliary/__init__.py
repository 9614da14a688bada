"""Auxiliary components (distillation, quantization, forecasting) that add to any strategy."""

from clbench._discovery import import_submodules

import_submodules(__name__, __path__)
