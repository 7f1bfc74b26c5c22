"""Hook overhead: hookfn against raw ``register_forward_hook`` code and the bare forward pass.

For each model the cases run in a fixed order, with a bare forward pass before the first
case, between cases and after the last one: a case's baseline is the mean of the bare runs
on either side of it, and their difference is the noise of that comparison.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_common import get_bench, implementations, interleaved, logits, n_hooked

# (model, cases, quick): the short CI mode (-m quick) runs the cases named in quick, either
# whole ("case") or one implementation of it ("case/impl").
PLAN: list[tuple[str, list[str], set[str]]] = [
    (
        "mlp12",
        ["capture_blocks", "edit_blocks", "fixed"],
        {"capture_blocks", "edit_blocks", "fixed"},
    ),
    (
        "tiny",
        ["capture_blocks", "edit_blocks", "edit_capture_blocks", "capture_all", "fixed"],
        {"capture_blocks", "edit_blocks", "capture_all", "fixed"},
    ),
    (
        "small",
        ["capture_blocks", "edit_blocks", "capture_all", "fixed"],
        {"capture_blocks/raw", "capture_blocks/hookfn"},
    ),
]


def _rows() -> list[Any]:
    rows = []
    for model, cases, quick in PLAN:
        quick_cases = {entry.split("/")[0] for entry in quick}
        in_quick = [case for case in cases if case in quick_cases]
        slot = 0
        rows.append(_row(model, "bare", "bare", slot, bool(in_quick)))
        for case in cases:
            impls = [impl for impl in implementations_names(case) if impl != "bare"]
            for impl in impls:
                in_mode = case in quick or f"{case}/{impl}" in quick
                rows.append(_row(model, case, impl, slot, in_mode))
            slot += 1
            # The bare run after a case; in the quick mode only where a quick case precedes.
            last_quick = bool(in_quick) and case == in_quick[-1]
            rows.append(_row(model, "bare", "bare", slot, case in quick_cases or last_quick))
    return rows


def implementations_names(case: str) -> list[str]:
    return {
        "capture_blocks": ["bare", "raw", "hookfn", "trace_multiple"],
        "edit_blocks": ["bare", "raw", "hookfn"],
        "edit_capture_blocks": ["bare", "raw", "hookfn"],
        "capture_all": ["bare", "raw", "hookfn"],
        "fixed": ["bare", "hookfn"],
    }[case]


def _row(model: str, case: str, impl: str, slot: int, quick: bool) -> Any:
    marks = [pytest.mark.quick] if quick else []
    name = f"{model}-bare{slot}" if case == "bare" else f"{model}-{case}-{impl}"
    return pytest.param(model, case, impl, slot, id=name, marks=marks)


def _check(model: str, case: str, impl: str, result: Any) -> None:
    """Each implementation must compute what the raw-hook reference computes."""
    bench = get_bench(model)
    reference_case = "capture_blocks" if case == "fixed" else case
    reference = implementations(bench, reference_case)["raw" if case != "fixed" else "bare"]()
    torch.testing.assert_close(logits(result), logits(reference))
    if case in ("fixed", "edit_blocks") or not isinstance(result, tuple):
        return
    # Modules that never ran (a ModuleList) have empty captures and no raw-hook entry.
    got = {name: capture for name, capture in result[1].items() if capture.n_calls}
    expected = reference[1]
    assert sorted(got) == sorted(expected)
    for name, capture in got.items():
        torch.testing.assert_close(capture.raw_output, expected[name])


@pytest.mark.parametrize(("model", "case", "impl", "slot"), _rows())
def test_overhead(
    benchmark: Any, pair_time: float, model: str, case: str, impl: str, slot: int
) -> None:
    bench = get_bench(model)
    fn = implementations(bench, "fixed" if case == "bare" else case)[impl]
    benchmark.group = f"overhead-{model}"
    benchmark.extra_info.update(
        suite="overhead",
        model=model,
        description=bench.description,
        case=case,
        impl=impl,
        slot=slot,
        n_layers=bench.n_layers,
        n_hooked=0 if case == "bare" else n_hooked(bench, case),
    )
    with torch.no_grad():
        result = fn()
        if impl not in ("bare", "raw"):  # raw hooks are the reference
            _check(model, case, impl, result)
        fn()  # warm-up
        benchmark(fn)
        if impl != "bare" and benchmark.enabled:
            # Bare, raw and this implementation in turn, in the same rounds (see interleaved).
            fns = implementations(bench, case)
            turns = {"bare": fns["bare"], impl: fn}
            if impl != "raw" and "raw" in fns:
                turns["raw"] = fns["raw"]
            timed = interleaved(turns, pair_time)
            benchmark.extra_info["paired"] = timed[impl]
            if "raw" in timed and impl != "raw":
                benchmark.extra_info["paired_raw"] = timed["raw"]
