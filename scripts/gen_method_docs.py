"""The generated parts of the method pages: options from each strategy's `Config`, `PAPER_SETTINGS`.

The method pages under `docs/strategies/` are written by hand except for what the code already
says. A page holds the line `<!-- clbench:options NAME -->`; at build time MkDocs runs this file
as a hook (`hooks:` in `mkdocs.yml`) and replaces the line with tables generated from strategy
NAME's `Config` dataclass (field, type, default, the comment beside the field) and its
`PAPER_SETTINGS` (scenario -> settings), so the tables never drift from the code. The line
`<!-- clbench:methods-table -->` becomes the table of every registered strategy, and
`<!-- clbench:readme NAME -->` the README's generated block NAME (between its
`<!-- NAME:begin -->` and `<!-- NAME:end -->` markers), so the headline results live in one place.

A registered strategy without a page, or a page whose NAME is not registered, fails the build.

    python scripts/gen_method_docs.py er          # print what the marker of `er` becomes
    python scripts/gen_method_docs.py --list      # the methods table
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
import tokenize
import typing
from functools import lru_cache
from pathlib import Path

OPTIONS = re.compile(r"^<!-- clbench:options (\S+) -->$", re.M)
METHODS_TABLE = "<!-- clbench:methods-table -->"
README_BLOCK = re.compile(r"^<!-- clbench:readme (\S+) -->$", re.M)
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@lru_cache(maxsize=1)
def strategies() -> dict[str, type]:
    from clbench.registry import STRATEGIES

    return {name: STRATEGIES.get(name) for name in STRATEGIES.names()}


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> the comment on its line, or the comment lines right above it, in `cls`'s source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    out: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        m = re.match(r"\s+(\w+)\s*:\s*[^=]+=", line)
        if not m or line.lstrip().startswith("#"):
            continue
        name = m.group(1)
        if number in comments:
            out[name] = comments[number]
            continue
        above, k = [], number - 1
        while k >= 1 and lines[k - 1].lstrip().startswith("#"):
            above.insert(0, comments.get(k, ""))
            k -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    if getattr(tp, "__module__", None) == "builtins" and typing.get_origin(tp) is None:
        return tp.__name__
    text = repr(tp).replace("typing.", "")
    return re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)


def _value(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "(empty)"
    if isinstance(value, str):
        return repr(value) if value else "'' (empty)"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _config_rows(cfg_cls: type) -> tuple[list[tuple], list[tuple]]:
    """(method rows, shared optimiser rows): (name, type, default, note) per field."""
    from clbench.config import StrategyConfig

    shared = {f.name for f in dataclasses.fields(StrategyConfig)}
    try:
        hints = typing.get_type_hints(cfg_cls)
    except Exception:  # a forward reference that does not resolve: fall back to the annotation text
        hints = {}
    comments: dict[str, str] = {}
    for klass in reversed(cfg_cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_field_comments(klass))
    own, common = [], []
    for f in dataclasses.fields(cfg_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        row = (f.name, _type_name(hints.get(f.name, f.type)), _value(default), comments.get(f.name, ""))
        (common if f.name in shared else own).append(row)
    return own, common


def options_markdown(name: str) -> str:
    """The generated section of strategy `name`'s page."""
    cls = strategies()[name]
    cfg_cls = cls.Config
    own, common = _config_rows(cfg_cls)
    out = ["## Options", "",
           f"Generated from `{cfg_cls.__module__}.{cfg_cls.__qualname__}`. Set any of them with "
           f"`--set key=value` (or a YAML file with `--config`); values are converted to the field's type "
           f"and checked before training.", ""]
    if own:
        out += ["| option | type | default | note |", "|---|---|---|---|"]
        out += [f"| `{n}` | `{_cell(t)}` | `{_cell(d)}` | {_cell(c)} |" for n, t, d, c in own]
    else:
        out += ["No options of its own beyond the shared optimiser settings below."]
    out += ["", "Shared optimiser settings, with this method's defaults:", "",
            "| option | type | default |", "|---|---|---|"]
    out += [f"| `{n}` | `{_cell(t)}` | `{_cell(d)}` |" for n, t, d, _ in common]
    out += ["", "## Published settings (`--paper-settings`)", ""]
    settings = getattr(cls, "PAPER_SETTINGS", {}) or {}
    if settings:
        out += [f"Generated from `{cls.__module__}.{cls.__qualname__}.PAPER_SETTINGS`. "
                "`clbench run --strategy " + name + " --scenario SCENARIO --paper-settings` applies them "
                "(a strategy `Config`'s defaults < its `DEFAULTS` < `--paper-settings` < `--config` < `--set` < "
                "flags; see [protocols](../protocols.md)).", "",
                "| scenario | settings |", "|---|---|"]
        for scenario, values in settings.items():
            cells = ", ".join(f"`{k}={_value(v)}`" for k, v in values.items())
            out.append(f"| `{scenario}` | {_cell(cells)} |")
    else:
        out += ["None: this method has no published settings in clbench, so `--paper-settings` is a usage error."]
    return "\n".join(out + published_markdown(cls)) + "\n"


def published_markdown(cls) -> list[str]:
    """The section on the numbers the method's paper reports (its own `PUBLISHED`, never a base class's)."""
    if not getattr(cls, "PAPER_SETTINGS", None):
        return []
    published = vars(cls).get("PUBLISHED") or {}
    out = ["", "## Published numbers", ""]
    if not published:
        return out + ["None declared: no result table of the paper could be read, so a `--paper-settings` run of "
                      "this method has no number to reproduce."]
    out += [f"Generated from `{cls.__module__}.{cls.__qualname__}.PUBLISHED`: what a `--paper-settings` run "
            "should reproduce; the run stores it in its result (`published`) and the leaderboard lists it under "
            "the scenario's table beside the measured mean.", "",
            "| scenario | metric | published | source | note |", "|---|---|---|---|---|"]
    for scenario, p in published.items():
        out.append(f"| `{scenario}` | `{p['metric']}` | {100 * p['value']:.2f}% | {_cell(p['source'])} | "
                   f"{_cell(p.get('note', ''))} |")
    return out


def methods_table() -> str:
    from clbench.registry import STRATEGIES

    described = STRATEGIES.describe()
    out = ["| method | task | what it is |", "|---|---|---|"]
    for name, cls in strategies().items():
        out.append(f"| [`{name}`]({name}.md) | {cls.task_type} | {_cell(described.get(name, ''))} |")
    return "\n".join(out) + "\n"


def missing_pages(docs: Path = DOCS) -> list[str]:
    """Registered strategies without `docs/strategies/<name>.md` holding their options marker."""
    out = []
    for name in strategies():
        page = docs / "strategies" / f"{name}.md"
        if not page.exists() or f"<!-- clbench:options {name} -->" not in page.read_text(encoding="utf-8"):
            out.append(name)
    return out


# ---------------------------------------------------------------------- MkDocs hook
def on_config(config, **kwargs):
    missing = missing_pages(Path(config["docs_dir"]))
    if missing:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"no method page with its options marker for: {', '.join(missing)} "
                          f"(add docs/strategies/<name>.md holding '<!-- clbench:options <name> -->')")
    return config


def readme_block(name: str, readme: Path = ROOT / "README.md") -> str:
    text = readme.read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"README.md has no generated block {name!r} ({begin} ... {end})")
    return text.split(begin, 1)[1].split(end, 1)[0].strip() + "\n"


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    if METHODS_TABLE in markdown:
        markdown = markdown.replace(METHODS_TABLE, methods_table())
    markdown = README_BLOCK.sub(lambda m: readme_block(m.group(1)), markdown)

    def replace(m: re.Match) -> str:
        name = m.group(1)
        if name not in strategies():
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{page.file.src_uri}: {name!r} is not a registered strategy")
        return options_markdown(name)

    return OPTIONS.sub(replace, markdown)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args == ["--list"]:
        print(methods_table())
    else:
        for arg in args:
            print(options_markdown(arg))
