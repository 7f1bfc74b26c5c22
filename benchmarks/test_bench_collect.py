"""`collect` against a hand-written raw-hook loop: the last-token residual of every block
over a dataset, into preallocated CPU outputs.

The raw loop is the best a user writes by hand: forward hooks on the blocks that copy the
last token of each row into preallocated tensors, and a call of the base model
(``model.transformer``: no language-model head, whose logits `collect` does not compute
either, as it stops after the last block). Reported: throughput (rows per second) and the
peak of torch's CPU allocations of each (on the first 4 batches), and their ratios (hookfn /
raw); TransformerLens's `run_with_cache` on a bridge of the same weights, stacked by hand, is
measured beside them where it is installed. The asserts
catch gross regressions only (the goals, throughput >= 0.95x and peak memory <= 1.2x, are
reported, not timed tests).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from bench_common import torch_cpu_memory
from torch import Tensor, nn

from hookfn import collect

# (id, n_layer, width, heads, vocab, n_rows, seq, batch_size, rounds, marks)
CASES = [
    ("tiny", 2, 64, 4, 512, 128, 16, 16, 5, [pytest.mark.quick]),
    ("gpt2-small", 12, 768, 12, 50257, 1000, 64, 32, 1, [pytest.mark.slow]),
]


def _model(n_layer: int, width: int, heads: int, vocab: int, seq: int) -> nn.Module:
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=width, n_head=heads, vocab_size=vocab,
        n_positions=max(64, seq), bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def _batches(vocab: int, n_rows: int, seq: int, batch_size: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, n_rows, batch_size):
        rows = min(batch_size, n_rows - start)
        ids = torch.randint(0, vocab, (rows, seq), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def _raw_loop(model: nn.Module, batches: list[dict[str, Tensor]], n_rows: int) -> list[Tensor]:
    blocks = list(model.transformer.h)  # type: ignore[union-attr]
    width = model.config.n_embd  # type: ignore[union-attr]
    out = [torch.empty(n_rows, width) for _ in blocks]
    where = {"start": 0, "index": torch.zeros(0, dtype=torch.long)}

    def hook_for(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            x = output[0] if isinstance(output, tuple) else output
            rows = x.shape[0]
            start = int(where["start"])
            index = where["index"]
            out[i][start : start + rows].copy_(x[torch.arange(rows), index])

        return hook

    handles = [block.register_forward_hook(hook_for(i)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"]
                real = mask != 0
                where["index"] = real.shape[1] - 1 - real.flip(1).to(torch.uint8).argmax(1)
                model.transformer(**batch)  # type: ignore[operator]
                where["start"] = int(where["start"]) + mask.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return out


def _bridge(model: nn.Module) -> Any:
    """A TransformerLens bridge around a copy of ``model`` (the same weights); None where
    TransformerLens is not installed."""
    try:
        from transformer_lens.model_bridge.sources._bridge_builder import (
            build_bridge_from_module,
        )
    except ImportError:
        return None
    inner = copy.deepcopy(model)
    return build_bridge_from_module(inner, "GPT2LMHeadModel", hf_config=inner.config).eval()


def _lens(bridge: Any, batches: list[dict[str, Tensor]], n_rows: int, n_layer: int) -> list[Tensor]:
    """TransformerLens' `run_with_cache` per batch, the last tokens stacked by hand."""
    names = [f"blocks.{i}.hook_resid_post" for i in range(n_layer)]
    out: list[list[Tensor]] = [[] for _ in names]
    with torch.no_grad():
        for batch in batches:
            _, cache = bridge.run_with_cache(batch["input_ids"], names_filter=names)
            for i, name in enumerate(names):
                out[i].append(cache[name][:, -1].clone())
            del cache
    return [torch.cat(rows) for rows in out]


def _hookfn(model: nn.Module, batches: list[dict[str, Tensor]], n_layer: int) -> list[Tensor]:
    names = [f"transformer.h.{i}" for i in range(n_layer)]
    result = collect(model, batches, names, part="last")
    return [result[name] for name in names]


@pytest.mark.parametrize(
    ("n_layer", "width", "heads", "vocab", "n_rows", "seq", "batch_size", "rounds"),
    [pytest.param(*case[1:-1], id=case[0], marks=case[-1]) for case in CASES],
)
def test_collect_vs_raw_loop(
    benchmark: Any,
    n_layer: int,
    width: int,
    heads: int,
    vocab: int,
    n_rows: int,
    seq: int,
    batch_size: int,
    rounds: int,
) -> None:
    model = _model(n_layer, width, heads, vocab, seq)
    batches = _batches(vocab, n_rows, seq, batch_size)
    raw = lambda: _raw_loop(model, batches, n_rows)  # noqa: E731
    ours = lambda: _hookfn(model, batches, n_layer)  # noqa: E731

    bridge = _bridge(model)
    fns: dict[str, Callable[[], list[Tensor]]] = {"raw": raw, "hookfn": ours}
    if bridge is not None:
        fns["lens"] = lambda: _lens(bridge, batches, n_rows, n_layer)
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, list[Tensor]] = {}
    for _ in range(rounds):  # interleaved, so drifts of the machine hit each alike
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    # The same rows.
    for other in results:
        for a, b in zip(results["raw"], results[other], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    median = {name: statistics.median(values) for name, values in times.items()}
    # Peak memory on at most 4 batches: the profiler that counts allocations slows a long
    # run many times over, and the peak (one forward's activations + what is kept) scales the
    # same for each way.
    few = batches[:4]
    few_rows = sum(len(batch["input_ids"]) for batch in few)
    measured: dict[str, Callable[[], list[Tensor]]] = {
        "raw": lambda: _raw_loop(model, few, few_rows),
        "hookfn": lambda: _hookfn(model, few, n_layer),
    }
    if bridge is not None:
        measured["lens"] = lambda: _lens(bridge, few, few_rows, n_layer)
    peak = {name: torch_cpu_memory(fn)[0] for name, fn in measured.items()}
    raw_time, our_time = median["raw"], median["hookfn"]
    raw_peak, our_peak = peak["raw"], peak["hookfn"]
    kept = n_layer * few_rows * width * 4
    throughput_ratio = raw_time / our_time
    memory_ratio = our_peak / raw_peak
    benchmark.group = "collect"
    benchmark.extra_info.update(
        collect_case=f"{n_layer}x{width}, {n_rows} rows of {seq}, batches of {batch_size}",
        memory_rows=few_rows,
        raw_rows_per_s=n_rows / raw_time,
        hookfn_rows_per_s=n_rows / our_time,
        throughput_ratio=throughput_ratio,
        raw_peak_bytes=raw_peak,
        hookfn_peak_bytes=our_peak,
        kept_bytes=kept,
        memory_ratio=memory_ratio,
    )
    lens = ""
    if "lens" in fns:
        benchmark.extra_info.update(
            lens_rows_per_s=n_rows / median["lens"], lens_peak_bytes=peak["lens"]
        )
        lens = (
            f"; TransformerLens run_with_cache {n_rows / median['lens']:.0f} rows/s, peak "
            f"{peak['lens'] / 2**20:.1f} MiB"
        )
    benchmark.pedantic(ours, rounds=1, iterations=1)
    print(
        f"\ncollect {n_layer}x{width}: throughput {throughput_ratio:.2f}x the raw loop "
        f"({n_rows / our_time:.0f} vs {n_rows / raw_time:.0f} rows/s); peak memory "
        f"{memory_ratio:.2f}x ({our_peak / 2**20:.1f} vs {raw_peak / 2**20:.1f} MiB; "
        f"kept {kept / 2**20:.1f} MiB, on {few_rows} rows){lens}"
    )
    # Gross regressions only: the goals (0.95x, 1.2x) are reported above.
    assert throughput_ratio > 0.5
    assert memory_ratio < 2.0
