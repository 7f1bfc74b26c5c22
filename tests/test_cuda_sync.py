"""No host synchronization on the default hook path (CUDA).

Captures and edits on every block of a GPT-2-small-shaped model (12 x 768, random weights,
bf16) run under ``torch.cuda.set_sync_debug_mode``: a hooked run may synchronize with the host
no more often than the bare forward pass does (the model's own code may; on GPT-2 it should
not). With the bare forward at zero the hooked run is also run in ``"error"`` mode, where any
synchronizing operation raises. Each case runs once untimed first (first calls may set up
state), then is counted; the values are then compared with a raw ``register_forward_hook``
run doing the same edit.

A capture moved to the CPU (``Hook(device="cpu")``) or an edit value that lives on the CPU
needs a copy between host and device, which synchronizes: those are off the default path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hookfn import ablate, add, patch_from, run_with_hooks

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N_LAYER, WIDTH, VOCAB, BATCH, SEQ = 12, 768, 50257, 2, 16
BLOCKS = [f"transformer.h.{i}" for i in range(N_LAYER)]


@pytest.fixture(scope="module")
def gpt2_small() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=N_LAYER,
        n_embd=WIDTH,
        n_head=12,
        vocab_size=VOCAB,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to("cuda", torch.bfloat16).eval()


@pytest.fixture(scope="module")
def ids() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    corrupted = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return {"clean": clean.cuda(), "corrupted": corrupted.cuda()}


@pytest.fixture(autouse=True)
def sync_mode_reset() -> Iterator[None]:
    yield
    torch.cuda.set_sync_debug_mode("default")


def count_syncs(fn: Callable[[], Any]) -> int:
    """Synchronizing CUDA operations that ``fn`` runs (sync debug mode "warn", every warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def _first(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def raw_run(
    model: nn.Module, x: Tensor, edit: Callable[[str, Tensor], Tensor] | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The reference: raw forward hooks on every block, ``edit(name, out)``, then a clone."""
    store: dict[str, Tensor] = {}
    handles = []
    for name in BLOCKS:

        def hook(module: nn.Module, args: Any, out: Any, name: str = name) -> Any:
            first = _first(out)
            new = first if edit is None else edit(name, first)
            store[name] = new.detach().clone()
            return new if isinstance(out, Tensor) else (new, *out[1:])

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits, store


@pytest.fixture(scope="module")
def deltas() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {
        name: torch.randn(WIDTH, generator=generator).to("cuda", torch.bfloat16) for name in BLOCKS
    }


def _ablate_17(name: str, x: Tensor) -> Tensor:
    y = x.clone()
    y[..., 17] = 0
    return y


Inputs = tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]  # cache, clean, deltas

# case: (the spec, the raw hook's edit ``(name, out) -> new``) from the clean run's hookfn
# cache, its raw-hook activations, and the per-block deltas
CASES: dict[str, Callable[[Inputs], tuple[Any, Any]]] = {
    "capture": lambda i: (BLOCKS, None),
    "add": lambda i: (
        {name: add(delta) for name, delta in i[2].items()},
        lambda name, x: x + i[2][name],
    ),
    "ablate": lambda i: ({name: ablate(17) for name in BLOCKS}, _ablate_17),
    "patch_from": lambda i: (
        {name: patch_from(i[0]) for name in BLOCKS},
        lambda name, x: i[1][name].clone(),
    ),
    "patch_from_at_position": lambda i: (
        {name: patch_from(i[0]).at(3) for name in BLOCKS},
        lambda name, x: torch.cat([x[:, :3], i[1][name][:, 3:4], x[:, 4:]], dim=1),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_default_hook_path_never_syncs(
    case: str, gpt2_small: nn.Module, ids: dict[str, Tensor], deltas: dict[str, Tensor]
) -> None:
    model, x = gpt2_small, ids["corrupted"]
    with torch.no_grad():
        _, cache = run_with_hooks(model, ids["clean"], BLOCKS)
        _, clean = raw_run(model, ids["clean"], None)
        spec, by_hand = CASES[case]((cache, clean, deltas))
        model(x)
        torch.cuda.synchronize()
        bare = count_syncs(lambda: model(x))

        run_with_hooks(model, x, spec)  # the first call, untimed and uncounted
        torch.cuda.synchronize()
        hooked = count_syncs(lambda: run_with_hooks(model, x, spec))
        torch.cuda.synchronize()
        assert hooked == bare, f"{case}: {hooked} host syncs per hooked run, bare forward {bare}"
        if bare == 0:
            torch.cuda.set_sync_debug_mode("error")
            try:
                out, caches = run_with_hooks(model, x, spec)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            out, caches = run_with_hooks(model, x, spec)
        ref_logits, ref_store = raw_run(model, x, by_hand)
    torch.testing.assert_close(out.logits, ref_logits)
    for name in BLOCKS:
        torch.testing.assert_close(caches[name].output, ref_store[name])


def test_capture_of_every_module_never_syncs(gpt2_small: nn.Module, ids: dict[str, Tensor]) -> None:
    model, x = gpt2_small, ids["clean"]
    with torch.no_grad():
        model(x)
        bare = count_syncs(lambda: model(x))
        run_with_hooks(model, x, ["**"])
        torch.cuda.synchronize()
        hooked = count_syncs(lambda: run_with_hooks(model, x, ["**"]))
        out, caches = run_with_hooks(model, x, ["**"])
        ref_logits, ref_store = raw_run(model, x, None)
    assert hooked == bare
    torch.testing.assert_close(out.logits, ref_logits)
    for name in BLOCKS:
        torch.testing.assert_close(caches[name].output, ref_store[name])


def test_the_counter_sees_a_sync() -> None:
    # The counting itself: .item() on a CUDA tensor synchronizes, a CUDA-only op does not.
    x = torch.ones(4, device="cuda")
    assert count_syncs(lambda: (x * 2).sum().item()) >= 1
    assert count_syncs(lambda: x * 2) == 0
