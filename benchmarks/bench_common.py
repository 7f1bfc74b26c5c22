"""Shared pieces of the benchmark suites: models, inputs, and the hand-written baselines.

Every hookfn case has a baseline written with plain ``register_forward_hook`` calls, doing the
same work (the same clones, the same edits), so that the suites compare like with like.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import hookfn
from hookfn import Hook, TraceMultiple, add, run_with_hooks

SEED = 0


@dataclass
class Bench:
    """A model with its input, the names of its blocks, and per-block edit tensors."""

    key: str
    description: str
    model: nn.Module
    x: Tensor
    corrupt_x: Tensor
    blocks: list[tuple[str, nn.Module]]
    deltas: dict[str, Tensor] = field(default_factory=dict)
    target: tuple[int, int] = (0, 1)  # two vocabulary entries for the patching metric

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def modules(self) -> list[tuple[str, nn.Module]]:
        """Every named submodule (what the glob ``"**"`` matches)."""
        return [(name, module) for name, module in self.model.named_modules() if name]


def _gpt2(
    key: str, description: str, n_layer: int, n_embd: int, n_head: int, vocab: int, seq: int
) -> Bench:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(SEED)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=max(64, seq),
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    x = torch.randint(0, vocab, (1, seq))
    corrupt = x.clone()
    corrupt[0, : max(1, seq // 4)] = torch.randint(0, vocab, (max(1, seq // 4),))
    blocks = [(f"transformer.h.{i}", block) for i, block in enumerate(model.transformer.h)]
    bench = Bench(key, description, model, x, corrupt, blocks, target=(1, 2))
    bench.deltas = {name: torch.randn(1, seq, n_embd) for name in bench.names}
    return bench


def _mlp(key: str, n_layer: int, width: int) -> Bench:
    torch.manual_seed(SEED)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(n_layer)]).eval()
    x = torch.randn(1, width)
    corrupt = x + torch.randn(1, width)
    blocks = [(str(i), layer) for i, layer in enumerate(model)]
    description = f"Sequential of {n_layer} Linear({width}, {width}), input (1, {width})"
    bench = Bench(key, description, model, x, corrupt, blocks)
    bench.deltas = {name: torch.randn(1, width) for name in bench.names}
    return bench


def _bridge(key: str, n_layer: int, n_embd: int, n_head: int, vocab: int, seq: int) -> Bench:
    """TransformerLens' `TransformerBridge` of a GPT-2-style model, its hook points as blocks."""
    import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_native)
    from transformer_lens.model_bridge import TransformerBridge

    config = {
        "n_layers": n_layer,
        "d_model": n_embd,
        "n_ctx": max(64, seq),
        "d_head": n_embd // n_head,
        "n_heads": n_head,
        "d_mlp": 4 * n_embd,
        "d_vocab": vocab,
        "act_fn": "gelu",
        "seed": SEED,
    }
    model = TransformerBridge.boot_native(config).eval()
    torch.manual_seed(SEED)
    x = torch.randint(0, vocab, (1, seq))
    corrupt = x.clone()
    corrupt[0, : max(1, seq // 4)] = torch.randint(0, vocab, (max(1, seq // 4),))
    names = [f"blocks.{i}.hook_resid_post" for i in range(n_layer)]
    blocks = [(name, model.get_submodule(name)) for name in names]
    description = (
        f"TransformerLens TransformerBridge (boot_native), {n_layer} layers, width {n_embd}, "
        f"{n_head} heads, vocab {vocab}, seq {seq}; sites: blocks.i.hook_resid_post"
    )
    bench = Bench(key, description, model, x, corrupt, blocks, target=(1, 2))
    bench.deltas = {name: torch.randn(1, seq, n_embd) for name in bench.names}
    return bench


BUILDERS: dict[str, Callable[[], Bench]] = {
    "mlp12": lambda: _mlp("mlp12", 12, 16),
    "tiny": lambda: _gpt2(
        "tiny", "GPT-2, 4 layers, width 64, 4 heads, vocab 512, seq 8", 4, 64, 4, 512, 8
    ),
    "small": lambda: _gpt2(
        "small",
        "GPT-2-small shape: 12 layers, width 768, 12 heads, vocab 50257, seq 32",
        *(12, 768, 12, 50257, 32),
    ),
    "bridge": lambda: _bridge("bridge", 4, 64, 4, 512, 8),
}


@functools.cache
def get_bench(key: str) -> Bench:
    """Build a benchmark model once per process (GPT-2-small takes seconds to initialize)."""
    return BUILDERS[key]()


def logits(out: Any) -> Tensor:
    """The primary tensor of a model output (logits for GPT-2)."""
    if isinstance(out, tuple):  # (output, captures) from the implementations below
        out = out[0]
    tensor = hookfn.primary(out)
    assert tensor is not None
    return tensor


# -- hand-written baselines ---------------------------------------------------------------


def _clone_structure(value: Any) -> Any:
    """What a careful hand-written hook stores: a detached clone of every tensor in the value."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_structure(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _clone_structure(v) for k, v in value.items()}
    return value


@contextmanager
def raw_hooks(pairs: list[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def raw_capture(bench: Bench, modules: list[tuple[str, nn.Module]] | None = None) -> Any:
    store: dict[str, Any] = {}
    pairs = []
    for name, module in bench.blocks if modules is None else modules:

        def hook(module: nn.Module, args: Any, out: Any, name: str = name) -> None:
            store[name] = out.detach().clone() if type(out) is Tensor else _clone_structure(out)

        pairs.append((module, hook))
    with raw_hooks(pairs):
        out = bench.model(bench.x)
    return out, store


def raw_edit(bench: Bench, *, keep: bool) -> Any:
    store: dict[str, Tensor] = {}
    pairs = []
    for name, module in bench.blocks:

        def hook(module: nn.Module, args: Any, out: Tensor, name: str = name) -> Tensor:
            y = out + bench.deltas[name]
            if keep:
                store[name] = y.detach().clone()
            return y

        pairs.append((module, hook))
    with raw_hooks(pairs):
        out = bench.model(bench.x)
    return out, store


# -- the implementations each case compares -----------------------------------------------


def _trace_multiple(bench: Bench, spec: Any) -> Any:
    with TraceMultiple(bench.model, spec) as tm:
        out = bench.model(bench.x)
    return out, tm.captures()


def implementations(bench: Bench, case: str) -> dict[str, Callable[[], Any]]:
    """``{impl: fn}`` for one case; ``"bare"`` is the model alone, ``"raw"`` raw torch hooks."""
    model, x, names = bench.model, bench.x, bench.names
    bare = functools.partial(model, x)
    if case == "capture_blocks":
        return {
            "bare": bare,
            "raw": lambda: raw_capture(bench),
            "hookfn": lambda: run_with_hooks(model, x, names),
            "trace_multiple": lambda: _trace_multiple(bench, names),
        }
    if case == "edit_blocks":
        spec = {name: Hook(add(bench.deltas[name]), output=False) for name in names}
        return {
            "bare": bare,
            "raw": lambda: raw_edit(bench, keep=False),
            "hookfn": lambda: run_with_hooks(model, x, spec),
        }
    if case == "edit_capture_blocks":
        spec_keep = {name: add(bench.deltas[name]) for name in names}
        return {
            "bare": bare,
            "raw": lambda: raw_edit(bench, keep=True),
            "hookfn": lambda: run_with_hooks(model, x, spec_keep),
        }
    if case == "capture_all":
        modules = bench.modules
        return {
            "bare": bare,
            "raw": lambda: raw_capture(bench, modules),
            "hookfn": lambda: run_with_hooks(model, x, ["**"]),
        }
    if case == "fixed":
        return {"bare": bare, "hookfn": lambda: run_with_hooks(model, x, {})}
    raise KeyError(case)


def n_hooked(bench: Bench, case: str) -> int:
    return len(bench.modules) if case == "capture_all" else bench.n_layers


# -- patching sweeps ----------------------------------------------------------------------


def metric(out: Any, target: tuple[int, int]) -> Tensor:
    """Logit difference of two vocabulary entries at the last position."""
    last = logits(out)[0, -1]
    return last[target[0]] - last[target[1]]


def _patch_position(clean: Tensor, position: int) -> Callable[[Tensor], Tensor]:
    def patch(x: Tensor) -> Tensor:
        y = x.clone()
        y[:, position] = clean[:, position]
        return y

    return patch


def _patch_whole(clean: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: clean


def positions_of(bench: Bench, per_position: bool) -> list[int | None]:
    return list(range(bench.x.shape[1])) if per_position else [None]


def sweep_raw(bench: Bench, per_position: bool) -> Tensor:
    """Activation patching written by hand: a clean cache, then one hooked run per site."""
    model, positions = bench.model, positions_of(bench, per_position)
    cache: dict[str, Tensor] = {}
    pairs = []
    for name, module in bench.blocks:

        def keep(module: nn.Module, args: Any, out: Tensor, name: str = name) -> None:
            cache[name] = out.detach().clone()

        pairs.append((module, keep))
    with raw_hooks(pairs):
        model(bench.x)
    results = torch.empty(bench.n_layers, len(positions))
    for i, (name, module) in enumerate(bench.blocks):
        for j, position in enumerate(positions):
            clean = cache[name]
            patch = _patch_whole(clean) if position is None else _patch_position(clean, position)
            handle = module.register_forward_hook(lambda m, a, out, patch=patch: patch(out))
            try:
                out = model(bench.corrupt_x)
            finally:
                handle.remove()
            results[i, j] = metric(out, bench.target)
    return results


def _hookfn_patch(cache: dict[str, hookfn.Capture], name: str, position: int | None) -> Any:
    """The hookfn edit that patches the clean activation in: `patch_from` where it exists."""
    patch_from = getattr(hookfn, "patch_from", None)
    if patch_from is None:
        clean = cache[name].output
        return _patch_whole(clean) if position is None else _patch_position(clean, position)
    edit = patch_from(cache)
    return edit if position is None else edit.at(position)


def sweep_hookfn(bench: Bench, per_position: bool) -> Tensor:
    """The same sweep with `run_with_hooks` (the patched runs capture nothing, like the loop)."""
    model, positions = bench.model, positions_of(bench, per_position)
    _, clean = run_with_hooks(model, bench.x, bench.names)
    results = torch.empty(bench.n_layers, len(positions))
    for i, name in enumerate(bench.names):
        for j, position in enumerate(positions):
            edit = _hookfn_patch(clean, name, position)
            out, _ = run_with_hooks(model, bench.corrupt_x, {name: Hook(edit, output=False)})
            results[i, j] = metric(out, bench.target)
    return results


def sweep_transformer_lens(bench: Bench, per_position: bool) -> Tensor:
    """The same sweep written the TransformerLens way: ``run_with_cache``, then
    ``run_with_hooks(fwd_hooks=...)`` per site (on a `TransformerBridge` model)."""
    model, positions = bench.model, positions_of(bench, per_position)
    wanted = set(bench.names)
    _, cache = model.run_with_cache(bench.x, names_filter=lambda name: name in wanted)
    results = torch.empty(bench.n_layers, len(positions))
    for i, name in enumerate(bench.names):
        for j, position in enumerate(positions):
            clean = cache[name]
            patch = _patch_whole(clean) if position is None else _patch_position(clean, position)
            out = model.run_with_hooks(
                bench.corrupt_x, fwd_hooks=[(name, lambda t, hook, patch=patch: patch(t))]
            )
            results[i, j] = metric(out, bench.target)
    return results


# -- memory -------------------------------------------------------------------------------


def torch_cpu_memory(fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """Run ``fn`` under the torch profiler; return (peak, net, result) of CPU tensor memory.

    ``peak`` is the highest total of bytes that torch's CPU allocator handed out during the
    call, above what was allocated before it; ``net`` what is still allocated when it returns
    (for a capture: what the captures hold). Python objects are not counted.
    """
    import gc

    from torch.profiler import ProfilerActivity, profile

    # Without the cyclic collector, memory held by reference cycles shows as retained.
    enabled = gc.isenabled()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    finally:
        if enabled:
            gc.enable()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if event.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak, running, result


def tensor_bytes(value: Any) -> int:
    """Bytes of the distinct tensor storages reachable in ``value`` (captures, dicts, tuples)."""
    import torch.utils._pytree as pytree

    seen: dict[int, int] = {}
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, Tensor):
            storage = leaf.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# -- paired timing -----------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], budget_s: float) -> dict[str, dict[str, float]]:
    """Time the functions in turn, round after round; summarize each one minus the first.

    The first function is the baseline (the bare forward pass). Within a round every
    function runs once, in an order that rotates from round to round, and each one's time
    is compared with the baseline's time of the same round. On a shared machine the load
    drifts from one benchmark to the next, and it slows the hooks as much as the model: a
    difference, or a ratio of differences, taken within the same rounds cancels that drift,
    and the median over rounds ignores the rounds a preemption hit. Runs for ``budget_s``
    seconds, at least 5 rounds.

    Returns:
        ``{name: {"rounds", "diff_median", "diff_se", "base_median"}}`` for every function
        but the baseline; ``diff_se`` is the standard error of the median (from the IQR).
    """
    import gc
    import statistics
    from time import perf_counter

    names = list(fns)
    base_name = names[0]
    times: dict[str, list[float]] = {name: [] for name in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = perf_counter()
        rounds = 0
        while rounds < 5 or (perf_counter() - start < budget_s and rounds < 5000):
            shift = rounds % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = perf_counter()
                fns[name]()
                times[name].append(perf_counter() - t0)
            rounds += 1
    finally:
        if enabled:
            gc.enable()
    result = {}
    base = times[base_name]
    for name in names[1:]:
        diffs = [t - b for t, b in zip(times[name], base, strict=True)]
        quartiles = statistics.quantiles(diffs, n=4)
        result[name] = {
            "rounds": rounds,
            "diff_median": statistics.median(diffs),
            "diff_se": 1.253 * ((quartiles[2] - quartiles[0]) / 1.349) / rounds**0.5,
            "base_median": statistics.median(base),
        }
    return result


# -- machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    import transformers

    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hookfn": hookfn.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_at_start": round(load, 2),
    }
