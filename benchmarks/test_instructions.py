"""The instruction-count script's parsing and its refusal without valgrind (the counting
itself needs valgrind: `python benchmarks/instructions.py`)."""

from __future__ import annotations

from pathlib import Path

import instructions
import pytest


def _dump(folder: Path, n: int, label: str, total: int) -> None:
    # What callgrind writes for CALLGRIND_DUMP_STATS_AT(label): "summary" reads 0 there.
    (folder / f"cg.out.{n}").write_text(
        f"version: 1\ndesc: Trigger: Client Request: {label}\nevents: Ir\nsummary: 0\n"
        f"fn=(1) f\n1 {total}\ntotals: {total}\n"
    )


@pytest.mark.quick
def test_counts_per_call_by_case(tmp_path: Path) -> None:
    for n, label in enumerate(instructions.CASES):
        _dump(tmp_path, n, label, 1000 * (n + 1))
    _dump(tmp_path, 99, "unrelated", 5)
    counts = instructions._counts(tmp_path, calls=10)
    assert counts == {label: 100.0 * (n + 1) for n, label in enumerate(instructions.CASES)}


@pytest.mark.quick
def test_refuses_without_valgrind(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(instructions.shutil, "which", lambda tool: None)
    assert instructions.main([]) == 2
    assert "valgrind" in capsys.readouterr().err
