"""Activation-patching sweeps: hookfn against a hand-written loop with raw torch hooks.

A sweep takes a clean cache of every block output, then runs the corrupted input once per
layer (and, for the tiny model, once per (layer, position)) with that block's output, or one
position of it, patched from the clean cache, and records a logit difference.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_common import (
    get_bench,
    interleaved,
    metric,
    sweep_hookfn,
    sweep_raw,
    sweep_transformer_lens,
)

import hookfn

# (model, per_position, rounds or None for the command-line settings, quick, implementations)
SWEEPS = [
    ("tiny", False, None, False, ("raw", "hookfn")),
    ("tiny", True, None, True, ("raw", "hookfn")),
    ("small", False, 3, False, ("raw", "hookfn")),
    # TransformerLens' own way, on its TransformerBridge (where TransformerLens is installed).
    ("bridge", True, None, True, ("raw", "hookfn", "transformer_lens")),
]

_RESULTS: dict[tuple[str, bool], torch.Tensor] = {}


def _reference(model: str, per_position: bool) -> torch.Tensor:
    key = (model, per_position)
    if key not in _RESULTS:
        with torch.no_grad():
            _RESULTS[key] = sweep_raw(get_bench(model), per_position)
    return _RESULTS[key]


def _rows() -> list[Any]:
    rows = []
    for model, per_position, rounds, quick, impls in SWEEPS:
        what = "layer_position" if per_position else "layer"
        for impl in impls:
            marks = [pytest.mark.quick] if quick else []
            rows.append(
                pytest.param(
                    model, per_position, rounds, impl, id=f"{model}-{what}-{impl}", marks=marks
                )
            )
    return rows


SWEEP_IMPLS = {"raw": sweep_raw, "hookfn": sweep_hookfn, "transformer_lens": sweep_transformer_lens}


@pytest.mark.parametrize(("model", "per_position", "rounds", "impl"), _rows())
def test_sweep(
    benchmark: Any,
    pair_time: float,
    model: str,
    per_position: bool,
    rounds: int | None,
    impl: str,
) -> None:
    if model == "bridge":
        pytest.importorskip(
            "transformer_lens",
            reason="TransformerLens is not installed (it is no dependency of hookfn)",
        )
    bench = get_bench(model)
    sweep = SWEEP_IMPLS[impl]
    benchmark.group = f"sweep-{model}-{'layer_position' if per_position else 'layer'}"
    n_runs = bench.n_layers * (bench.x.shape[1] if per_position else 1)
    benchmark.extra_info.update(
        suite="sweep",
        model=model,
        description=bench.description,
        case="layer_position" if per_position else "layer",
        impl=impl,
        n_runs=n_runs + 1,  # the patched runs and the clean one
        edit="patch_from" if hasattr(hookfn, "patch_from") else "lambda",
    )
    with torch.no_grad():
        if rounds is None:
            result = benchmark(sweep, bench, per_position)
        else:
            result = benchmark.pedantic(sweep, (bench, per_position), rounds=rounds, iterations=1)
        if benchmark.enabled and impl != "raw" and rounds is None:
            # The raw loop and this sweep in turn, in the same rounds (see interleaved): the
            # speed-up the report gives, free of the load drift between benchmarks.
            timed = interleaved(
                {
                    "raw": lambda: sweep_raw(bench, per_position),
                    impl: lambda: sweep(bench, per_position),
                },
                pair_time,
            )
            benchmark.extra_info["paired_vs_raw"] = timed[impl]
    # The sweep computes what the hand-written loop computes ...
    torch.testing.assert_close(result, _reference(model, per_position))
    with torch.no_grad():
        clean = metric(bench.model(bench.x), bench.target)
        corrupt = metric(bench.model(bench.corrupt_x), bench.target)
    assert not torch.isclose(clean, corrupt)
    if per_position:
        # ... and which position is patched matters.
        assert result.max() > result.min()
    else:
        # ... and a block's whole output is the residual stream: patching it restores the
        # clean run, whichever layer it is.
        torch.testing.assert_close(result, clean.expand_as(result))
