"""`python -m hookfn.demo`: its patching and attribution sections run on `hookfn.patching`."""

from __future__ import annotations

import inspect
import re

import pytest

from hookfn.demo import __main__ as demo


def test_demo_uses_the_patching_module() -> None:
    source = inspect.getsource(demo)
    for name in ("activation_patching", "attribution_patching", "agreement"):
        assert f"{name}(" in source, name
    # No hand-written loop of one patched run per cell is left.
    assert "patch_from" not in source


def test_demo_runs_and_localizes_the_answer(capsys: pytest.CaptureFixture[str]) -> None:
    demo.main()
    out = capsys.readouterr().out
    assert "== 5. Activation patching" in out
    assert "== 6. Gradients: attribution patching" in out
    # The embedding carries the answer at the changed binding; the blocks at the last position.
    carried = dict(re.findall(r"after (\S+)\s+the answer is carried at position (\d+)", out))
    assert carried["transformer.h.0"] == carried["transformer.h.1"] == "7"
    assert carried["transformer.wte"] != "7"
    rows = {
        label: [float(v) for v in values.split()]
        for label, values in re.findall(
            r"^  (first-order estimate|integrated, 16 steps|actual patch)\s+(.*)$", out, re.M
        )
    }
    position = int(carried["transformer.wte"])
    actual, integrated, plain = (
        rows[k][position] for k in ("actual patch", "integrated, 16 steps", "first-order estimate")
    )
    # Integrated gradients recover the saturated effect that the plain estimate misses.
    assert abs(integrated - actual) < 0.05 * abs(actual) < abs(plain - actual)
