"""Import every public sibling module of a package so their decorators register them."""

import importlib
import pkgutil


def import_submodules(package: str, path) -> None:
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
