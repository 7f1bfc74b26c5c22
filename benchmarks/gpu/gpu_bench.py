"""The figures of the GPU check (``gpu_check.py``): each a ratio against its baseline, one run.

Every figure times hookfn and a hand-written baseline doing the same work in the same rounds,
in turn (the order rotates from round to round), on one model and input, and keeps the
medians. On CUDA a call is timed with CUDA events, after a ``torch.cuda.synchronize()`` that
empties the queue first: the time runs from the call's start to the end of its last kernel,
so it counts the host's work (Python, hook calls, launches) as well as the GPU's. On CPU (the
wiring mode, where no CUDA device is found) ``time.perf_counter`` times the same functions.

The model is a GPT-2-shaped ``transformers.GPT2LMHeadModel`` with seeded random weights; its
size, dtype and input come from a `Sizes` (`CUDA_SIZES`: GPT-2-small in bf16, batch 8, seq
128; `CPU_SIZES`: a tiny float32 model). Each figure first checks that hookfn computes what
the baseline computes; a figure whose check fails carries ``"error"`` instead of a result.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_common

from bench_common import (
    Bench,
    implementations,
    logits,
    n_hooked,
    raw_hooks,
    tensor_bytes,
    torch_cpu_memory,
)

import hookfn
from hookfn import ablate, add, patch_from, run_with_hooks

SEED = 0


@dataclass(frozen=True)
class Sizes:
    """The model, its input and how long each figure is timed."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    batch: int
    seq: int
    dtype: torch.dtype
    device: str
    pair_time: float  # seconds of timed rounds per overhead figure
    min_rounds: int  # ... and at least this many rounds
    sweep_rounds: int  # timed rounds of the patching sweeps (after one untimed run each)
    collect_batches: int  # batches of the activation-collection memory figure

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"GPT-2 shape, {self.n_layer} layers, width {self.n_embd}, {self.n_head} heads, "
            f"vocab {self.vocab}, {dtype}, batch {self.batch} x seq {self.seq}, on {self.device}"
        )


CUDA_SIZES = Sizes(
    n_layer=12,
    n_embd=768,
    n_head=12,
    vocab=50257,
    batch=8,
    seq=128,
    dtype=torch.bfloat16,
    device="cuda",
    pair_time=4.0,
    min_rounds=20,
    sweep_rounds=2,
    collect_batches=8,
)
CPU_SIZES = Sizes(
    n_layer=2,
    n_embd=32,
    n_head=4,
    vocab=100,
    batch=2,
    seq=8,
    dtype=torch.float32,
    device="cpu",
    pair_time=0.1,
    min_rounds=3,
    sweep_rounds=1,
    collect_batches=2,
)


def build(sizes: Sizes) -> Bench:
    """The seeded model (built on the CPU, then moved), its inputs and per-block deltas."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=sizes.n_layer,
        n_embd=sizes.n_embd,
        n_head=sizes.n_head,
        vocab_size=sizes.vocab,
        n_positions=max(64, sizes.seq),
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config).to(sizes.device, sizes.dtype).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), generator=generator)
    corrupt = x.clone()
    n_corrupt = max(1, sizes.seq // 4)
    corrupt[:, :n_corrupt] = torch.randint(
        0, sizes.vocab, (sizes.batch, n_corrupt), generator=generator
    )
    blocks = [(f"transformer.h.{i}", block) for i, block in enumerate(model.transformer.h)]
    bench = Bench(
        "gpt2",
        sizes.describe(),
        model,
        x.to(sizes.device),
        corrupt.to(sizes.device),
        blocks,
        target=(1, 2),
    )
    bench.deltas = {
        name: torch.randn(1, sizes.seq, sizes.n_embd, generator=generator).to(
            sizes.device, sizes.dtype
        )
        for name in bench.names
    }
    return bench


def on_cuda(bench: Bench) -> bool:
    return bench.x.device.type == "cuda"


# -- timing ------------------------------------------------------------------------------


def _time_round(calls: list[tuple[str, Callable[[], Any]]], cuda: bool) -> dict[str, float]:
    """Seconds of each call, run in the order given."""
    if not cuda:
        times = {}
        for name, fn in calls:
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        return times
    events = []
    for name, fn in calls:
        torch.cuda.synchronize()  # an empty queue: the call's own time, host work included
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        start_event.record()
        fn()
        end_event.record()
        events.append((name, start_event, end_event))
    torch.cuda.synchronize()
    return {name: start.elapsed_time(end) / 1e3 for name, start, end in events}


def paired(
    fns: dict[str, Callable[[], Any]],
    *,
    budget_s: float,
    min_rounds: int,
    cuda: bool,
    warmup: int = 1,
    max_rounds: int = 5000,
) -> dict[str, dict[str, float]]:
    """Time the functions in turn, round after round, for ``budget_s`` (at least ``min_rounds``).

    The first function is the baseline. Returns ``{name: {"rounds", "median", "diff_median",
    "diff_se"}}``: the median time, and the median over rounds of the time minus the
    baseline's in the same round, with its standard error (from the IQR); differences taken
    within a round cancel the drift of the machine's load between rounds.
    """
    names = list(fns)
    for _ in range(warmup):
        _time_round(list(fns.items()), cuda)
    times: dict[str, list[float]] = {name: [] for name in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        rounds = 0
        while rounds < min_rounds or (
            time.perf_counter() - start < budget_s and rounds < max_rounds
        ):
            shift = rounds % len(names)
            order = names[shift:] + names[:shift]
            for name, seconds in _time_round([(n, fns[n]) for n in order], cuda).items():
                times[name].append(seconds)
            rounds += 1
    finally:
        if enabled:
            gc.enable()
    base = times[names[0]]
    result = {}
    for name in names:
        diffs = [t - b for t, b in zip(times[name], base, strict=True)]
        spread = 0.0
        if rounds >= 2:
            quartiles = statistics.quantiles(diffs, n=4)
            spread = 1.253 * ((quartiles[2] - quartiles[0]) / 1.349) / rounds**0.5
        result[name] = {
            "rounds": rounds,
            "median": statistics.median(times[name]),
            "diff_median": statistics.median(diffs),
            "diff_se": spread,
        }
    return result


def _ratio(a: float, a_se: float, b: float, b_se: float) -> tuple[float | None, float | None]:
    """a / b with its standard error (first order); None where either is not above zero."""
    if a <= 0 or b <= 0:
        return None, None
    ratio = a / b
    relative = (a_se / a) ** 2 + (b_se / b) ** 2
    return ratio, abs(ratio) * relative**0.5


# -- checks against the raw hooks --------------------------------------------------------


def _close(actual: Any, expected: Any, what: str) -> None:
    try:
        torch.testing.assert_close(actual, expected)
    except AssertionError as error:
        raise AssertionError(f"{what}: hookfn differs from the raw hooks: {error}") from None


def check_case(bench: Bench, case: str, fns: dict[str, Callable[[], Any]]) -> None:
    """hookfn's output and captures equal the raw hooks' (for the tensors the raw hooks keep)."""
    raw = fns["raw"]() if "raw" in fns else None
    out, caches = fns["hookfn"]()
    if raw is None:
        _close(logits(out), logits(fns["bare"]()), f"{case}: output")
        return
    raw_out, store = raw
    _close(logits(out), logits(raw_out), f"{case}: output")
    for name, value in store.items():
        if isinstance(value, Tensor):
            _close(caches[name].output, value, f"{case}: capture of {name}")


# -- figures -----------------------------------------------------------------------------

CASES = {
    "capture_blocks": "capture every block",
    "capture_all": 'capture every module ("**")',
    "edit_blocks": "edit every block (add a tensor)",
    "edit_capture_blocks": "edit and capture every block",
}


def overhead(bench: Bench, case: str, sizes: Sizes) -> dict[str, Any]:
    """Extra time per hooked module of hookfn and of raw hooks over the bare forward."""
    fns = implementations(bench, case)
    fns.pop("trace_multiple", None)
    n = n_hooked(bench, case)
    with torch.no_grad():
        check_case(bench, case, fns)
        timed = paired(
            fns, budget_s=sizes.pair_time, min_rounds=sizes.min_rounds, cuda=on_cuda(bench)
        )
    raw, ours = timed["raw"], timed["hookfn"]
    ratio, ratio_se = _ratio(
        ours["diff_median"], ours["diff_se"], raw["diff_median"], raw["diff_se"]
    )
    return {
        "case": CASES[case],
        "hooks": n,
        "rounds": raw["rounds"],
        "bare_ms": timed["bare"]["median"] * 1e3,
        "raw_us_per_hook": raw["diff_median"] / n * 1e6,
        "raw_se_us": raw["diff_se"] / n * 1e6,
        "hookfn_us_per_hook": ours["diff_median"] / n * 1e6,
        "hookfn_se_us": ours["diff_se"] / n * 1e6,
        "hookfn_over_raw": ratio,
        "hookfn_over_raw_se": ratio_se,
        "hookfn_vs_bare_pct": ours["diff_median"] / timed["bare"]["median"] * 100,
    }


def count_syncs(fn: Callable[[], Any]) -> int:
    """How many synchronizing CUDA operations ``fn`` calls (torch's sync debug mode, "warn")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def host_syncs(bench: Bench) -> dict[str, Any]:
    """Host synchronizations of one run, after a warm-up run: bare, raw hooks, hookfn specs.

    ``extra``: the most any hookfn run has beyond the bare forward's (the goal is 0).
    """
    if not on_cuda(bench):
        return {"skipped": "no CUDA device (torch.cuda.set_sync_debug_mode needs one)"}
    model, x, names = bench.model, bench.x, bench.names
    _, cache = run_with_hooks(model, bench.corrupt_x, names)
    runs: dict[str, Callable[[], Any]] = {
        "bare": lambda: model(x),
        "raw_capture": implementations(bench, "capture_blocks")["raw"],
        "capture": lambda: run_with_hooks(model, x, names),
        "capture_all": lambda: run_with_hooks(model, x, ["**"]),
        "add": lambda: run_with_hooks(model, x, {n: add(bench.deltas[n]) for n in names}),
        "ablate": lambda: run_with_hooks(model, x, {n: ablate(17) for n in names}),
        "patch_from": lambda: run_with_hooks(model, x, {n: patch_from(cache) for n in names}),
        "patch_from_at": lambda: run_with_hooks(
            model, x, {n: patch_from(cache).at(1) for n in names}
        ),
    }
    counts = {}
    with torch.no_grad():
        for name, fn in runs.items():
            fn()
            torch.cuda.synchronize()
            counts[name] = count_syncs(fn)
            torch.cuda.synchronize()
    hooked = [count for name, count in counts.items() if name not in ("bare", "raw_capture")]
    return {"counts": counts, "extra": max(hooked) - counts["bare"]}


def _hand_loop(bench: Bench) -> Tensor:
    """Activation patching by hand: a clean cache, then one forward per (block, position).

    Every block output's position ``p`` is patched from the clean run in turn; the metric is
    the logit difference of the two target tokens at the last position, averaged over the
    batch. Results stay on the device (no host sync per cell).
    """
    model, seq = bench.model, bench.x.shape[1]
    cache: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable[..., None]:
        def keep(module: nn.Module, args: Any, out: Any) -> None:
            cache[name] = (out if isinstance(out, Tensor) else out[0]).detach().clone()

        return keep

    with raw_hooks([(module, keeper(name)) for name, module in bench.blocks]):
        model(bench.x)
    results = torch.empty(bench.n_layers, seq, device=bench.x.device)
    right, wrong = bench.target
    for i, (name, module) in enumerate(bench.blocks):
        clean = cache[name]
        for p in range(seq):

            def patch(
                module: nn.Module, args: Any, out: Any, p: int = p, clean: Tensor = clean
            ) -> Any:
                first = out if isinstance(out, Tensor) else out[0]
                new = first.clone()
                new[:, p] = clean[:, p]
                return new if isinstance(out, Tensor) else (new, *out[1:])

            handle = module.register_forward_hook(patch)
            try:
                last = logits(model(bench.corrupt_x))[:, -1]
            finally:
                handle.remove()
            results[i, p] = (last[:, right] - last[:, wrong]).float().mean()
    return results


def patching(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """The batched exact sweep against the hand loop, and attribution against the sweep."""
    try:
        from hookfn.patching import (
            activation_patching,
            attribution_patching,
            each_position,
            logit_diff,
        )
    except ImportError as error:
        return {"skipped": f"hookfn.patching.activation_patching is not importable: {error}"}
    model, clean, corrupt = bench.model, bench.x, bench.corrupt_x
    metric = logit_diff(*bench.target)
    sites = "transformer.h.*"

    def batched() -> Tensor:
        result = activation_patching(
            model, clean, corrupt, sites, over=each_position(), metric=metric, progress=False
        )
        return result.values

    def attribution() -> Tensor:
        with torch.enable_grad():
            result = attribution_patching(
                model, clean, corrupt, sites, over=each_position(), metric=metric, progress=False
            )
        return result.values.detach()

    with torch.no_grad():
        # One untimed run each: the warm-up, and the values the sweep is checked with.
        hand = _hand_loop(bench)
        exact = batched()
        estimate = attribution()
        timed = paired(
            {
                "hand_loop": lambda: _hand_loop(bench),
                "batched": batched,
                "attribution": attribution,
            },
            budget_s=0.0,
            min_rounds=sizes.sweep_rounds,
            cuda=on_cuda(bench),
            warmup=0,
        )
    hand_cpu, exact_cpu = hand.float().cpu(), exact.float().cpu()
    if tuple(exact_cpu.shape) != tuple(hand_cpu.shape):
        raise AssertionError(f"sweep shape {tuple(exact.shape)} != hand loop {tuple(hand.shape)}")
    if tuple(estimate.shape) != tuple(exact.shape):
        raise AssertionError(f"attribution shape {tuple(estimate.shape)} != {tuple(exact.shape)}")
    scale = float(hand_cpu.abs().max())
    diff = float((exact_cpu - hand_cpu).abs().max())
    # Batched rows and cached keys/values round differently from single runs in bf16/fp16.
    low = sizes.dtype in (torch.bfloat16, torch.float16)
    tolerance = 0.03 * scale + 0.03 if low else 1e-4 * scale + 1e-5
    if not diff <= tolerance:
        raise AssertionError(
            f"batched sweep differs from the hand loop by {diff:.3g} (tolerance {tolerance:.3g}, "
            f"largest value {scale:.3g})"
        )
    hand_s, batched_s = timed["hand_loop"]["median"], timed["batched"]["median"]
    attribution_s = timed["attribution"]["median"]
    cells = bench.n_layers * bench.x.shape[1]
    return {
        "sweep": f"every block x every position ({cells} cells, {bench.x.shape[0]} pairs)",
        "rounds": timed["batched"]["rounds"],
        "hand_loop_s": hand_s,
        "batched_s": batched_s,
        "attribution_s": attribution_s,
        "batched_speedup": hand_s / batched_s,
        "attribution_speedup_over_batched": batched_s / attribution_s,
        "max_abs_diff_vs_hand_loop": diff,
        "largest_value": scale,
    }


def _measure_memory(fn: Callable[[], Any], cuda: bool) -> tuple[int, int, Any]:
    """(peak, retained, result): bytes above what was allocated before the call."""
    if not cuda:
        return torch_cpu_memory(fn)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    return peak, torch.cuda.memory_allocated() - start, result


def memory(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Peak memory of collecting every block's output over batches, against what is kept.

    Each batch's output is dropped at once; the captures are concatenated per block at the
    end, as a collection script does. ``theoretical`` is blocks x tokens x width x itemsize.
    """
    generator = torch.Generator().manual_seed(2)
    batches = [
        torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), generator=generator).to(
            sizes.device
        )
        for _ in range(sizes.collect_batches)
    ]
    names = bench.names

    def bare() -> None:
        for batch in batches:
            bench.model(batch)

    def raw() -> dict[str, Tensor]:
        acts: dict[str, list[Tensor]] = {name: [] for name in names}

        def keeper(name: str) -> Callable[..., None]:
            def keep(module: nn.Module, args: Any, out: Any) -> None:
                acts[name].append((out if isinstance(out, Tensor) else out[0]).detach().clone())

            return keep

        with raw_hooks([(module, keeper(name)) for name, module in bench.blocks]):
            for batch in batches:
                bench.model(batch)
        return {name: torch.cat(values) for name, values in acts.items()}

    def collect() -> dict[str, Tensor]:
        acts: dict[str, list[Tensor]] = {name: [] for name in names}
        for batch in batches:
            caches = run_with_hooks(bench.model, batch, names)[1]
            for name in names:
                acts[name].append(caches[name].output)
        return {name: torch.cat(values) for name, values in acts.items()}

    cuda = on_cuda(bench)
    rows: dict[str, dict[str, float]] = {}
    results: dict[str, Any] = {}
    with torch.no_grad():
        for impl, fn in (("bare", bare), ("raw", raw), ("hookfn", collect)):
            fn()  # warm-up: allocator pools and lazy initialization
            peak, retained, result = _measure_memory(fn, cuda)
            results[impl] = result
            rows[impl] = {
                "peak_bytes": peak,
                "retained_bytes": retained,
                "kept_bytes": tensor_bytes(result) if result is not None else 0,
            }
            del result
    for name in names:
        _close(results["hookfn"][name], results["raw"][name], f"memory: collection of {name}")
    tokens = sizes.collect_batches * sizes.batch * sizes.seq
    itemsize = torch.empty((), dtype=sizes.dtype).element_size()
    theoretical = bench.n_layers * tokens * sizes.n_embd * itemsize
    kept = rows["hookfn"]["kept_bytes"]
    return {
        "tokens": tokens,
        "rows": rows,
        "theoretical_bytes": theoretical,
        "exact": kept == rows["raw"]["kept_bytes"] == theoretical,
        "hookfn_peak_over_kept": rows["hookfn"]["peak_bytes"] / kept if kept else None,
        "raw_peak_over_kept": rows["raw"]["peak_bytes"] / kept if kept else None,
        "hookfn_peak_minus_raw_bytes": rows["hookfn"]["peak_bytes"] - rows["raw"]["peak_bytes"],
        "how": "torch.cuda.max_memory_allocated" if cuda else "torch profiler (CPU allocator)",
    }


def machine(sizes: Sizes) -> dict[str, Any]:
    """Versions and the device, for the JSON and the docs' table."""
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "hookfn": hookfn.__version__,
        "cpu_count": os.cpu_count(),
        "model": sizes.describe(),
    }
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
    return info


FIGURES: dict[str, Callable[[Bench, Sizes], dict[str, Any]]] = {
    "host_syncs": lambda bench, sizes: host_syncs(bench),
    **{
        case: (lambda bench, sizes, case=case: overhead(bench, case, sizes))  # type: ignore[misc]
        for case in CASES
    },
    "patching": patching,
    "memory": memory,
}
