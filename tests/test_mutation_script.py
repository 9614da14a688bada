"""scripts/mutation.py's tables: the kill-score table of docs/mutation/README.md and the same table
spliced into the project's README.md between its markers, links pointing into docs/mutation/."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("_mutation_script", ROOT / "scripts" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(docs: Path, stem: str, **values) -> None:
    summary = {"file": stem + ".py", "mutants": 10, "killed": 7, "timed_out": 1, "survived": 1, "not_covered": 1,
               "equivalent": 1, "unexplained": 1, "kill_score": 0.8, "kill_score_without_equivalent": 8 / 9,
               "commit": "abc1234", "date": "2026-01-02", **values}
    path = docs / (stem + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary), encoding="utf-8")


def test_both_tables_are_regenerated_and_the_top_readme_links_into_docs_mutation(tmp_path, mutation):
    docs = tmp_path / "docs" / "mutation"
    _report(docs, "strategies/tuna")
    _report(docs, "clbench/metrics", mutants=4, killed=4, timed_out=0, survived=0, not_covered=0, equivalent=0,
            unexplained=0, kill_score=1.0, kill_score_without_equivalent=1.0)
    top = tmp_path / "README.md"
    top.write_text("# proj\n\n## Tests\n\nBefore.\n\n<!-- mutation-table:begin -->\nold table\n"
                   "<!-- mutation-table:end -->\n\nAfter.\n\n## License\n", encoding="utf-8")

    mutation.write_readme(docs, top)

    text = top.read_text(encoding="utf-8")
    # everything outside the markers is kept as it was
    assert text.startswith("# proj\n\n## Tests\n\nBefore.\n\n<!-- mutation-table:begin -->\n| file |")
    assert text.endswith("|\n<!-- mutation-table:end -->\n\nAfter.\n\n## License\n")
    assert "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    # sorted by report path; survived = survived + not covered; percentages to one decimal
    assert rows == [
        "| [`clbench/metrics.py`](docs/mutation/clbench/metrics.md) | 4 | 4 | 0 | 0 | 0 | 0 | 100.0% | 100.0% | abc1234, 2026-01-02 |",
        "| [`strategies/tuna.py`](docs/mutation/strategies/tuna.md) | 10 | 7 | 1 | 2 | 1 | 1 | 80.0% | 88.9% | abc1234, 2026-01-02 |",
    ]
    # docs/mutation/README.md: a whole page written from scratch, the same rows linking beside it
    page = (docs / "README.md").read_text(encoding="utf-8")
    assert page.startswith("# Mutation testing\n") and "make mutation FILE=" in page
    assert "| [`strategies/tuna.py`](strategies/tuna.md) | 10 | 7 | 1 | 2 | 1 | 1 | 80.0% | 88.9% |" in page
    assert "docs/mutation/strategies" not in page

    # a second run replaces the tables instead of adding another, on both pages
    _report(docs, "strategies/tuna", killed=8, survived=0, unexplained=0, kill_score=0.9)
    mutation.write_readme(docs, top)
    again = top.read_text(encoding="utf-8")
    assert again.count("mutation-table:begin") == 1 and again.count("strategies/tuna.md") == 1
    assert "| 10 | 8 | 1 | 1 | 1 | 0 | 90.0% |" in again
    kept = (docs / "README.md").read_text(encoding="utf-8")
    assert kept.count("mutation-table:begin") == 1 and "| 10 | 8 | 1 | 1 | 1 | 0 | 90.0% |" in kept
    assert kept.split("<!-- mutation-table:begin -->")[0] == page.split("<!-- mutation-table:begin -->")[0]


def test_a_tracked_file_without_a_report_is_listed_as_not_run_after_the_reported_ones(tmp_path, mutation):
    docs = tmp_path / "docs" / "mutation"
    _report(docs, "strategies/tuna")
    table = mutation.mutation_table(docs, tracked=["strategies/tuna.py", "strategies/ior.py", "edge/flops.py"])
    rows = table.splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| [`strategies/tuna.py`](strategies/tuna.md)",
                                                     "| `edge/flops.py`", "| `strategies/ior.py`"]
    assert rows[2] == "| `strategies/ior.py` | not run yet | | | | | | | | `make mutation FILE=strategies/ior.py` |"
    # every row has the header's ten columns
    assert {row.count("|") for row in rows} == {table.splitlines()[0].count("|")} == {11}
    # by default the lab's method files are tracked: the eleven methods, each reported or listed
    default = mutation.mutation_table(docs)
    assert all(f"`strategies/{m}.py`" in default for m in ("etag", "preprompt", "sgds", "daf", "saef", "tuna",
                                                            "lord", "fdinet", "clfd", "ior", "p2iod"))


def test_a_top_readme_without_markers_is_left_alone_and_broken_markers_are_refused(tmp_path, mutation):
    docs = tmp_path / "docs" / "mutation"
    _report(docs, "strategies/tuna")
    top = tmp_path / "README.md"
    top.write_text("# proj\n", encoding="utf-8")
    mutation.write_readme(docs, top)
    assert top.read_text(encoding="utf-8") == "# proj\n"
    with pytest.raises(ValueError):
        mutation.splice_table("<!-- mutation-table:end -->\n<!-- mutation-table:begin -->\n", "t")
    with pytest.raises(ValueError):
        mutation.splice_table("<!-- mutation-table:begin -->\n", "t")


def test_the_project_readme_carries_the_table_between_markers_and_the_rerun_command(mutation):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make mutation" in text and "--readme-only" in text
    # splicing works on it (one pair of markers, in order), and its rows link to reports that exist
    assert mutation.splice_table(text, "T").count("<!-- mutation-table:begin -->\nT\n<!-- mutation-table:end -->") == 1
    table = text.split("<!-- mutation-table:begin -->")[1].split("<!-- mutation-table:end -->")[0]
    links = [line.split("](")[1].split(")")[0] for line in table.splitlines() if line.startswith("| [")]
    assert links and all(link.startswith("docs/mutation/") and (ROOT / link).is_file() for link in links)


SHARED_FIXTURE_TESTS = '''
import pytest
from mutmut.state import state


@pytest.fixture(scope="module")
def short_run():
    state()._stats.add("run_the_stream")      # what a mutated function's trampoline records
    return 3


@pytest.fixture
def one_step():
    state()._stats.add("take_a_step")
    return 1


def test_first(short_run):
    assert short_run == 3


def test_second_reads_the_same_run(short_run, one_step):
    assert short_run + one_step == 4


def test_unrelated():
    state()._stats.add("helper")
'''


def test_a_module_fixtures_calls_are_credited_to_every_test_that_uses_it(tmp_path, monkeypatch, mutation):
    """mutmut maps a mutated function to the tests during which it ran; a module-scoped fixture runs
    inside the first test only, so without the plugin the second test would never be run against
    the fixture's mutants. Here the mapping is recorded the way mutmut's statistics run does."""
    from mutmut.state import state

    (tmp_path / "_mutation_order.py").write_text(mutation.ORDER_PLUGIN, encoding="utf-8")
    (tmp_path / "test_shared.py").write_text(SHARED_FIXTURE_TESTS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    tests_by_function: dict[str, set[str]] = {}

    class StatsLikeMutmut:
        def pytest_runtest_teardown(self, item, nextitem):
            for function in state()._stats:
                tests_by_function.setdefault(function, set()).add(item.name)
            state()._stats.clear()

    state()._stats.clear()
    try:
        code = pytest.main(["-q", "-p", "no:randomly", "-p", "no:xdist", "-p", "no:cacheprovider", "-p",
                            "_mutation_order", "--rootdir", str(tmp_path), str(tmp_path / "test_shared.py")],
                           plugins=[StatsLikeMutmut()])
    finally:
        state()._stats.clear()
    assert code == 0
    assert tests_by_function == {
        "run_the_stream": {"test_first", "test_second_reads_the_same_run"},
        "take_a_step": {"test_second_reads_the_same_run"},
        "helper": {"test_unrelated"},
    }


def test_a_kept_copy_is_refreshed_from_the_working_tree_through_its_package_layout(tmp_path, monkeypatch, mutation):
    """--rerun-survivors copies edited sources to where the copy imports them (a package-dir folder
    moved under its package), tests into both copies, leaves the copy's own pyproject alone, marks
    an edited file newer than the mutants made from it and drops mutmut's test statistics."""
    import os
    import subprocess

    repo = tmp_path / "repo"
    (repo / "strategies").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"pkg.strategies" = "strategies"\n')
    (repo / "strategies" / "m.py").write_text("X = 1\n")
    (repo / "tests" / "test_m.py").write_text("def test(): pass\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    monkeypatch.setattr(mutation, "ROOT", repo)
    tree = tmp_path / "copy"
    mutation.copy_tree(tree)
    assert (tree / "pkg" / "strategies" / "m.py").read_text() == "X = 1\n"
    (tree / "pyproject.toml").write_text("[tool.mutmut]\n")
    (tree / "mutants" / "tests").mkdir(parents=True)
    (tree / "mutants" / "mutmut-stats.json").write_text("{}")
    mutant = tree / "mutants" / "pkg" / "strategies" / "m.py"
    mutant.parent.mkdir(parents=True)
    mutant.write_text("X = 1  # mutated\n")
    os.utime(tree / "pkg" / "strategies" / "m.py", (1, 1))  # as old as the copy
    (repo / "strategies" / "m.py").write_text("X = 2\n")
    os.utime(repo / "strategies" / "m.py", (2, 2))  # an old mtime: copy2 alone would keep it
    (repo / "tests" / "test_m.py").write_text("def test_new(): pass\n")

    mutation.refresh_tree(tree)

    moved = tree / "pkg" / "strategies" / "m.py"
    assert moved.read_text() == "X = 2\n" and not (tree / "strategies").resolve() == tree / "strategies"
    assert moved.stat().st_mtime >= mutant.stat().st_mtime  # mutmut regenerates the mutants
    assert (tree / "tests" / "test_m.py").read_text() == (tree / "mutants" / "tests" / "test_m.py").read_text() == "def test_new(): pass\n"
    assert (tree / "pyproject.toml").read_text() == "[tool.mutmut]\n"
    assert not (tree / "mutants" / "mutmut-stats.json").exists()


CACHED_FACTS = '''
import functools, os


@functools.lru_cache(maxsize=None)
def kind(op):
    # stands in for a mutmut trampoline: the answer depends on the mutant active at the first call
    return "mutated" if os.environ.get("MUTANT_UNDER_TEST") == "pkg.facts.x_kind__mutmut_1" else "real"
'''


def test_verification_does_not_carry_a_cached_answer_from_one_mutant_into_the_next_run(tmp_path, mutation):
    """The verification step runs every annotated test against its mutants in one process; a
    module-level cache filled under the first mutant must not decide the second mutant's run or
    the unmutated check (without emptying it both would read "mutated"); the tests' own caches
    are kept (emptying a once-only set-up would run it twice)."""
    copy = tmp_path / "mutants"
    (copy / "pkg").mkdir(parents=True)
    (copy / "pkg" / "__init__.py").write_text("", encoding="utf-8")
    (copy / "pkg" / "facts.py").write_text(CACHED_FACTS, encoding="utf-8")
    (copy / "tests").mkdir()
    (copy / "tests" / "test_facts.py").write_text(
        "import functools, pytest\nfrom pkg.facts import kind\n\nDEFINED = []\n\n\n"
        # a test's own once-only set-up (a custom op registered once per process) stays cached
        "@functools.lru_cache(maxsize=None)\ndef define_once():\n    assert not DEFINED, 'defined twice'\n    DEFINED.append(1)\n\n\n"
        "def test_kind():\n    define_once()\n    assert kind('add') == 'real'\n\n\n"
        "@pytest.mark.parametrize('op', ['mul', 'add'])\ndef test_each(op):\n    assert kind(op) == 'real' or op == 'mul'\n",
        encoding="utf-8")

    verified = mutation.verify_kills(tmp_path, {
        "tests/test_facts.py::test_kind": ["pkg.facts.x_kind__mutmut_1", "pkg.facts.x_other__mutmut_2"],
        # an annotation names a parametrised test by its name; one failing case is enough
        "tests/test_facts.py::test_each": ["pkg.facts.x_kind__mutmut_1"]})

    assert verified == {"pkg.facts.x_kind__mutmut_1": "fails", "pkg.facts.x_other__mutmut_2": "passes",
                        "tests/test_facts.py::test_kind::original": "passes",
                        "tests/test_facts.py::test_each::original": "passes"}


def test_jobs_reach_mutmut_as_its_max_children_and_a_bad_count_is_refused(tmp_path, monkeypatch, mutation, capsys):
    calls = []
    monkeypatch.setattr(mutation.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or type("P", (), {"returncode": 0})())
    mutation.run_mutmut(tmp_path, tmp_path / "log", ["m1"], jobs=2)
    assert calls[0][-4:] == ["run", "--max-children", "2", "m1"]
    with pytest.raises(SystemExit) as exit_:
        mutation.main(["--jobs", "0", "strategies/tuna.py"])
    assert exit_.value.code == 2
    assert "--jobs: expected a whole number of at least 1, got '0'" in capsys.readouterr().err
