"""Replace the README's generated block between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.

    python scripts/splice_readme.py README.md leaderboard GENERATED.md
"""

import sys
from pathlib import Path


def splice(readme: Path, name: str, generated: str) -> None:
    text = readme.read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        sys.exit(f"splice_readme: markers {begin} ... {end} not found in {readme}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{generated.strip()}\n{end}{tail}", encoding="utf-8")


if __name__ == "__main__":
    readme, name, generated = sys.argv[1:4]
    splice(Path(readme), name, Path(generated).read_text(encoding="utf-8"))
