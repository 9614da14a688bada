"""clbench.edge: imported as `clbench.edge`, never as the top-level `edge`."""

if __name__ != "clbench.edge":
    raise ImportError(
        "import clbench.edge, not 'edge': the folder is mapped into the clbench namespace "
        "(a second module object would register every component twice)"
    )
