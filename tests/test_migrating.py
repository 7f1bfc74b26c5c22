"""The nnsight side of docs/migrating-from-nnsight.md runs, and agrees with hookfn's side.

`tests/test_docs.py` skips those blocks (marked ``<!-- no-run: nnsight ... -->``): nnsight
re-reads the source of each ``with model.trace(...)`` block through `linecache`, which code
run by ``exec`` lacks. Here every block of the page runs in order, with its source
registered in `linecache` under the name it is compiled with.
"""

from __future__ import annotations

import linecache
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "migrating-from-nnsight.md"
BLOCK = re.compile(r"(<!--\s*no-run[^>]*-->\s*\n)?```python\n(.*?)```", re.DOTALL)


def test_nnsight_side_of_the_migration_page_runs() -> None:
    pytest.importorskip("nnsight")
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "docs_migrating_from_nnsight"}
    found = BLOCK.findall(PAGE.read_text())
    assert sum(1 for skip, _ in found if "nnsight" in skip) >= 6
    for i, (_, code) in enumerate(found):
        filename = f"<{PAGE.name} block {i}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            exec(compile(code, filename, "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"{PAGE.name}, block {i} failed:\n{code}") from error
