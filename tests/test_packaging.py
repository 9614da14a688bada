"""Packaging guardrails: the mapped folders live only under the clbench namespace."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import tomllib

from clbench.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"strategies": "clbench.strategies", "scenarios": "clbench.scenarios", "edge": "clbench.edge"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _package_name(folder: Path) -> str:
    rel = folder.relative_to(ROOT).parts
    if rel[0] in MAPPED:
        return ".".join([MAPPED[rel[0]], *rel[1:]])
    return ".".join(rel)


def test_packages_list_matches_the_folders_with_init():
    """A sub-folder missing from `packages` imports in an editable install but is absent from the wheel."""
    on_disk = set()
    for top in ["clbench", *MAPPED]:
        for init in (ROOT / top).rglob("__init__.py"):
            on_disk.add(_package_name(init.parent))
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert on_disk == listed, f"on disk only: {sorted(on_disk - listed)}; listed only: {sorted(listed - on_disk)}"


def test_package_dir_maps_the_top_level_folders():
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert mapping == {v: k for k, v in MAPPED.items()}


def test_every_python_folder_under_a_package_has_an_init():
    """PEP 420 namespace folders reached through package-dir do not import from editable installs."""
    for top in ["clbench", *MAPPED]:
        for py in (ROOT / top).rglob("*.py"):
            folder = py.parent
            if "__pycache__" in folder.parts:
                continue
            assert (folder / "__init__.py").exists(), f"{folder} holds Python files but no __init__.py"


@pytest.mark.parametrize("name", sorted(MAPPED))
def test_top_level_import_from_repo_root_raises(name):
    proc = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and f"clbench.{name}" in proc.stderr, proc.stderr[-500:]


def test_mapped_packages_import_under_clbench_from_elsewhere(tmp_path):
    code = "import clbench.strategies, clbench.scenarios, clbench.edge; print(clbench.strategies.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.strip() == "clbench.strategies"


def test_tests_is_not_a_package():
    assert not list((ROOT / "tests").rglob("__init__.py"))


def test_console_script_and_py_typed():
    project = _pyproject()["project"]
    assert project["scripts"]["clbench"] == "clbench.cli:main"
    assert (ROOT / "clbench" / "py.typed").exists()


def _component(module: str, name: str = "Thing"):
    cls = types.new_class(name)
    cls.__module__ = module
    cls.__qualname__ = name
    return cls


def test_registry_raises_on_a_duplicate_name_from_another_module():
    reg = Registry("strategy", "clbench.strategies", "register_strategy")
    reg.register("ewc")(_component("clbench.strategies.ewc", "EWC"))
    with pytest.raises(KeyError, match="'ewc' registered twice.*clbench.strategies.ewc.EWC.*strategies.ewc.EWC"):
        reg.register("ewc")(_component("strategies.ewc", "EWC"))


def test_registry_accepts_the_same_class_registered_again():
    """Re-executing a module (importlib.reload) registers an equal origin: not a clash."""
    reg = Registry("strategy", "clbench.strategies", "register_strategy")
    first = _component("clbench.strategies.ewc", "EWC")
    reg.register("ewc")(first)
    again = _component("clbench.strategies.ewc", "EWC")
    assert reg.register("ewc")(again) is again and again.registry_name == "ewc"
