"""What naming components and op sites costs, against the bare forward and the alternatives.

On a transformers GPT-2 from a config (sdpa attention), each way runs in turn for several
rounds, and each cost is the median of its time minus the bare forward's:

- ``resid_pre (module input)``: ``Hook(input=True)`` at every block, and
  ``blocks.*.hook_resid_pre``, the component of the same values;
- ``op site``: every call of ``scaled_dot_product_attention`` in every attention, captured
  (``"transformer.h.*.attn:sdpa"``: a function mode over each attention's forward);
- ``pattern``: ``blocks.*.attn.hook_pattern`` on the sdpa model (the attention written out),
  against the alternative without hookfn, an eager-attention copy run with
  ``output_attentions=True``.

The asserts check only that each way captures what the others do; the figures are reported.
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
from torch import nn

from hookfn import Hook, run_with_hooks

# (id, n_layer, width, seq, batch, rounds, marks)
CASES = [
    ("small", 4, 256, 64, 8, 15, [pytest.mark.quick]),
    ("gpt2-small-width", 4, 768, 128, 4, 5, [pytest.mark.slow]),
]


def _model(n_layer: int, width: int, seq: int, attn: str) -> nn.Module:
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=width, n_head=width // 64, vocab_size=1000, n_positions=seq,
        bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation=attn,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize(
    ("n_layer", "width", "seq", "batch", "rounds"),
    [pytest.param(*case[1:-1], id=case[0], marks=case[-1]) for case in CASES],
)
def test_component_and_op_site_costs(
    benchmark: Any, n_layer: int, width: int, seq: int, batch: int, rounds: int
) -> None:
    torch.set_num_threads(1)
    model = _model(n_layer, width, seq, "sdpa")
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(1))
    blocks = "transformer.h.*"
    ways: dict[str, Callable[[], Any]] = {
        "bare": lambda: model(ids),
        "resid_pre (module input)": lambda: run_with_hooks(
            model, ids, {blocks: Hook(input=True, output=False)}
        ),
        "resid_pre (component)": lambda: run_with_hooks(model, ids, ["blocks.*.hook_resid_pre"]),
        "op site (sdpa, captured)": lambda: run_with_hooks(model, ids, [f"{blocks}.attn:sdpa"]),
        "pattern (component, sdpa model)": lambda: run_with_hooks(
            model, ids, ["blocks.*.attn.hook_pattern"]
        ),
        "pattern (eager model, output_attentions)": lambda: eager(ids, output_attentions=True),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.no_grad():
        # The same values, each way.
        _, by_input = ways["resid_pre (module input)"]()
        _, by_component = ways["resid_pre (component)"]()
        torch.testing.assert_close(
            by_component["blocks.0.hook_resid_pre"].output, by_input["transformer.h.0"].input
        )
        _, patterns = ways["pattern (component, sdpa model)"]()
        reference = ways["pattern (eager model, output_attentions)"]()
        torch.testing.assert_close(
            patterns["blocks.1.attn.hook_pattern"].output, reference.attentions[1]
        )
        for _ in range(rounds):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - start)
    bare = statistics.median(times["bare"])
    costs = {
        name: statistics.median(t - b for t, b in zip(values, times["bare"], strict=True))
        for name, values in times.items()
        if name != "bare"
    }
    benchmark.group = "components"
    benchmark.extra_info.update(
        suite="components",
        model="gpt2",
        case="components",
        impl="hookfn",
        description="transformers GPT-2 from a config (random weights)",
        components_case=f"{n_layer}x{width}, {batch}x{seq} tokens",
        bare_s=bare,
        costs_s=costs,
    )
    with torch.no_grad():
        benchmark.pedantic(ways["pattern (component, sdpa model)"], rounds=1, iterations=1)
    lines = [f"\ncomponents {n_layer}x{width}, {batch}x{seq}: bare forward {bare * 1e3:.1f} ms"]
    lines += [f"  {name}: +{cost * 1e3:.2f} ms" for name, cost in costs.items()]
    print("\n".join(lines))
