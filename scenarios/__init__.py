"""clbench.scenarios: imported as `clbench.scenarios`, never as the top-level `scenarios`."""

if __name__ != "clbench.scenarios":
    raise ImportError(
        "import clbench.scenarios, not 'scenarios': the folder is mapped into the clbench namespace "
        "(a second module object would register every component twice)"
    )

from clbench._discovery import import_submodules

import_submodules(__name__, __path__)
