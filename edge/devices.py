"""Jetson device profiles shipped as YAML (filled in by the edge profiler work)."""

from __future__ import annotations

from importlib import resources


def describe() -> dict[str, str]:
    import yaml

    out = {}
    for f in sorted(resources.files("clbench.edge").joinpath("devices").iterdir()):
        if f.name.endswith(".yaml"):
            data = yaml.safe_load(f.read_text())
            out[f.name[:-5]] = data.get("description", "")
    return out
