"""`hookfn.patching` against the hand-written loop and TransformerLens' patching functions.

Two sweeps on transformers GPT-2 models of random weights, one corrupted token in the middle
of the prompt, metric = logit difference of two tokens at the last position:

- *resid*: every block's input (the residual stream) x every position;
- *heads*: every head of every layer, all positions at once (the input of ``attn.c_proj``).

Side by side, in rounds that run each way in turn (the median of each), with equal results
asserted: the raw loop (one forward per cell, ``register_forward_pre_hook``), TransformerLens'
``get_act_patch_resid_pre`` / ``get_act_patch_attn_head_out_all_pos`` on a `TransformerBridge`
of the same weights, `activation_patching` (with its default reuse, and with position reuse
only, ``reuse="positions"``, as it ran before layer reuse), and (resid) `attribution_patching`,
which estimates the same grid from two forwards and one backward. A memory case runs the resid
sweep under a ``memory=`` budget and records the peak.

`anchor_row` is the resid sweep in the form ``/work/shared/bench/patching_anchors.py --row``
takes (``cd benchmarks && python patching_anchors.py --row test_bench_patching:anchor_row``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from time import perf_counter
from typing import Any

import pytest
import torch
from bench_common import torch_cpu_memory
from torch import Tensor, nn

from hookfn.patching import (
    activation_patching,
    attribution_patching,
    each_head,
    each_position,
    head_out,
    logit_diff,
    resid_pre,
)

RIGHT, WRONG = 3, 5

# model: (n_layer, width, heads, vocab, seq, timing rounds, quick)
MODELS = {
    "patching-tiny": (4, 64, 4, 512, 16, 5, True),
    "patching-small": (12, 768, 12, 50257, 32, 3, False),
}


@dataclass(frozen=True)
class Setup:
    description: str
    model: nn.Module
    clean: Tensor
    corrupted: Tensor
    rounds: int


@cache
def setup(key: str) -> Setup:
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, width, heads, vocab, seq, rounds, _ = MODELS[key]
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=width,
        n_head=heads,
        vocab_size=vocab,
        n_positions=max(64, seq),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(3)
    clean = torch.randint(1, vocab, (1, seq), generator=generator)
    corrupted = clean.clone()
    corrupted[0, seq // 2] = (corrupted[0, seq // 2] + 7) % vocab
    description = (
        f"GPT-2, {n_layer} layers, width {width}, {heads} heads, vocab {vocab}, seq {seq}; "
        f"one corrupted position ({seq // 2})"
    )
    return Setup(description, model, clean, corrupted, rounds)


@cache
def bridge(key: str) -> Any:
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    inner = copy.deepcopy(setup(key).model)
    return build_bridge_from_module(inner, "GPT2LMHeadModel", hf_config=inner.config).eval()


# -- the hand-written loop: one forward per cell ---------------------------------------------


def _difference(logits: Tensor) -> Tensor:
    return logits[0, -1, RIGHT] - logits[0, -1, WRONG]


def _record_inputs(modules: list[nn.Module], model: nn.Module, ids: Tensor) -> list[Tensor]:
    kept: dict[int, Tensor] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda _, args, i=i: kept.__setitem__(i, args[0].clone())  # type: ignore[misc]
        )
        for i, module in enumerate(modules)
    ]
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return [kept[i] for i in range(len(modules))]


def _loop(
    model: Any, modules: list[nn.Module], clean: Tensor, corrupted: Tensor, parts: list[Any]
) -> Tensor:
    """``[layers, parts]``: each module's input patched at ``index`` from the clean run."""
    source = _record_inputs(modules, model, clean)
    out = torch.empty(len(modules), len(parts))
    for layer, module in enumerate(modules):
        for j, index in enumerate(parts):

            def patch(_: nn.Module, args: Any, layer: int = layer, index: Any = index) -> Any:
                x = args[0].clone()
                x[index] = source[layer][index]
                return (x, *args[1:])

            handle = module.register_forward_pre_hook(patch)
            try:
                out[layer, j] = _difference(model(corrupted).logits)
            finally:
                handle.remove()
    return out


def loop_resid(s: Setup) -> Tensor:
    seq = s.clean.shape[1]
    parts = [(slice(None), p) for p in range(seq)]
    return _loop(s.model, list(s.model.transformer.h), s.clean, s.corrupted, parts)


def loop_heads(s: Setup) -> Tensor:
    heads, width = s.model.config.n_head, s.model.config.n_embd
    d_head = width // heads
    parts = [(..., slice(h * d_head, (h + 1) * d_head)) for h in range(heads)]
    projections = [block.attn.c_proj for block in s.model.transformer.h]
    return _loop(s.model, projections, s.clean, s.corrupted, parts)


# -- the other ways --------------------------------------------------------------------------


def _lens(function_name: str, key: str) -> Tensor:
    from transformer_lens import patching

    s, model = setup(key), bridge(key)
    _, clean_cache = model.run_with_cache(s.clean)
    # TransformerLens draws a progress bar per sweep: keep it off the benchmark output.
    with contextlib.redirect_stderr(io.StringIO()):
        result: Tensor = getattr(patching, function_name)(
            model, s.corrupted, clean_cache, _difference
        )
    return result


def ours(key: str, sweep: str, reuse: Any = "auto") -> Tensor:
    s = setup(key)
    sites, over = (resid_pre, each_position()) if sweep == "resid" else (head_out, each_head())
    result = activation_patching(
        s.model,
        s.clean,
        s.corrupted,
        sites(s.model),
        over=over,
        metric=logit_diff(RIGHT, WRONG),
        reuse=reuse,
    )
    return result.values


def anchor_row(model: nn.Module, clean: Tensor, corrupted: Tensor) -> Tensor:
    """The resid sweep as a row of ``patching_anchors.py``: ``[layers, positions]``."""
    with torch.no_grad():
        return activation_patching(
            model,
            clean,
            corrupted,
            resid_pre(model),
            over=each_position(),
            metric=logit_diff(RIGHT, WRONG),
        ).values


def attribution(key: str) -> Tensor:
    s = setup(key)
    result = attribution_patching(
        s.model,
        s.clean,
        s.corrupted,
        resid_pre(s.model),
        over=each_position(),
        metric=logit_diff(RIGHT, WRONG),
    )
    return result.values


def ways(key: str, sweep: str) -> dict[str, Callable[[], Tensor]]:
    s = setup(key)
    if sweep == "resid":
        return {
            "raw loop": lambda: loop_resid(s),
            "TransformerLens": lambda: _lens("get_act_patch_resid_pre", key),
            "hookfn": lambda: ours(key, "resid"),
            "hookfn, position reuse only": lambda: ours(key, "resid", "positions"),
        }
    return {
        "raw loop": lambda: loop_heads(s),
        "TransformerLens": lambda: _lens("get_act_patch_attn_head_out_all_pos", key),
        "hookfn": lambda: ours(key, "heads"),
        "hookfn, position reuse only": lambda: ours(key, "heads", "positions"),
    }


def medians(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Each function's median time over ``rounds`` rounds that run every one in turn."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = perf_counter()
            fns[name]()
            times[name].append(perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _rows() -> list[Any]:
    rows = []
    for key, (*_, quick) in MODELS.items():
        marks = [pytest.mark.quick] if quick else [pytest.mark.slow]
        for sweep in ("resid", "heads"):
            rows.append(
                pytest.param(key, sweep, id=f"{key.removeprefix('patching-')}-{sweep}", marks=marks)
            )
    return rows


@pytest.mark.parametrize(("model", "sweep"), _rows())
def test_patching_sweep(benchmark: Any, model: str, sweep: str) -> None:
    pytest.importorskip("transformer_lens.model_bridge.sources")
    s = setup(model)
    fns = ways(model, sweep)
    if sweep == "resid":
        fns["attribution patching"] = lambda: attribution(model)
    benchmark.group = f"{model}-{sweep}"
    benchmark.extra_info.update(
        suite="patching",
        model=model,
        description=s.description,
        case=sweep,
        impl="hookfn",
        cells=int(
            s.model.config.n_layer
            * (s.clean.shape[1] if sweep == "resid" else s.model.config.n_head)
        ),
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = fns["raw loop"]()
        for name, fn in fns.items():
            if name not in ("raw loop", "attribution patching"):
                got = fn().reshape(want.shape).float()
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=name)
        assert want.max() - want.min() > 1e-3, "the patches have no effect"
        result = benchmark.pedantic(fns["hookfn"], rounds=1 if model == "patching-small" else 3)
        torch.testing.assert_close(result, want, atol=1e-4, rtol=0)
    if "attribution patching" in fns:
        estimate = fns["attribution patching"]()
        assert estimate.shape == want.shape
        assert torch.isfinite(estimate).all()
    if benchmark.enabled:
        timed = {}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = {k: v for k, v in fns.items() if k != "attribution patching"}
            timed = medians(exact, s.rounds)
        if "attribution patching" in fns:
            timed.update(medians({"attribution patching": fns["attribution patching"]}, s.rounds))
        benchmark.extra_info["medians"] = timed


@pytest.mark.quick
@pytest.mark.parametrize("budget_mb", [2, 8])
def test_patching_memory_budget(benchmark: Any, budget_mb: int) -> None:
    """A sweep under ``memory=`` keeps each patched forward's peak within the budget.

    The budget sets the rows per forward from a measured forward (under the torch profiler,
    which does not nest): the rows it picked are read off the last block's calls (with layer
    reuse, the earlier blocks run on fewer), then a sweep of that many rows per forward is
    profiled.
    """
    s = setup("patching-tiny")
    budget = budget_mb * 2**20

    def sweep(**sizes: Any) -> Tensor:
        with torch.no_grad():
            return activation_patching(
                s.model,
                s.clean,
                s.corrupted,
                resid_pre(s.model),
                over=each_position(),
                metric=logit_diff(RIGHT, WRONG),
                causal=False,
                **sizes,
            ).values

    rows: list[int] = []
    handle = s.model.transformer.h[-1].register_forward_pre_hook(
        lambda _, args: rows.append(int(args[0].shape[0]))  # type: ignore[func-returns-value]
    )
    try:
        values = sweep(memory=budget)
    finally:
        handle.remove()
    patched_rows = max(rows[2:])  # after the clean and the corrupted run
    peak, _, again = torch_cpu_memory(lambda: sweep(batch_size=patched_rows))
    bare, _, _ = torch_cpu_memory(lambda: sweep(batch_size=1))
    with torch.no_grad():
        torch.testing.assert_close(values, loop_resid(s), atol=1e-4, rtol=0)
    torch.testing.assert_close(again, values, atol=1e-5, rtol=0)
    benchmark.group = "patching-memory"
    benchmark.extra_info.update(
        suite="patching-memory",
        model="patching-tiny",
        case=f"resid, memory={budget_mb}MiB",
        impl="hookfn",
        budget=budget,
        rows=patched_rows,
        peak=peak,
        peak_one_row=bare,
    )
    benchmark.pedantic(sweep, kwargs={"memory": budget}, rounds=1)
    assert patched_rows > 1, "the budget allows more than one row per forward"
    assert peak <= budget, f"peak {peak} bytes over the budget of {budget}"
