"""Layer reuse in `activation_patching`: the layers before a chunk's earliest patched layer run
once, on one copy of the prompts, and the batch grows where the cells join.

Every result is compared with the one-forward-per-cell loop of raw hooks
(`test_patching_reference.loop_sweep`); raw pre-hooks count the rows each layer runs on, to show
the early layers really ran on fewer rows; models the growth cannot be exact on fall back to
whole-batch forwards, with results still equal to the loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from test_patching_reference import gpt2, llama, loop_sweep, primary_of, prompt_pair
from torch import Tensor, nn

from hookfn import SpecError, TraceMultiple
from hookfn.patching import (
    Sites,
    activation_patching,
    each_head,
    each_index,
    each_position,
    head_out,
    logit_diff,
    mlp_out,
    resid_post,
    resid_pre,
)

ATOL = 1e-5
SEQ = 8
N_LAYER = 3


@pytest.fixture(scope="module")
def gpt2_model() -> nn.Module:
    return gpt2(n_layer=N_LAYER)


@pytest.fixture(scope="module")
def llama_model() -> nn.Module:
    return llama(n_layer=N_LAYER)


@contextmanager
def rows_seen(modules: list[nn.Module]) -> Iterator[list[list[tuple[int, ...]]]]:
    """The shape (rows, positions) of the first input of every call of each module, from raw
    pre-hooks."""
    seen: list[list[tuple[int, ...]]] = [[] for _ in modules]

    def hook(i: int) -> Any:
        def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            seen[i].append(tuple(x.shape[:2]))

        return pre

    handles = [
        m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def padded(n: int, side: str, at: tuple[int, ...] = (3,)) -> tuple[dict[str, Tensor], ...]:
    """Clean and corrupted inputs of ``n`` prompt pairs of different lengths, padded."""
    clean, corrupted = prompt_pair(n=n, at=at)
    mask = torch.ones_like(clean)
    for row, length in enumerate([8, 6, 7, 5][:n]):
        if side == "right":
            mask[row, length:] = 0
        else:
            mask[row, : SEQ - length] = 0
    return {"input_ids": clean, "attention_mask": mask}, {
        "input_ids": corrupted,
        "attention_mask": mask,
    }


def at_last_real(mask: Tensor) -> Any:
    """The logit difference at each prompt's last real position (the reference's metric)."""
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)

    def metric(output: Any) -> Tensor:
        logits = primary_of(output)[torch.arange(mask.shape[0]), last]
        return logits[:, 3] - logits[:, 5]

    return metric


def compare(result: Any, reference: Tensor) -> None:
    """A per-pair result ``[pair, site, ...]`` against the loop's ``[site, cell, pair]``."""
    want = reference.permute(2, 0, 1).reshape(result.values.shape)
    torch.testing.assert_close(result.values, want, atol=ATOL, rtol=0)
    assert want.max() - want.min() > 20 * ATOL, "the sweep must have effects to compare"


def names_of(model: nn.Module, sites: Sites) -> list[str]:
    return list(TraceMultiple(model, list(sites.keys)))


POSITIONS = [(slice(None), p) for p in range(SEQ)]
HEADS = [(..., slice(h * 8, (h + 1) * 8)) for h in range(4)]
SWEEPS = {
    "resid_pre x position": (resid_pre, "input", each_position(), POSITIONS),
    "resid_post x position": (resid_post, "output", each_position(), POSITIONS),
    "mlp_out x position": (mlp_out, "output", each_position(), POSITIONS),
    "head_out x head": (head_out, "input", each_head(), HEADS),
}


@pytest.mark.parametrize("reuse", ["layers", "auto"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("sweep", list(SWEEPS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_reuse_equals_the_loop(
    gpt2_model: nn.Module,
    llama_model: nn.Module,
    family: str,
    sweep: str,
    side: str,
    reuse: str,
) -> None:
    """A batch of prompt pairs of different lengths (padded), on GPT-2 and Llama."""
    model = gpt2_model if family == "gpt2" else llama_model
    sites, kind, over, indices = SWEEPS[sweep]
    clean, corrupted = padded(3, side, at=(2, 5))
    metric = at_last_real(clean["attention_mask"])
    reference = loop_sweep(
        model,
        corrupted,
        clean,
        [(name, kind) for name in names_of(model, sites(model))],
        indices,
        metric,
    )
    for chosen in (logit_diff(3, 5), metric):
        result = activation_patching(
            model,
            clean,
            corrupted,
            sites(model),
            over=over,
            metric=chosen,
            per_pair=True,
            reuse=reuse,  # type: ignore[arg-type]
            batch_size=12,
        )
        compare(result, reference)


def test_early_layers_run_once_per_chunk(gpt2_model: nn.Module) -> None:
    """A head sweep of 3 layers x 4 heads on 2 prompt pairs, in one chunk: the embedding runs
    on one copy of the prompts, block ``l`` on the cells of blocks ``<= l`` plus that copy,
    the last block on the 12 cells only; without reuse every layer runs on all 24 rows."""
    clean, corrupted = prompt_pair(n=2, at=(3,))
    blocks = list(gpt2_model.transformer.h)
    watched = [gpt2_model.transformer.wte, *blocks]
    kwargs: dict[str, Any] = {"over": each_head(), "metric": logit_diff(3, 5), "per_pair": True}
    sites = head_out(gpt2_model)
    with rows_seen(watched) as seen:
        reused = activation_patching(gpt2_model, clean, corrupted, sites, reuse="layers", **kwargs)
    patched = [calls[2:] for calls in seen]  # after the clean and the corrupted run
    assert patched == [[(2, SEQ)], [(2 * 5, SEQ)], [(2 * 9, SEQ)], [(2 * 12, SEQ)]]
    with rows_seen(watched) as seen:
        plain = activation_patching(gpt2_model, clean, corrupted, sites, reuse="none", **kwargs)
    assert [calls[2:] for calls in seen] == [[(24, SEQ)]] * 4
    names = names_of(gpt2_model, sites)
    reference = loop_sweep(
        gpt2_model,
        corrupted,
        clean,
        [(n, "input") for n in names],
        HEADS,
        at_last_real(torch.ones_like(clean)),
    )
    compare(reused, reference)
    compare(plain, reference)


def test_layer_and_position_reuse_together(gpt2_model: nn.Module) -> None:
    """With both kinds of reuse (the default on a causal model), a resid sweep's cells at
    position ``p`` run positions ``p..`` only, and the blocks before a cell's own on one copy:
    fewer row-positions than either alone, the same values as the loop."""
    clean, corrupted = padded(2, "right", at=(4,))
    blocks = list(gpt2_model.transformer.h)
    work: dict[str, int] = {}
    results = {}
    for reuse in ("auto", "positions", "layers", "none"):
        with rows_seen(blocks) as seen:
            results[reuse] = activation_patching(
                gpt2_model,
                clean,
                corrupted,
                resid_pre(gpt2_model),
                over=each_position(),
                metric=logit_diff(3, 5),
                per_pair=True,
                reuse=reuse,  # type: ignore[arg-type]
                batch_size=6,  # one position's 3 cells per forward: no chunks to merge
            )
        work[reuse] = sum(rows * seq for calls in seen for rows, seq in calls[2:])
    assert work["auto"] < min(work["positions"], work["layers"])
    assert max(work["positions"], work["layers"]) < work["none"]
    names = names_of(gpt2_model, resid_pre(gpt2_model))
    reference = loop_sweep(
        gpt2_model,
        corrupted,
        clean,
        [(n, "input") for n in names],
        POSITIONS,
        at_last_real(clean["attention_mask"]),
    )
    for result in results.values():
        compare(result, reference)


class KeywordSide(nn.Module):
    """Layers called with the per-row tensor as a keyword argument, 2-D."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList(_Scaled() for _ in range(3))

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, gate=gate)
        return x[:, 0] - x[:, 1]


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: Tensor, *, gate: Tensor) -> Tensor:
        return torch.tanh(self.linear(x) * gate)


def test_plain_modules_sequential_and_side_arguments() -> None:
    """A `Sequential` model (the model itself is the stack) and a `ModuleList` whose parent
    passes a per-row keyword tensor: the rows each layer runs on, and equality with the loop."""
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    ).eval()
    x, y = torch.randn(3, 6), torch.randn(3, 6)

    def metric(out: Tensor) -> Tensor:
        return out[:, 0] - out[:, 1]

    indices = [(..., [0, 1]), (..., slice(4, 12)), (..., [15])]
    with rows_seen(list(mlp)) as seen:
        result = activation_patching(
            mlp, x, y, ["2", "3"], over=each_index(indices), metric=metric, per_pair=True
        )
    # Layers 0-2 ran on one copy; the cells of "2" (its output) join there, those of "3" next.
    assert [calls[2:] for calls in seen] == [[(3, 6)], [(3, 16)], [(3, 16)], [(12, 16)], [(18, 16)]]
    compare(result, loop_sweep(mlp, y, x, [("2", "output"), ("3", "output")], indices, metric))

    model = KeywordSide().eval()
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    gate = torch.rand(3, 8) + 0.5  # different per row: the rows must be matched
    features = [(..., [0, 1]), (..., slice(2, 6)), (..., 7)]
    for kind in ("input", "output"):
        sites = Sites(["layers.1", "layers.2"], kind=kind)  # type: ignore[arg-type]
        with rows_seen([model.layers[0]]) as seen:
            result = activation_patching(
                model,
                {"x": x, "gate": gate},
                {"x": y, "gate": gate},
                sites,
                over=each_index(features),
                metric=lambda out: out,
                per_pair=True,
            )
        assert seen[0][2:] == [(3, 8)]  # the first layer ran on one copy of the 3 pairs
        reference = loop_sweep(
            model,
            {"x": y, "gate": gate},
            {"x": x, "gate": gate},
            [("layers.1", kind), ("layers.2", kind)],
            features,
            lambda out: out,
        )
        compare(result, reference)


class Twice(nn.Module):
    """Calls its second layer again after the third: a grown batch would be grown twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        for layer in (*self.layers, self.layers[1]):
            x = torch.tanh(layer(x))
        return x[:, 0] - x[:, 1]


class Rebatched(nn.Module):
    """Reads its rows by the input's batch size after the stack, as a classification head
    picks ``logits[arange(batch), last]``: a grown batch would silently lose its cells."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        rows = torch.arange(x.shape[0])
        h = x
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h[rows, 0] - h[rows, 1]


class Normed(nn.Module):
    """Batch norm in training mode: its output mixes the rows of the batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x[:, 0] - x[:, 1]


@pytest.mark.parametrize("model_type", [Twice, Rebatched])
def test_models_that_cannot_grow_fall_back_and_equal_the_loop(model_type: type) -> None:
    model = model_type().eval()
    site = "layers.0" if model_type is Twice else "layers.2"
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    features = [(..., [0, 1]), (..., slice(2, 6))]
    with rows_seen([model.layers[0]]) as seen:
        result = activation_patching(
            model,
            x,
            y,
            [site],
            over=each_index(features),
            metric=lambda out: out,
            per_pair=True,
            reuse="layers",
        )
    compare(result, loop_sweep(model, y, x, [(site, "output")], features, lambda out: out))
    # The grown forward was refused, then the chunk ran with every cell on every layer.
    assert seen[0][2:] == [(3, 8), (6, 8)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_batch_norm_in_training_mode_turns_layer_reuse_off() -> None:
    model = Normed().train()
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with rows_seen([model.layers[0]]) as seen:
        activation_patching(
            model, x, y, ["layers.2"], over=each_index([[0], [1]]), metric=lambda out: out
        )
    assert seen[0][2:] == [(8, 8)]  # both cells on the first layer: nothing was shared
    model.eval()
    with rows_seen([model.layers[0]]) as seen:
        result = activation_patching(
            model,
            x,
            y,
            ["layers.2"],
            over=each_index([[0], [1]]),
            metric=lambda out: out,
            per_pair=True,
        )
    assert seen[0][2:] == [(4, 8)]
    compare(
        result,
        loop_sweep(model, y, x, [("layers.2", "output")], [(..., [0]), (..., [1])], lambda o: o),
    )


def test_a_layer_used_twice_turns_layer_reuse_off() -> None:
    """The same module at two places of the stack: a join there would grow the batch twice."""
    torch.manual_seed(5)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), shared).eval()
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    features = [(..., [0, 1]), (..., slice(2, 6))]
    with rows_seen([model[1]]) as seen:
        result = activation_patching(
            model,
            x,
            y,
            ["3"],
            over=each_index(features),
            metric=lambda out: out[:, 0] - out[:, 1],
            per_pair=True,
        )
    assert seen[0][2:] == [(6, 8)]
    reference = loop_sweep(model, y, x, [("3", "output")], features, lambda o: o[:, 0] - o[:, 1])
    compare(result, reference)


@pytest.mark.parametrize("costs", [(1.0, 0.0), (0.0, 1.0)])
def test_merged_and_separate_position_groups(
    gpt2_model: nn.Module, monkeypatch: pytest.MonkeyPatch, costs: tuple[float, float]
) -> None:
    """Cells of several first positions run in one forward from the earliest (a forward's
    fixed cost dominates) or one forward per position (its cost per position does)."""
    from hookfn.patching import _chunks

    monkeypatch.setattr(_chunks, "_forward_costs", lambda runner, whole: costs)
    clean, corrupted = padded(2, "left", at=(3,))
    with rows_seen([gpt2_model.transformer.h[2]]) as seen:
        result = activation_patching(
            gpt2_model,
            clean,
            corrupted,
            resid_pre(gpt2_model),
            over=each_position(),
            metric=logit_diff(3, 5),
            per_pair=True,
        )
    patched = seen[0][2:]
    if costs[0]:
        assert patched == [(2 * 11, SEQ - 3)]  # 11 cells: position 3 of block 0, 3..7 of 1, 2
    else:
        # Merged only where the shared blocks save more than the extra positions cost.
        assert len(patched) > 1
        assert patched[-1] == (2 * 2, 1)
    names = names_of(gpt2_model, resid_pre(gpt2_model))
    reference = loop_sweep(
        gpt2_model,
        corrupted,
        clean,
        [(n, "input") for n in names],
        POSITIONS,
        at_last_real(clean["attention_mask"]),
    )
    compare(result, reference)


def test_chunks_and_batch_sizes(gpt2_model: nn.Module) -> None:
    """Chunks of any size (cells sorted by the layer they join at) give the same values."""
    clean, corrupted = padded(2, "left", at=(1, 6))
    kwargs: dict[str, Any] = {
        "over": (each_position(), each_head()),
        "metric": logit_diff(3, 5),
        "per_pair": True,
    }
    sites = head_out(gpt2_model)
    want = activation_patching(gpt2_model, clean, corrupted, sites, reuse="none", **kwargs)
    for batch_size in (1, 2, 6, 30, 1000):
        got = activation_patching(
            gpt2_model, clean, corrupted, sites, batch_size=batch_size, **kwargs
        )
        torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)


def test_reuse_takes_known_values(gpt2_model: nn.Module) -> None:
    clean, corrupted = prompt_pair()
    with pytest.raises(SpecError, match="reuse="):
        activation_patching(
            gpt2_model,
            clean,
            corrupted,
            resid_pre(gpt2_model),
            metric=logit_diff(3, 5),
            reuse="everything",  # type: ignore[arg-type]
        )
