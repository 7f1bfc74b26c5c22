"""The independent reference of the patching tests: one forward per cell, raw torch hooks.

Nothing here uses hookfn. `loop_sweep` records each site's activation in the source run with
a raw ``register_forward_hook`` / ``register_forward_pre_hook``, then runs the base inputs
once per (site, index) with a hook that writes ``y[index] = source[index]`` into a copy of the
activation, the way a patching loop is written by hand. The tests of this file check the
reference itself on cases whose answer is known without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

Call = Callable[[nn.Module], Any]


def call(inputs: Any) -> Call:
    """How the reference calls the model on ``inputs`` (a tensor or a mapping)."""
    if isinstance(inputs, Mapping):
        return lambda model: model(**inputs)
    return lambda model: model(inputs)


def primary_of(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return value[0]
    return next(iter(value.values()))


@contextmanager
def raw_hook(module: nn.Module, kind: str, fn: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """A raw hook that hands ``fn`` the primary output (or first input) and puts back what it
    returns."""
    if kind == "output":

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            new = fn(primary_of(output))
            if new is None:
                return None
            if isinstance(output, Tensor):
                return new
            return (new, *output[1:])

        handle = module.register_forward_hook(hook)
    else:

        def pre(module: nn.Module, args: Any, kwargs: Any) -> Any:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = next(iter(kwargs))
            new = fn(kwargs[key])
            return None if new is None else (args, {**kwargs, key: new})

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def record(model: nn.Module, run: Call, name: str, kind: str) -> Tensor:
    kept: list[Tensor] = []
    with (
        torch.no_grad(),
        raw_hook(model.get_submodule(name), kind, lambda x: kept.append(x.clone())),
    ):
        run(model)
    assert len(kept) == 1
    return kept[0]


def loop_sweep(
    model: nn.Module,
    base: Any,
    source: Any,
    sites: Sequence[tuple[str, str]],
    indices: Sequence[Any],
    metric: Callable[[Any], Tensor],
    *,
    source_of: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``[sites, indices, pairs]``: the metric after each patch ``y[index] = source[index]``.

    ``source_of`` maps the recorded source activation to base positions (prompts of
    different lengths).
    """
    run_base, run_source = call(base), call(source)
    result = []
    for name, kind in sites:
        clean = record(model, run_source, name, kind)
        if source_of is not None:
            clean = source_of(clean)
        row = []
        for index in indices:

            def patch(x: Tensor, index: Any = index, clean: Tensor = clean) -> Tensor:
                y = x.clone()
                y[index] = clean[index]
                return y

            with torch.no_grad(), raw_hook(model.get_submodule(name), kind, patch):
                row.append(metric(run_base(model)))
        result.append(torch.stack(row))
    return torch.stack(result)


def gpt2(n_layer: int = 2, seed: int = 0, width: int = 32, heads: int = 4) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=width,
        n_head=heads,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def llama(n_layer: int = 2, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def prompt_pair(
    n: int = 2, seq: int = 8, at: Sequence[int] = (3,), seed: int = 1
) -> tuple[Tensor, Tensor]:
    """Clean and corrupted token ids that differ at the positions ``at``."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 100, (n, seq), generator=g)
    corrupted = clean.clone()
    for p in at:
        corrupted[:, p] = (clean[:, p] + torch.randint(1, 99, (n,), generator=g)) % 99 + 1
    return clean, corrupted


def logit_diff_of(right: int = 3, wrong: int = 5) -> Callable[[Any], Tensor]:
    def metric(output: Any) -> Tensor:
        logits = primary_of(output)[:, -1]
        return logits[:, right] - logits[:, wrong]

    return metric


# -- the reference itself ---------------------------------------------------------------------


def test_patching_a_whole_block_output_restores_the_clean_run() -> None:
    # A GPT-2 block's output is the whole residual stream: patching it all is the clean run.
    model = gpt2()
    clean, corrupted = prompt_pair()
    metric = logit_diff_of()
    got = loop_sweep(model, corrupted, clean, [("transformer.h.1", "output")], [(...,)], metric)
    with torch.no_grad():
        want = metric(model(clean))
    torch.testing.assert_close(got[0, 0], want)
    with torch.no_grad():
        assert not torch.allclose(metric(model(corrupted)), want)


def test_patching_from_the_run_itself_changes_nothing() -> None:
    model = gpt2()
    _, corrupted = prompt_pair()
    metric = logit_diff_of()
    got = loop_sweep(
        model, corrupted, corrupted, [("transformer.h.0", "input")], [(slice(None), 2)], metric
    )
    with torch.no_grad():
        assert torch.equal(got[0, 0], metric(model(corrupted)))


@pytest.mark.parametrize("kind", ["output", "input"])
def test_hooks_are_removed(kind: str) -> None:
    model = gpt2()
    clean, corrupted = prompt_pair()
    loop_sweep(
        model, corrupted, clean, [("transformer.h.0", kind)], [(slice(None), 1)], logit_diff_of()
    )
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
