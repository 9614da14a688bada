"""The documentation site builds with warnings as errors, and every registered strategy has its page.

`mkdocs build --strict` runs the docs' hook (scripts/gen_method_docs.py), which generates each
method page's option and published-settings tables from the code and fails on a strategy
without a page; the build also fails on broken links and anchors and on pages missing from the
nav. The generated result tables stay where the Makefile's splice targets write them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clbench.registry import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
HAS_MKDOCS = all(importlib.util.find_spec(m) is not None for m in ("mkdocs", "material", "mkdocstrings"))
needs_mkdocs = pytest.mark.skipif(
    not HAS_MKDOCS, reason="mkdocs, mkdocs-material or mkdocstrings is not installed (pip install -e '.[dev]')")


@needs_mkdocs
@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    for name in STRATEGIES.names():
        page = tmp_path / "site" / "strategies" / name / "index.html"
        assert page.exists(), f"no built page for strategy {name!r}"
        text = page.read_text(encoding="utf-8")
        assert 'id="options"' in text and "clbench:options" not in text, f"{name}: options were not generated"
    shutil.rmtree(tmp_path / "site", ignore_errors=True)


def test_every_strategy_has_a_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for name in STRATEGIES.names():
        page = ROOT / "docs" / "strategies" / f"{name}.md"
        assert page.exists(), f"strategy {name!r} has no docs/strategies/{name}.md"
        assert f"<!-- clbench:options {name} -->" in page.read_text(encoding="utf-8"), \
            f"docs/strategies/{name}.md lacks its generated-options marker"
        assert f"strategies/{name}.md" in nav, f"docs/strategies/{name}.md is not in mkdocs.yml's nav"


def test_splice_targets_write_into_files_holding_their_markers():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = re.findall(r"splice_readme\.py (\S+) (\S+) ", makefile)
    assert {name for _, name in targets} >= {"leaderboard", "detection", "forecasting", "distillation", "quantization"}
    for path, name in targets:
        text = (ROOT / path).read_text(encoding="utf-8")
        assert f"<!-- {name}:begin -->" in text and f"<!-- {name}:end -->" in text, f"{path} lacks the {name} markers"
