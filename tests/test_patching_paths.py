"""`path_patching` against a hand-written three-run reference with raw torch hooks."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import pytest
import torch
from test_patching_reference import gpt2, primary_of, prompt_pair, raw_hook, record
from torch import Tensor, nn

from hookfn import SpecError
from hookfn.demo import load_model, make_patching_pair
from hookfn.patching import (
    Sites,
    activation_patching,
    attn_out,
    each_head,
    each_position,
    head_out,
    logit_diff,
    path_patching,
)


def reference(
    model: nn.Module,
    base: Tensor,
    source: Tensor,
    senders: list[tuple[str, str]],
    cells: list[tuple[int, Any]],
    receivers: list[tuple[str, str]],
    metric: Any,
) -> Tensor:
    """The three runs of Wang et al., one cell at a time: ``[cells, pairs]``."""
    base_run, source_run = (lambda m: m(base)), (lambda m: m(source))
    held = {name: record(model, base_run, name, kind) for name, kind in senders}
    sent = {name: record(model, source_run, name, kind) for name, kind in senders}
    values = []
    for sender, index in cells:
        recorded: dict[str, Tensor] = {}
        with ExitStack() as stack, torch.no_grad():
            # 1. the sender from the source run, every other sender held at the base run
            for i, (name, kind) in enumerate(senders):
                value = held[name].clone()
                if i == sender:
                    value[index] = sent[name][index]
                stack.enter_context(
                    raw_hook(model.get_submodule(name), kind, lambda x, value=value: value.clone())
                )
            # 2. the receivers' activations recorded
            for name, kind in receivers:
                stack.enter_context(
                    raw_hook(
                        model.get_submodule(name),
                        kind,
                        lambda x, name=name, into=recorded: into.__setitem__(name, x.clone()),
                    )
                )
            model(base)
        # 3. the base run with only the receivers patched
        with ExitStack() as stack, torch.no_grad():
            for name, kind in receivers:
                stack.enter_context(
                    raw_hook(model.get_submodule(name), kind, lambda x, v=recorded[name]: v.clone())
                )
            values.append(metric(model(base)))
    return torch.stack(values)


def _metric(output: Any) -> Tensor:
    logits = primary_of(output)[:, -1]
    return logits[:, 3] - logits[:, 5]


@pytest.mark.parametrize("mode", ["denoise", "noise"])
def test_heads_to_a_later_attention_input_equal_the_reference(mode: str) -> None:
    model = gpt2(n_layer=3)
    clean, corrupted = prompt_pair(n=2, at=(2, 5))
    base, source = (corrupted, clean) if mode == "denoise" else (clean, corrupted)
    receivers = [("transformer.h.2.attn.c_attn", "input")]
    result = path_patching(
        model,
        clean,
        corrupted,
        senders=head_out(model),
        receivers=Sites("transformer.h.2.attn.c_attn", kind="input"),
        over=each_head(),
        metric=logit_diff(3, 5),
        mode=mode,
        per_pair=True,
        batch_size=6,
    )
    senders = [(f"transformer.h.{i}.attn.c_proj", "input") for i in range(3)]
    cells = [(i, (..., slice(h * 8, (h + 1) * 8))) for i in range(3) for h in range(4)]
    want = reference(model, base, source, senders, cells, receivers, _metric)
    got = result.values.reshape(2, 12).T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Senders in the last layer send nothing to the receivers before them.
    assert torch.allclose(result.values[:, 2], result.base[:, None], atol=1e-6)
    assert (want - want.mean()).abs().max() > 1e-3


def test_outputs_to_the_last_block_on_the_demo_model() -> None:
    model = load_model()
    pair = make_patching_pair(4, torch.Generator().manual_seed(0), pair_index=1)
    metric = logit_diff(pair.clean_targets, pair.corrupted_targets)
    result = path_patching(
        model,
        pair.clean_ids,
        pair.corrupted_ids,
        senders=attn_out(model),
        receivers=Sites("transformer.h.1", kind="input"),
        over=each_position(),
        metric=metric,
        per_pair=True,
    )
    senders = [("transformer.h.0.attn", "output"), ("transformer.h.1.attn", "output")]
    cells = [(i, (slice(None), p)) for i in range(2) for p in range(8)]

    def reference_metric(logits: Tensor) -> Tensor:
        last = logits[:, -1]
        return (
            last.gather(1, pair.clean_targets[:, None])[:, 0]
            - last.gather(1, pair.corrupted_targets[:, None])[:, 0]
        )

    want = reference(
        model,
        pair.corrupted_ids,
        pair.clean_ids,
        senders,
        cells,
        [("transformer.h.1", "input")],
        reference_metric,
    )
    torch.testing.assert_close(result.values.reshape(4, 16).T, want, atol=1e-5, rtol=0)
    # Block 0's attention reaches the last block directly: its path carries the answer, as
    # patching its output outright does.
    exact = activation_patching(
        model,
        pair.clean_ids,
        pair.corrupted_ids,
        "transformer.h.0.attn",
        over=each_position(),
        metric=metric,
    )
    torch.testing.assert_close(result.averaged().values[0], exact.values[0], atol=1e-4, rtol=0)


def test_receivers_that_are_frozen_are_refused() -> None:
    model = gpt2(n_layer=2)
    clean, corrupted = prompt_pair()
    with pytest.raises(SpecError, match="receivers and frozen"):
        path_patching(
            model,
            clean,
            corrupted,
            senders=head_out(model),
            receivers=Sites("transformer.h.1.attn.c_proj", kind="input"),
            metric=logit_diff(3, 5),
        )
