"""Name -> class registries for strategies, scenarios and auxiliary components.

Registration is a decorator placed on the class (or scenario factory).  Looking a
name up imports the owning package once, whose ``__init__`` imports every sibling
module, so adding a component is one file and nothing else.  Listing names reads
only the source files (no torch/avalanche import), which keeps ``clbench list``
and ``clbench --help`` fast.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path
from typing import Callable, Generic, TypeVar

from clbench.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, decorator: str):
        self.kind = kind
        self.package = package
        self.decorator = decorator
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and _origin(existing) != _origin(obj):
                raise KeyError(
                    f"{self.kind} {name!r} registered twice: by {_origin(existing)} and {_origin(obj)}"
                )
            self._entries[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
                if self.kind == "aux":
                    obj.name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return add

    def _load(self) -> None:
        if not self._loaded:
            importlib.import_module(self.package)
            self._loaded = True

    def get(self, name: str) -> T:
        key = canonical(name, self.kind)
        names = self.names()
        if key not in names:
            family = _match_family(key, names)
            if family is None:
                raise UsageError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(names)}")
            pattern, n = family
            self._load()
            return functools.partial(self._entries[pattern], n=n)  # type: ignore[return-value]
        self._load()
        return self._entries[key]

    def names(self) -> list[str]:
        if self._loaded:
            return sorted(self._entries)
        return sorted(self.describe())

    def describe(self) -> dict[str, str]:
        """name -> one-line description, read from source without importing it."""
        if self._loaded:
            return {n: _first_line(e.__doc__) for n, e in sorted(self._entries.items())}
        found: dict[str, str] = {}
        for path in _package_files(self.package):
            found.update(_scan_registrations(path, self.decorator))
        return dict(sorted(found.items()))


def canonical(name: str, kind: str) -> str:
    """The CLI accepts `der-pp` for `der_pp`; scenario names keep their dashes."""
    return name.replace("-", "_") if kind != "scenario" else name


def _match_family(key: str, names: list[str]) -> tuple[str, int] | None:
    """`digits-3` matches a family registered as `digits-{n}` (n = number of experiences)."""
    for pattern in names:
        if "{n}" in pattern:
            regex = re.escape(pattern).replace(re.escape("{n}"), r"(\d+)")
            m = re.fullmatch(regex, key)
            if m:
                return pattern, int(m.group(1))
    return None


def _origin(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""


def _package_files(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    files = []
    for info in pkgutil.iter_modules(list(spec.submodule_search_locations)):
        if not info.name.startswith("_"):
            files.append(Path(info.module_finder.path) / f"{info.name}.py")  # type: ignore[attr-defined]
    return [f for f in files if f.exists()]


def _scan_registrations(path: Path, decorator: str) -> dict[str, str]:
    """Find `@decorator("name")` on classes/functions and return their docstring's first line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_doc = _first_line(ast.get_docstring(tree))
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            continue
        for dec in node.decorator_list:
            if (
                isinstance(dec, ast.Call)
                and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == decorator
                and dec.args
                and isinstance(dec.args[0], ast.Constant)
            ):
                out[dec.args[0].value] = _first_line(ast.get_docstring(node)) or module_doc
    return out


STRATEGIES: Registry = Registry("strategy", "clbench.strategies", "register_strategy")
SCENARIOS: Registry = Registry("scenario", "clbench.scenarios", "register_scenario")
AUXILIARY: Registry = Registry("aux", "clbench.auxiliary", "register_aux")

register_strategy = STRATEGIES.register
register_scenario = SCENARIOS.register
register_aux = AUXILIARY.register
