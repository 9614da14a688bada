"""clbench.strategies: imported as `clbench.strategies`, never as the top-level `strategies`."""

if __name__ != "clbench.strategies":
    raise ImportError(
        "import clbench.strategies, not 'strategies': the folder is mapped into the clbench namespace "
        "(a second module object would register every component twice)"
    )

from clbench._discovery import import_submodules

import_submodules(__name__, __path__)
