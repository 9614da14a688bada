"""Mutation testing of clbench's tests with mutmut (a benchmark of the tests, not part of `make test`).

    python scripts/mutation.py                          # the default set (DEFAULT_FILES)
    python scripts/mutation.py strategies/lord.py       # one file (`make mutation FILE=strategies/lord.py`)
    python scripts/mutation.py --readme-only            # regenerate the tables (docs/mutation/README.md, README.md)
    python scripts/mutation.py --keep FILE; (add tests); python scripts/mutation.py --rerun-survivors FILE
                                                        # refreshes the copy; reruns the survivors and the mutants
                                                        # of functions edited since against the new tests

For each file it
  1. copies the working tree (tracked and untracked-but-not-ignored files) to a scratch directory,
     never touching the repository: mutmut writes its mutants there only;
  2. lays the copy out the way it is imported: the folders mapped with setuptools' package-dir
     (`strategies/` is `clbench.strategies`, ...) move under `clbench/`, so a mutant's module name
     (`clbench.strategies.lord`) is the name the tests import; the scratch copy shadows the editable
     install because mutmut puts its `mutants/` folder first on sys.path;
  3. runs `mutmut run` (one worker, fork server: torch is not fork-safe once used) with only the
     tests mapped to the file in TESTS, and a per-mutant timeout of
     timeout_multiplier x (the covering tests' measured duration) + timeout_constant seconds;
  4. checks every `killed_by` annotation in docs/mutation/annotations.toml by running the named
     test against the mutant (MUTANT_UNDER_TEST, mutmut's switch) in one pytest process;
  5. writes docs/mutation/<file without .py>.md and .json: killed, survived, timed out, the kill
     score, and for each survivor (or former survivor) the test that kills it now or the reason
     it is equivalent; then regenerates the table in docs/mutation/README.md from every .json and
     splices the same table between the mutation-table markers of the project's README.md.

Annotations (docs/mutation/annotations.toml), one table per mutant, keyed by file and mutant name:

    ["clbench/models/heads.py"."xǁIncrementalLinearǁgrow__mutmut_2"]
    mutant = "if out_features < old.out_features:"      # the mutated line, to notice stale names
    killed_by = "tests/test_ptm.py::test_growing_to_the_same_width_keeps_the_parameters"
    # or: equivalent = "one line: why no input can tell the mutant from the original"
"""

from __future__ import annotations

import argparse
import datetime as _dt
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "mutation"
ANNOTATIONS = DOCS / "annotations.toml"
SCRATCH = Path(os.environ.get("CLBENCH_MUTATION_DIR", "/tmp/clbench-mutation"))

# The tests that exercise each file: a mutant is run against these only.  Files not listed fall
# back to the naming convention (strategies/x.py -> tests/strategies/test_x.py, clbench/**/x.py ->
# tests/test_x.py).
TESTS: dict[str, list[str]] = {
    "clbench/models/buffers.py": ["tests/test_buffers.py"],
    "clbench/models/heads.py": ["tests/test_ptm.py"],  # the cosine and linear heads' unit tests live there
    "clbench/metrics.py": ["tests/test_metrics.py"],
    "strategies/lord.py": ["tests/strategies/test_lord.py"],
    "strategies/clfd.py": ["tests/strategies/test_clfd.py"],
    "edge/flops.py": ["tests/edge/test_flops.py"],
}
# the shared mechanics every method relies on: buffers, heads, teacher snapshots, metrics, FLOP counter
DEFAULT_FILES = ["clbench/models/buffers.py", "clbench/models/heads.py", "clbench/models/freeze.py",
                 "clbench/metrics.py", "edge/flops.py"]
# the lab's method files, which issue #22 asks a mutation report of; with the default set, a file
# of these without a report is listed in the table as not run yet
LAB_METHOD_FILES = [f"strategies/{name}.py" for name in (
    "etag", "preprompt", "sgds", "daf", "saef", "tuna", "lord", "fdinet", "clfd", "ior", "p2iod")]
RERUN = ("make mutation                          # the default set: " + ", ".join(DEFAULT_FILES) + "\n"
         "    make mutation FILE=strategies/lord.py  # one file (scripts/mutation.py takes several)")

ENV = {"WANDB_MODE": "offline", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DETECTED = ("killed", "timeout", "segfault")
UNDETECTED = ("survived", "no tests")


# --------------------------------------------------------------------------- layout
def package_dirs() -> dict[str, str]:
    """setuptools' package-dir of pyproject.toml: {"clbench.strategies": "strategies", ...}."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(data.get("tool", {}).get("setuptools", {}).get("package-dir", {}))


def scratch_path(file: str) -> str:
    """Where `file` (a repository path) lies in the scratch copy laid out as imported."""
    for package, folder in package_dirs().items():
        if file.startswith(folder.rstrip("/") + "/"):
            return package.replace(".", "/") + file[len(folder.rstrip("/")):]
    return file


def module_of(file: str) -> str:
    return scratch_path(file)[: -len(".py")].replace("/", ".")


def tests_for(file: str) -> list[str]:
    if file in TESTS:
        tests = TESTS[file]
    else:
        stem = Path(file).stem
        guess = f"tests/strategies/test_{stem}.py" if file.startswith("strategies/") else f"tests/test_{stem}.py"
        tests = [guess]
    missing = [t for t in tests if not (ROOT / t).exists()]
    if missing:
        raise SystemExit(f"{file}: no tests at {', '.join(missing)}; add the file to TESTS in scripts/mutation.py")
    return tests


def report_stem(file: str) -> Path:
    return DOCS / Path(file).with_suffix("")


def working_tree_files() -> list[str]:
    """The repository paths of the working tree's files (tracked, plus untracked ones git does not
    ignore), the mutation reports left out: what a scratch copy holds."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    return [rel for rel in listed if rel and (ROOT / rel).is_file() and not rel.startswith("docs/mutation/")]


def copy_tree(dest: Path) -> None:
    """The working tree (tracked, plus untracked files git does not ignore) into `dest`, laid out as imported."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in working_tree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    for package, folder in package_dirs().items():
        inside = dest / package.replace(".", "/")
        if (dest / folder).is_dir() and not inside.exists():
            shutil.move(str(dest / folder), inside)
            (dest / folder).symlink_to(inside.relative_to(dest), target_is_directory=True)


def write_mutmut_config(tree: Path, file: str, tests: list[str], args) -> None:
    # -p no:unraisableexception: that plugin runs gc.collect() twice per session, ~3 s of the ~3.5 s
    # each mutant's pytest.main costs with torch's heap loaded; it only reports unraisable exceptions.
    pyproject = tree / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    if "[tool.mutmut]" in text:
        raise SystemExit("pyproject.toml already has [tool.mutmut]; scripts/mutation.py writes its own")
    top = module_of(file).split(".")[0]
    config = f"""

[tool.mutmut]
source_paths = [{json.dumps(top)}]
only_mutate = [{json.dumps(scratch_path(file))}]
pytest_add_cli_args = ["-p", "no:randomly", "-p", "no:xdist", "-p", "no:unraisableexception", "-p", "_mutation_order", "-q"]
pytest_add_cli_args_test_selection = {json.dumps(tests)}
timeout_multiplier = {float(args.timeout_multiplier)}
timeout_constant = {float(args.timeout_constant)}
process_isolation = "forkserver"
forkserver_warmup = "import"
preload_modules_file = "preload_modules.txt"
use_git_change_detection = false
"""
    pyproject.write_text(text + config, encoding="utf-8")
    # in mutants/: mutmut puts that folder on sys.path (and takes the tree itself off it)
    (tree / "mutants").mkdir(exist_ok=True)
    (tree / "mutants" / "_mutation_order.py").write_text(ORDER_PLUGIN, encoding="utf-8")


# Loaded into every pytest run mutmut makes (its statistics run and each mutant's run).
#
# Test order: mutmut hands pytest a mutant's covering tests as a set (in no useful order) and stops
# at the first failure (-x): running them fastest first, by the durations mutmut measured, makes a
# killed mutant cost its fastest killing test rather than whichever slow run happens to come first.
#
# Shared fixtures: mutmut maps a function to the tests during which it was called. A module-scoped
# fixture (a short run that several tests check) executes once, inside the first test that asks for
# it, so mutmut credited the run's functions to that test alone and never ran the later tests
# against their mutants. The calls made while a fixture wider than one test is set up are recorded
# per fixture and credited to every test that uses the fixture.
ORDER_PLUGIN = '''
import json, os

import pytest


def pytest_collection_modifyitems(session, config, items):
    if not os.path.exists("mutmut-stats.json"):
        return
    with open("mutmut-stats.json") as f:
        durations = json.load(f).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


_calls_by_fixture = {}


def _hits():
    try:
        from mutmut.state import state
    except ImportError:
        return None
    return state()._stats


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    hits = _hits() if fixturedef.scope != "function" else None
    if hits is None:
        yield
        return
    before = set(hits)
    hits.clear()
    try:
        yield
    finally:
        _calls_by_fixture[id(fixturedef)] = set(hits)
        hits |= before


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    hits = _hits()
    if hits is not None:
        for definitions in item._fixtureinfo.name2fixturedefs.values():
            for fixturedef in definitions:
                hits |= _calls_by_fixture.get(id(fixturedef), set())
    yield
'''


# --------------------------------------------------------------------------- running
MODULES_PLUGIN = '''
import os, sys

def pytest_sessionfinish(session):
    skip = ("tests", "conftest", "_pytest", "pytest", "__main__", "_mutation")
    names = [n for n in list(sys.modules) if not n.startswith(skip)]
    with open(os.environ["CLBENCH_MUTATION_MODULES"], "w") as f:
        f.write("\\n".join(names) + "\\n")
'''


def write_preload_list(tree: Path, tests: list[str]) -> None:
    """Run the tests once on the unmutated copy and list every module they import: mutmut's fork
    server imports these before forking each mutant's run, so modules the tests import lazily
    (Avalanche inside a test body, ~4 s) are not imported again for every mutant."""
    (tree / "_mutation_modules.py").write_text(MODULES_PLUGIN, encoding="utf-8")
    env = {**os.environ, **ENV, "CLBENCH_MUTATION_MODULES": str(tree / "preload_modules.txt"), "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:xdist", "-p", "_mutation_modules", *tests],
        cwd=tree, env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the tests fail on the unmutated copy:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")


def run_mutmut(tree: Path, log: Path, names: list[str] | None = None, jobs: int = 1) -> int:
    """`mutmut run` in `tree`: every mutant, or only `names` (mutmut reruns the mutants it is given)."""
    env = {**os.environ, **ENV}
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *(names or [])],
            cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    return proc.returncode


def refresh_tree(tree: Path) -> None:
    """Copy the working tree (sources and tests) over a kept scratch copy, and drop mutmut's test
    statistics so that the next run maps the tests to the functions again. The folder links the copy
    was laid out with put each source where it is imported; a mutated file edited since is newer
    than its mutants, so mutmut regenerates them and forgets the results of the changed functions."""
    for rel in working_tree_files():
        if rel == "pyproject.toml":  # the copy's own carries the mutmut settings
            continue
        # tests run from mutants/, where mutmut copied them once: both copies get the new version
        bases = (tree, tree / "mutants") if rel.startswith("tests/") else (tree,)
        for base in bases:
            target = base / rel
            if target.is_file() and filecmp.cmp(ROOT / rel, target, shallow=False):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target)
            os.utime(target)  # newer than any mutant made from the old version
    (tree / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)


def read_results(tree: Path, file: str) -> dict[str, str]:
    from mutmut.stats import status_by_exit_code

    meta = tree / "mutants" / (scratch_path(file) + ".meta")
    data = json.loads(meta.read_text(encoding="utf-8"))
    return {key: status_by_exit_code[code] for key, code in data["exit_code_by_key"].items()}


def diffs(tree: Path, file: str, names: list[str]) -> dict[str, str]:
    from mutmut.configuration import reset_config
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    here = Path.cwd()
    os.chdir(tree)
    try:
        reset_config()
        return {name: get_diff_for_mutant(name, path=scratch_path(file)) for name in names}
    finally:
        os.chdir(here)
        reset_config()


def mutated_line(diff: str) -> str:
    plus = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(plus) if plus else "(line removed)"


VERIFY_PLUGIN = '''
import functools, json, os, sys
from _pytest.runner import runtestprotocol

PLAN = json.loads(os.environ["CLBENCH_MUTATION_PLAN"])
COPY = os.path.abspath(os.environ["PYTHONPATH"]) + os.sep
TESTS = COPY + "tests" + os.sep
RESULTS = {}

def clear_copy_caches():
    # A module-level functools cache filled while one mutant was active would hand that mutant's
    # answers to the next run (another mutant, or the unmutated check): empty the caches of the
    # copy's sources. The tests' own are kept: they hold once-per-process set-up (a custom op
    # registered with torch.library cannot be registered twice).
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if not path.startswith(COPY) or path.startswith(TESTS):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, functools._lru_cache_wrapper):
                value.cache_clear()

def record(key, reports):
    # a parametrised test is planned by its name: one failing case is a failure of the test
    failed = any(r.failed for r in reports) or RESULTS.get(key) == "fails"
    RESULTS[key] = "fails" if failed else "passes"

def pytest_runtest_protocol(item, nextitem):
    test = item.nodeid if item.nodeid in PLAN else item.nodeid.split("[", 1)[0]
    mutants = PLAN.get(test)
    if not mutants:
        return None
    for mutant in mutants:
        clear_copy_caches()
        os.environ["MUTANT_UNDER_TEST"] = mutant
        try:
            reports = runtestprotocol(item, nextitem=None, log=False)
        finally:
            os.environ.pop("MUTANT_UNDER_TEST", None)
        record(mutant, reports)
    clear_copy_caches()
    record(test + "::original", runtestprotocol(item, nextitem=nextitem, log=False))
    return True

def pytest_sessionfinish(session):
    with open(os.environ["CLBENCH_MUTATION_VERIFIED"], "w") as f:
        json.dump(RESULTS, f)
'''


def verify_kills(tree: Path, plan: dict[str, list[str]]) -> dict[str, str]:
    """Run each annotated test against its mutants in one pytest process: {mutant: 'fails'|'passes'}.
    The copy's module-level caches are emptied before each run, so no run sees another's answers."""
    if not plan:
        return {}
    mutants = tree / "mutants"
    (mutants / "_mutation_verify.py").write_text(VERIFY_PLUGIN, encoding="utf-8")
    out = tree / "verified.json"
    env = {
        **os.environ, **ENV,
        "CLBENCH_MUTATION_PLAN": json.dumps(plan),
        "CLBENCH_MUTATION_VERIFIED": str(out),
        "PYTHONPATH": str(mutants),
    }
    env.pop("MUTANT_UNDER_TEST", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:xdist", "-p", "_mutation_verify",
         *sorted(plan)], cwd=mutants, env=env, capture_output=True, text=True,
    )
    if not out.exists():
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return {}
    return json.loads(out.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- reports
def load_annotations() -> dict[str, dict[str, dict]]:
    if not ANNOTATIONS.exists():
        return {}
    return tomllib.loads(ANNOTATIONS.read_text(encoding="utf-8"))


def short(name: str) -> str:
    return name.rpartition(".")[2]


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head or "unknown"


def kill_score(detected: int, total: int) -> float | None:
    return None if total == 0 else detected / total


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def build_report(file: str, tests: list[str], status: dict[str, str], diff_by_name: dict[str, str],
                 notes: dict[str, dict], verified: dict[str, str], args) -> tuple[str, dict]:
    counts = {s: 0 for s in ("killed", "timeout", "segfault", "survived", "no tests", "suspicious", "skipped")}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    total = len(status)
    detected = sum(counts[s] for s in DETECTED)
    undetected = [n for n, s in status.items() if s in UNDETECTED]
    equivalent = [n for n in undetected if "equivalent" in notes.get(short(n), {})]
    unexplained = [n for n in undetected if n not in equivalent]
    former = [n for n, s in status.items() if s in DETECTED and "killed_by" in notes.get(short(n), {})]
    stale = [n for n in notes if f"{module_of(file)}.{n}" not in status]
    contradicted = [n for n, s in status.items() if s in DETECTED and "equivalent" in notes.get(short(n), {})]

    summary = {
        "file": file,
        "tests": tests,
        "mutants": total,
        "killed": counts["killed"] + counts["segfault"],
        "timed_out": counts["timeout"],
        "survived": counts["survived"],
        "not_covered": counts["no tests"],
        "suspicious": counts["suspicious"],
        "equivalent": len(equivalent),
        "unexplained": len(unexplained),
        "kill_score": kill_score(detected, total),
        "kill_score_without_equivalent": kill_score(detected, total - len(equivalent)),
        "date": _dt.date.today().isoformat(),
        "commit": git_commit(),
        "mutmut": _mutmut_version(),
        "timeout": f"{args.timeout_multiplier:g} x covering tests' duration + {args.timeout_constant:g} s",
    }

    def diff_block(name: str) -> str:
        return "```diff\n" + diff_by_name.get(name, "(no diff)").rstrip() + "\n```\n"

    def line_check(name: str) -> str:
        want = notes.get(short(name), {}).get("mutant")
        got = mutated_line(diff_by_name.get(name, ""))
        return "" if want is None or want == got else f" **(stale annotation: it names `{want}`, the mutant now reads `{got}`)**"

    out = [f"# Mutation testing: `{file}`\n",
           "Generated by `scripts/mutation.py` (mutmut); do not edit by hand. Rerun with "
           f"`make mutation FILE={file}`.\n",
           f"Tests run against each mutant: {', '.join(f'`{t}`' for t in tests)}. "
           f"Per-mutant timeout: {summary['timeout']}. "
           f"Commit {summary['commit']}, {summary['date']}, mutmut {summary['mutmut']}.\n",
           "| mutants | killed | timed out | survived | not covered | of which equivalent | unexplained | kill score | without equivalents |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
           f"| {total} | {summary['killed']} | {summary['timed_out']} | {summary['survived']} | {summary['not_covered']} "
           f"| {len(equivalent)} | {len(unexplained)} | {pct(summary['kill_score'])} | {pct(summary['kill_score_without_equivalent'])} |\n",
           "Kill score = (killed + timed out) / mutants. *Not covered*: no selected test calls the mutated "
           "function (mutmut's \"no tests\"), counted as survivors. *Without equivalents*: equivalent mutants "
           "(changes no input can observe) left out of the denominator.\n"]
    if unexplained:
        out.append(f"## Survivors without a killing test or a reason ({len(unexplained)})\n")
        for n in unexplained:
            out.append(f"### `{short(n)}` ({status[n]}){line_check(n)}\n")
            if "killed_by" in notes.get(short(n), {}):
                out.append(f"Annotated as killed by `{notes[short(n)]['killed_by']}`, but it survived this run.\n")
            out.append(diff_block(n))
    if former:
        out.append(f"## Former survivors, killed now ({len(former)})\n")
        out.append("Each named test was run alone against its mutant after the mutmut run: "
                   "*fails* means it kills the mutant by itself.\n")
        for n in former:
            test = notes[short(n)]["killed_by"]
            check = verified.get(n, "not checked")
            out.append(f"### `{short(n)}`{line_check(n)}\n")
            out.append(f"Killed by `{test}` (alone against the mutant: {check}).\n")
            out.append(diff_block(n))
    if equivalent:
        out.append(f"## Equivalent mutants ({len(equivalent)})\n")
        for n in equivalent:
            out.append(f"### `{short(n)}` ({status[n]}){line_check(n)}\n")
            out.append(f"Equivalent: {notes[short(n)]['equivalent']}\n")
            out.append(diff_block(n))
    if contradicted:
        out.append("## Annotated as equivalent, but killed: the annotation is wrong\n")
        out.extend(f"- `{short(n)}`: {notes[short(n)]['equivalent']}" for n in contradicted)
        out.append("")
    if stale:
        out.append("## Annotations naming no current mutant\n")
        out.extend(f"- `{n}`" for n in stale)
        out.append("")
    summary["verified_failures"] = sum(1 for n in former if verified.get(n) == "fails")
    summary["former_survivors"] = len(former)
    return "\n".join(out), summary


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


README_BEGIN, README_END = "<!-- mutation-table:begin -->", "<!-- mutation-table:end -->"
TOP_README = ROOT / "README.md"  # the project's README shows the same table, linking into docs/mutation/


def mutation_table(docs: Path = DOCS, link_prefix: str = "", tracked: list[str] | None = None) -> str:
    """The kill-score table of every report (.json) under `docs`; links are `link_prefix` + the
    report's path relative to `docs` ("" from docs/mutation/README.md, "docs/mutation/" from README.md).
    Files of `tracked` (default: the default set and the lab's method files) without a report get a
    row saying so, after the others, so a missing run shows in the table instead of going unseen."""
    rows, reported = [], set()
    for path in sorted(docs.rglob("*.json")):
        s = json.loads(path.read_text(encoding="utf-8"))
        reported.add(s["file"])
        link = link_prefix + path.relative_to(docs).with_suffix(".md").as_posix()
        rows.append(
            f"| [`{s['file']}`]({link}) | {s['mutants']} | {s['killed']} | {s['timed_out']} | "
            f"{s['survived'] + s['not_covered']} | {s['equivalent']} | {s['unexplained']} | "
            f"{pct(s['kill_score'])} | {pct(s['kill_score_without_equivalent'])} | {s['commit']}, {s['date']} |"
        )
    for file in sorted(set(DEFAULT_FILES + LAB_METHOD_FILES if tracked is None else tracked) - reported):
        rows.append(f"| `{file}` | not run yet | | | | | | | | `make mutation FILE={file}` |")
    return "\n".join([
        "| file | mutants | killed | timed out | survived | of which equivalent | unexplained | kill score | without equivalents | run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
    ])


def splice_table(text: str, table: str) -> str:
    """`text` with whatever lies between the mutation-table markers replaced by `table`."""
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise ValueError(f"expected one {README_BEGIN} followed by one {README_END}")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}"


def write_readme(docs: Path = DOCS, top_readme: Path = TOP_README) -> None:
    """Regenerate docs/mutation/README.md's table (the whole page if it has no markers) and splice
    the same table, links prefixed with docs/mutation/, into the project's README.md."""
    readme = docs / "README.md"
    if readme.exists() and README_BEGIN in readme.read_text(encoding="utf-8"):
        text = readme.read_text(encoding="utf-8")
    else:
        text = textwrap.dedent("""\
            # Mutation testing

            How well clbench's tests catch broken code: [mutmut](https://pypi.org/project/mutmut/) changes one
            thing at a time in a source file (an operator, a constant, a call's argument) and runs the tests
            mapped to that file against each change (a *mutant*). A mutant the tests catch is *killed*; one
            they pass is a *survivor*: either the tests miss a behaviour (each such survivor gets a killing
            test) or the change cannot alter behaviour (it is marked *equivalent*, with the reason).

            A benchmark of the tests, not part of `make test`. Rerun:

                RERUN

            The script works on a scratch copy of the tree (`$CLBENCH_MUTATION_DIR`, default
            `/tmp/clbench-mutation`), one mutant at a time, and writes one report per file beside this page,
            then this table from the reports' `.json` files. Survivors are explained in
            `docs/mutation/annotations.toml`. A mutant is run against the tests that called its
            function; the calls a shared (module-scoped) fixture makes, such as a short run several
            tests check, count for every test that uses the fixture, not only the first.

            """).replace("RERUN", RERUN) + f"{README_BEGIN}\n{README_END}\n"
    readme.write_text(splice_table(text, mutation_table(docs)), encoding="utf-8")
    if top_readme.exists() and README_BEGIN in (top := top_readme.read_text(encoding="utf-8")):
        prefix = os.path.relpath(docs, top_readme.parent).replace(os.sep, "/") + "/"
        top_readme.write_text(splice_table(top, mutation_table(docs, prefix)), encoding="utf-8")


# --------------------------------------------------------------------------- main
def mutate(file: str, args) -> dict:
    tests = tests_for(file)
    slug = file.replace("/", "_").removesuffix(".py")
    tree = SCRATCH / slug
    meta = tree / "mutants" / (scratch_path(file) + ".meta")
    log = tree / "mutmut.log"
    if args.rerun_survivors:
        if not meta.exists():
            raise SystemExit(f"{file}: no kept run in {tree} (run it once with --keep)")
        refresh_tree(tree)
        # first the mutants of functions edited since (mutmut checks only those, and maps the tests anew) ...
        print(f"[mutation] {file}: sources and tests refreshed in {tree}; mutmut checks the mutants of "
              f"functions changed since (log: {log})", flush=True)
        rc = run_mutmut(tree, log, jobs=args.jobs)
        # ... then every survivor again, against the new tests
        survivors = [n for n, s in read_results(tree, file).items() if s in UNDETECTED]
        print(f"[mutation] {file}: mutmut reruns its {len(survivors)} survivors (log: {log})", flush=True)
        rc = run_mutmut(tree, log, survivors, jobs=args.jobs) if survivors else rc
    else:
        print(f"[mutation] {file}: copying the tree to {tree}", flush=True)
        copy_tree(tree)
        write_mutmut_config(tree, file, tests, args)
        print(f"[mutation] {file}: running {' '.join(tests)} once unmutated (modules to preload)", flush=True)
        write_preload_list(tree, tests)
        print(f"[mutation] {file}: mutmut run against {' '.join(tests)} (log: {log})", flush=True)
        rc = run_mutmut(tree, log, jobs=args.jobs)
    if not meta.exists():
        raise SystemExit(f"mutmut produced no results for {file} (exit {rc}); see {log}")
    status = read_results(tree, file)
    unfinished = [n for n, st in status.items() if st == "not checked"]
    if unfinished:
        raise SystemExit(f"mutmut left {len(unfinished)} of {len(status)} mutants of {file} unchecked (exit {rc}); "
                         f"see {log}: no report written")
    notes = load_annotations().get(file, {})
    interesting = [n for n, s in status.items() if s in UNDETECTED or short(n) in notes]
    diff_by_name = diffs(tree, file, interesting)
    plan: dict[str, list[str]] = {}
    for name, s in status.items():
        test = notes.get(short(name), {}).get("killed_by")
        if test and s in DETECTED:
            plan.setdefault(test, []).append(name)
    verified = verify_kills(tree, plan) if not args.no_verify else {}
    for test in plan:
        if verified.get(test + "::original") == "fails":
            print(f"[mutation] warning: {test} fails on the unmutated code", file=sys.stderr)
    text, summary = build_report(file, tests, status, diff_by_name, notes, verified, args)
    stem = report_stem(file)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"[mutation] {file}: {summary['mutants']} mutants, {summary['killed']} killed, "
          f"{summary['timed_out']} timed out, {summary['survived'] + summary['not_covered']} survived "
          f"({summary['equivalent']} equivalent, {summary['unexplained']} unexplained); "
          f"kill score {pct(summary['kill_score'])} -> {stem.with_suffix('.md').relative_to(ROOT)}", flush=True)
    if not args.keep:
        shutil.rmtree(tree, ignore_errors=True)
    return summary


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help=f"repository paths of source files (default: {' '.join(DEFAULT_FILES)})")
    parser.add_argument("--timeout-multiplier", type=float, default=10.0,
                        help="per-mutant timeout: this x the covering tests' measured duration ...")
    parser.add_argument("--timeout-constant", type=float, default=10.0, help="... + this many seconds")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="mutants checked at once (mutmut's --max-children; default 1: one run per core "
                             "leaves the other cores to a second run)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (for `mutmut show`/`browse` there)")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="in the copy a --keep run left, refresh sources and tests from the working tree, check "
                             "the mutants of functions changed since and rerun the survivors; implies --keep")
    parser.add_argument("--no-verify", action="store_true", help="skip running the annotated killing tests")
    parser.add_argument("--readme-only", action="store_true", help="only regenerate the tables (docs/mutation/README.md, README.md)")
    args = parser.parse_args(argv)
    args.keep = args.keep or args.rerun_survivors
    DOCS.mkdir(parents=True, exist_ok=True)
    if not args.readme_only:
        for file in args.files or DEFAULT_FILES:
            file = Path(file).as_posix().removeprefix("./")
            if not (ROOT / file).is_file():
                raise SystemExit(f"no such file: {file}")
            mutate(file, args)
    write_readme()
    print(f"[mutation] table: {(DOCS / 'README.md').relative_to(ROOT)} and {TOP_README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
