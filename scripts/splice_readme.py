"""Replace a generated block between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in a Markdown file.

The README holds the headline results (`leaderboard`); the other tables live in the docs pages
they belong to (`detection` in docs/detection.md, `forecasting` in docs/forecasting.md,
`distillation` and `quantization` in docs/addons.md). The Makefile's table targets call it.

    python scripts/splice_readme.py README.md leaderboard GENERATED.md
    python scripts/splice_readme.py docs/detection.md detection GENERATED.md
"""

import sys
from pathlib import Path


def splice(readme: Path, name: str, generated: str) -> None:
    """Write `generated` between NAME's markers in the file `readme` (any Markdown file)."""
    text = readme.read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        sys.exit(f"splice_readme: markers {begin} ... {end} not found in {readme}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{generated.strip()}\n{end}{tail}", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: splice_readme.py FILE.md NAME GENERATED.md")
    readme, name, generated = sys.argv[1:4]
    splice(Path(readme), name, Path(generated).read_text(encoding="utf-8"))
