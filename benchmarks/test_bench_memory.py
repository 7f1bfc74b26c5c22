"""Memory of captures: torch CPU allocations, against the size the captured tensors must have.

``tracemalloc`` does not see tensor memory, so these cases read torch's own allocation events
(the profiler's ``profile_memory``): the peak of bytes handed out by torch's CPU allocator
during the call, what stays allocated after it (the captures), and the bytes of the distinct
tensor storages in the result. The theoretical size is layers x tokens x width x 4 bytes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_common import Bench, get_bench, raw_capture, tensor_bytes, torch_cpu_memory
from torch import Tensor, nn

from hookfn import run_with_hooks

# (model, case, n_batches, batch_size, quick); "blocks" is one capture of every block.
CASES = [
    ("small", "blocks", 1, 1, True),
    ("tiny", "dataset", 16, 4, True),
    ("small", "dataset", 4, 1, False),
]


def _dataset(bench: Bench, n_batches: int, batch_size: int) -> list[Tensor]:
    vocab = bench.model.config.vocab_size  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(1)
    seq = bench.x.shape[1]
    return [
        torch.randint(0, vocab, (batch_size, seq), generator=generator) for _ in range(n_batches)
    ]


def _collect_raw(bench: Bench, batches: list[Tensor]) -> dict[str, Tensor]:
    acts: dict[str, list[Tensor]] = {name: [] for name in bench.names}
    current: dict[str, Tensor] = {}
    handles = []
    for name, module in bench.blocks:

        def hook(module: nn.Module, args: Any, out: Tensor, name: str = name) -> None:
            current[name] = out.detach().clone()

        handles.append(module.register_forward_hook(hook))
    try:
        for batch in batches:
            bench.model(batch)
            for name in bench.names:
                acts[name].append(current[name])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values) for name, values in acts.items()}


def _collect_hookfn(bench: Bench, batches: list[Tensor]) -> dict[str, Tensor]:
    acts: dict[str, list[Tensor]] = {name: [] for name in bench.names}
    for batch in batches:
        # The output is dropped at once, as in _collect_raw: only the captures are kept.
        caches = run_with_hooks(bench.model, batch, bench.names)[1]
        for name in bench.names:
            acts[name].append(caches[name].output)
    return {name: torch.cat(values) for name, values in acts.items()}


def _functions(bench: Bench, case: str, n_batches: int, batch_size: int) -> dict[str, Any]:
    if case == "blocks":
        return {
            "bare": lambda: bench.model(bench.x),
            "raw": lambda: raw_capture(bench)[1],
            "hookfn": lambda: run_with_hooks(bench.model, bench.x, bench.names)[1],
        }
    batches = _dataset(bench, n_batches, batch_size)

    def bare() -> None:
        for batch in batches:
            bench.model(batch)

    return {
        "bare": bare,
        "raw": lambda: _collect_raw(bench, batches),
        "hookfn": lambda: _collect_hookfn(bench, batches),
    }


def _rows() -> list[Any]:
    rows = []
    for model, case, n_batches, batch_size, quick in CASES:
        for impl in ("bare", "raw", "hookfn"):
            marks = [pytest.mark.quick] if quick else []
            rows.append(
                pytest.param(
                    model,
                    case,
                    n_batches,
                    batch_size,
                    impl,
                    id=f"{model}-{case}-{impl}",
                    marks=marks,
                )
            )
    return rows


@pytest.mark.parametrize(("model", "case", "n_batches", "batch_size", "impl"), _rows())
def test_memory(
    benchmark: Any, model: str, case: str, n_batches: int, batch_size: int, impl: str
) -> None:
    bench = get_bench(model)
    fn = _functions(bench, case, n_batches, batch_size)[impl]
    width = bench.deltas[bench.names[0]].shape[-1]
    tokens = n_batches * batch_size * bench.x.shape[1]
    theoretical = 0 if impl == "bare" else bench.n_layers * tokens * width * 4
    with torch.no_grad():
        fn()  # warm-up: lazily created state is not counted
        peak, net, result = torch_cpu_memory(fn)
        captured = 0 if impl == "bare" else tensor_bytes(result)
        benchmark.group = f"memory-{model}-{case}"
        benchmark.extra_info.update(
            suite="memory",
            model=model,
            description=bench.description,
            case=case,
            impl=impl,
            tokens=tokens,
            n_layers=bench.n_layers,
            peak_bytes=peak,
            retained_bytes=net,
            captured_bytes=captured,
            theoretical_bytes=theoretical,
        )
        benchmark.pedantic(fn, rounds=1, iterations=1)
    # Captures hold exactly the activations asked for: no hidden copies, nothing missing;
    # and once the call returns, nothing but its result stays allocated (no reference cycle
    # or stale hook keeps a recorded tensor alive).
    assert captured == theoretical
    if impl != "bare":
        assert net == captured
