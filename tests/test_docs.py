"""Every ```python block of the README and the docs runs, in order, one namespace per page.

A block preceded by an ``<!-- no-run ... -->`` comment is an illustration and is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!--\s*no-run[^>]*-->\s*\n)?```python\n(.*?)```", re.DOTALL)


def blocks(page: Path) -> list[str]:
    return [code for skip, code in BLOCK.findall(page.read_text()) if not skip]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_examples_run(page: Path) -> None:
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks(page)):
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.name}, block {i} failed:\n{code}") from error


def test_pages_have_examples() -> None:
    # The guide pages teach by example: each must hold at least one runnable block.
    for name in ("index.md", "concepts.md"):
        assert blocks(ROOT / "docs" / name), name
