"""A spliced SAE against a hand-written raw hook doing the same work.

The model is a transformers GPT-2 from a config (random weights); the SAE (16x latents) is
spliced at one block's output with the error term, its latents captured. The raw hook is what
a user writes by hand: a forward hook that encodes, keeps a copy of the latents, decodes and
adds the error. Reported: the cost of each over the bare forward (paired rounds: bare, raw,
splice in turn; medians), and their ratio (splice / raw; goal <= 1.2x). The assert catches
gross regressions only.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor, nn

from hookfn import Hook, run_with_hooks, splice
from hookfn.sae import SparseAutoencoder

# (id, n_layer, width, seq, batch, expansion, rounds, marks)
CASES = [
    ("small", 4, 256, 64, 8, 16, 30, [pytest.mark.quick]),
    ("gpt2-small-width", 2, 768, 128, 4, 16, 10, [pytest.mark.slow]),
]
SITE = "transformer.h.1"


def _model(n_layer: int, width: int, seq: int) -> nn.Module:
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=width, n_head=width // 64, vocab_size=1000,
        n_positions=seq, bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def _raw(model: nn.Module, ids: Tensor, sae: SparseAutoencoder) -> tuple[Any, Tensor]:
    kept: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        z = sae.encode(out)
        kept["z"] = z.detach().clone()
        recon = sae.decode(z)
        return recon + (out - recon)

    handle = model.get_submodule(SITE).register_forward_hook(hook)
    try:
        output = model(ids)
    finally:
        handle.remove()
    return output, kept["z"]


def _splice(model: nn.Module, ids: Tensor, sae: SparseAutoencoder) -> tuple[Any, Tensor]:
    out, caches = run_with_hooks(
        model,
        ids,
        {SITE: Hook(splice(sae, error=True), output=False), f"{SITE}.sae.latents": "capture"},
    )
    return out, caches[f"{SITE}.sae.latents"].output


@pytest.mark.parametrize(
    ("n_layer", "width", "seq", "batch", "expansion", "rounds"),
    [pytest.param(*case[1:-1], id=case[0], marks=case[-1]) for case in CASES],
)
def test_splice_vs_raw_hook(
    benchmark: Any, n_layer: int, width: int, seq: int, batch: int, expansion: int, rounds: int
) -> None:
    torch.set_num_threads(1)
    model = _model(n_layer, width, seq)
    sae = SparseAutoencoder(width, width * expansion, generator=torch.Generator().manual_seed(0))
    sae.requires_grad_(False)
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(1))
    fns = {
        "bare": lambda: model(ids),
        "raw": lambda: _raw(model, ids, sae),
        "splice": lambda: _splice(model, ids, sae),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        raw_out, raw_z = fns["raw"]()
        our_out, our_z = fns["splice"]()
        torch.testing.assert_close(our_out.logits, raw_out.logits)
        torch.testing.assert_close(our_z, raw_z)
        for _ in range(rounds):  # in turn, so drifts of the machine hit each alike
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    bare = statistics.median(times["bare"])
    raw_cost = statistics.median(r - b for r, b in zip(times["raw"], times["bare"], strict=True))
    our_cost = statistics.median(s - b for s, b in zip(times["splice"], times["bare"], strict=True))
    ratio = our_cost / raw_cost
    benchmark.group = "splice"
    benchmark.extra_info.update(
        suite="splice",
        model="gpt2",
        case="splice",
        impl="hookfn",
        description="transformers GPT-2 from a config (random weights)",
        splice_case=f"{n_layer}x{width}, SAE {width}->{width * expansion}, {batch}x{seq} tokens",
        bare_s=bare,
        raw_cost_s=raw_cost,
        splice_cost_s=our_cost,
        splice_ratio=ratio,
    )
    with torch.no_grad():
        benchmark.pedantic(fns["splice"], rounds=1, iterations=1)
    print(
        f"\nsplice {n_layer}x{width}: forward {bare * 1e3:.1f} ms; SAE by a raw hook "
        f"+{raw_cost * 1e3:.2f} ms, by splice +{our_cost * 1e3:.2f} ms: {ratio:.2f}x (goal 1.2x)"
    )
    assert ratio < 2.0  # gross regressions only; the goal is reported above
