"""Rewrite README.md's recipe reference from the schema (kdcli.recipe.reference_markdown).

    python docs/update_reference.py

The reference sits between the markers below; everything else in the README is left as it is.
tests/test_recipe.py fails when the two drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kdcli.recipe import reference_markdown

START = "<!-- recipe-reference:start -->"
END = "<!-- recipe-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def render(readme: str) -> str:
    """The README text with the section between the markers replaced by the current reference."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"README.md needs the markers {START} and {END}")
    return f"{head}{START}\n\n{reference_markdown()}\n{END}{tail}"


def main() -> int:
    text = README.read_text(encoding="utf-8")
    updated = render(text)
    if updated == text:
        print("README.md: recipe reference already current")
    else:
        README.write_text(updated, encoding="utf-8")
        print("README.md: recipe reference updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
