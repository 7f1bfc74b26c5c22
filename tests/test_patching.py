"""`activation_patching` against a hand-written loop of one forward per cell (raw torch hooks,
`test_patching_reference.loop_sweep`), for every sweep kind, model family and execution path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import snapshot_hooks
from test_patching_reference import (
    gpt2,
    llama,
    logit_diff_of,
    loop_sweep,
    primary_of,
    prompt_pair,
)
from torch import Tensor, nn

from hookfn import EditError, HookfnError, LayerNotFoundError, SpecError, run_with_hooks
from hookfn.demo import load_model
from hookfn.patching import (
    Sites,
    activation_patching,
    attn_out,
    each_head,
    each_index,
    each_position,
    head_out,
    kl_to_clean,
    logit_diff,
    mlp_out,
    probability,
    resid_post,
    resid_pre,
)

ATOL = 1e-5
SEQ = 8
D = 32
DH = 8  # 4 heads of width 8


@pytest.fixture(scope="module")
def gpt2_model() -> nn.Module:
    return gpt2(n_layer=3)


@pytest.fixture(scope="module")
def llama_model() -> nn.Module:
    return llama()


def _compare(result: Any, reference: Tensor) -> None:
    """A per-pair result ``[pair, site, ...]`` against the loop's ``[site, cell, pair]``."""
    want = reference.permute(2, 0, 1).reshape(result.values.shape)
    torch.testing.assert_close(result.values, want, atol=ATOL, rtol=0)
    assert want.max() - want.min() > 20 * ATOL, "the sweep must have effects to compare"


def _positions(seq: int = SEQ) -> list[Any]:
    return [(slice(None), p) for p in range(seq)]


def _heads(n: int = 4, width: int = DH) -> list[Any]:
    return [(..., slice(h * width, (h + 1) * width)) for h in range(n)]


def _blocks(prefix: str, n: int, tail: str = "") -> list[str]:
    return [f"{prefix}.{i}{tail}" for i in range(n)]


# (sites factory, reference sites, over, reference indices)
GPT2_CASES: dict[str, tuple[Callable[[nn.Module], Any], list[tuple[str, str]], Any, list[Any]]] = {
    "resid_pre x position": (
        resid_pre,
        [(b, "input") for b in _blocks("transformer.h", 3)],
        each_position(),
        _positions(),
    ),
    "resid_post x position": (
        resid_post,
        [(b, "output") for b in _blocks("transformer.h", 3)],
        each_position(),
        _positions(),
    ),
    "attn_out x position": (
        attn_out,
        [(b, "output") for b in _blocks("transformer.h", 3, ".attn")],
        each_position(),
        _positions(),
    ),
    "mlp_out x position": (
        mlp_out,
        [(b, "output") for b in _blocks("transformer.h", 3, ".mlp")],
        each_position(),
        _positions(),
    ),
    "head_out x head": (
        head_out,
        [(b, "input") for b in _blocks("transformer.h", 3, ".attn.c_proj")],
        each_head(),
        _heads(),
    ),
    "head_out x position x head": (
        head_out,
        [(b, "input") for b in _blocks("transformer.h", 3, ".attn.c_proj")],
        (each_position(), each_head()),
        [(slice(None), p, slice(h * DH, (h + 1) * DH)) for p in range(SEQ) for h in range(4)],
    ),
    "attn_out whole": (
        attn_out,
        [(b, "output") for b in _blocks("transformer.h", 3, ".attn")],
        None,
        [(...,)],
    ),
    "features": (
        lambda m: "transformer.h.*",
        [(b, "output") for b in _blocks("transformer.h", 3)],
        each_index([[0, 1, 2], slice(8, 20), 31]),
        [(..., [0, 1, 2]), (..., slice(8, 20)), (..., 31)],
    ),
}


@pytest.mark.parametrize("case", list(GPT2_CASES))
@pytest.mark.parametrize("causal", [None, False])
def test_gpt2_sweeps_equal_the_loop(gpt2_model: nn.Module, case: str, causal: bool | None) -> None:
    sites, reference_sites, over, indices = GPT2_CASES[case]
    clean, corrupted = prompt_pair(at=(3, 5))
    result = activation_patching(
        gpt2_model,
        clean,
        corrupted,
        sites(gpt2_model),
        over=over,
        metric=logit_diff(3, 5),
        per_pair=True,
        causal=causal,
    )
    reference = loop_sweep(gpt2_model, corrupted, clean, reference_sites, indices, logit_diff_of())
    _compare(result, reference)
    assert result.labels[1] == tuple(name for name, _ in reference_sites)


@pytest.mark.parametrize(
    ("sites", "reference_sites", "over", "indices"),
    [
        (
            resid_pre,
            [(b, "input") for b in _blocks("model.layers", 2)],
            each_position(),
            _positions(),
        ),
        (
            head_out,
            [(b, "input") for b in _blocks("model.layers", 2, ".self_attn.o_proj")],
            each_head(),
            _heads(),
        ),
        (
            mlp_out,
            [(b, "output") for b in _blocks("model.layers", 2, ".mlp")],
            each_position(),
            _positions(),
        ),
    ],
)
def test_llama_sweeps_equal_the_loop(
    llama_model: nn.Module, sites: Any, reference_sites: Any, over: Any, indices: Any
) -> None:
    clean, corrupted = prompt_pair(at=(2,))
    result = activation_patching(
        llama_model,
        clean,
        corrupted,
        sites(llama_model),
        over=over,
        metric=logit_diff(3, 5),
        per_pair=True,
    )
    _compare(
        result, loop_sweep(llama_model, corrupted, clean, reference_sites, indices, logit_diff_of())
    )


def test_demo_model_and_plain_module() -> None:
    model = load_model()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 97, (3, 8), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 5) % 97
    result = activation_patching(
        model,
        clean,
        corrupted,
        ["transformer.wte", "transformer.h.*"],
        over=each_position(),
        metric=logit_diff(1, 2),
        per_pair=True,
    )
    sites = [
        ("transformer.wte", "output"),
        ("transformer.h.0", "output"),
        ("transformer.h.1", "output"),
    ]
    _compare(result, loop_sweep(model, corrupted, clean, sites, _positions(), logit_diff_of(1, 2)))

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    metric = lambda out: out[:, 0] - out[:, 1]  # noqa: E731
    result = activation_patching(
        mlp,
        x,
        y,
        ["0", "2"],
        over=each_index([[0, 1], slice(4, 12), [15]]),
        metric=metric,
        per_pair=True,
    )
    indices = [(..., [0, 1]), (..., slice(4, 12)), (..., [15])]
    _compare(result, loop_sweep(mlp, y, x, [("0", "output"), ("2", "output")], indices, metric))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_token_masks_stacked_and_under_vmap(gpt2_model: nn.Module) -> None:
    clean, corrupted = prompt_pair(n=2, at=(1, 4, 6))
    first = torch.zeros(2, SEQ, dtype=torch.bool)
    first[0, [1, 2]] = True
    first[1, [4]] = True
    second = torch.zeros(2, SEQ, dtype=torch.bool)
    second[:, 4:] = True
    reference = loop_sweep(
        gpt2_model,
        corrupted,
        clean,
        [("transformer.h.1", "input")],
        [first, second],
        logit_diff_of(),
    )
    over = each_index([first, second], labels=["mixed", "tail"])
    mask = torch.ones_like(clean)
    for vmap in (False, True):
        result = activation_patching(
            gpt2_model,
            {"input_ids": clean, "attention_mask": mask},
            {"input_ids": corrupted, "attention_mask": mask},
            Sites("transformer.h.1", kind="input"),
            over=over,
            metric=logit_diff(3, 5),
            per_pair=True,
            vmap=vmap,
        )
        _compare(result, reference)
        assert result.labels[2] == ("mixed", "tail")


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_equals_the_loop_for_positions_and_heads(gpt2_model: nn.Module) -> None:
    clean, corrupted = prompt_pair(at=(2,))
    mask = torch.ones_like(clean)
    args = (
        {"input_ids": clean, "attention_mask": mask},
        {"input_ids": corrupted, "attention_mask": mask},
    )
    for sites, over, reference_sites, indices in [
        (
            resid_pre(gpt2_model),
            each_position(),
            [(b, "input") for b in _blocks("transformer.h", 3)],
            _positions(),
        ),
        (
            head_out(gpt2_model),
            each_head(),
            [(b, "input") for b in _blocks("transformer.h", 3, ".attn.c_proj")],
            _heads(),
        ),
    ]:
        result = activation_patching(
            gpt2_model,
            *args,
            sites,
            over=over,
            metric=logit_diff(3, 5),
            per_pair=True,
            vmap=True,
            batch_size=5,
        )
        _compare(
            result,
            loop_sweep(gpt2_model, corrupted, clean, reference_sites, indices, logit_diff_of()),
        )


def test_noising_patches_corrupted_into_clean(gpt2_model: nn.Module) -> None:
    clean, corrupted = prompt_pair(at=(3,))
    result = activation_patching(
        gpt2_model,
        clean,
        corrupted,
        resid_pre(gpt2_model),
        over=each_position(),
        metric=logit_diff(3, 5),
        mode="noise",
        per_pair=True,
    )
    sites = [(b, "input") for b in _blocks("transformer.h", 3)]
    _compare(result, loop_sweep(gpt2_model, clean, corrupted, sites, _positions(), logit_diff_of()))
    torch.testing.assert_close(result.base, result.clean)


def test_averaged_is_the_mean_of_per_pair(gpt2_model: nn.Module) -> None:
    clean, corrupted = prompt_pair(n=3)
    kwargs: dict[str, Any] = {"over": each_position(), "metric": logit_diff([3, 4, 5], [5, 6, 7])}
    per_pair = activation_patching(
        gpt2_model, clean, corrupted, "transformer.h.*", per_pair=True, **kwargs
    )
    averaged = activation_patching(gpt2_model, clean, corrupted, "transformer.h.*", **kwargs)
    assert per_pair.axes == ("pair", "site", "position")
    assert averaged.axes == ("site", "position")
    torch.testing.assert_close(averaged.values, per_pair.values.mean(0))
    torch.testing.assert_close(averaged.clean, per_pair.clean.mean())
    with torch.no_grad():
        logits = gpt2_model(clean).logits[:, -1]
    want = logits[[0, 1, 2], [3, 4, 5]] - logits[[0, 1, 2], [5, 6, 7]]
    torch.testing.assert_close(per_pair.clean, want)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_padding_aware_metric_at_the_last_real_position(
    gpt2_model: nn.Module, llama_model: nn.Module, side: str, model_name: str
) -> None:
    model = gpt2_model if model_name == "gpt2" else llama_model
    clean, corrupted = prompt_pair(n=3, at=(2,))
    mask = torch.ones_like(clean)
    lengths = [8, 6, 7]
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, length:] = 0
        else:
            mask[row, : SEQ - length] = 0
    last = torch.tensor([7, 5, 6]) if side == "right" else torch.full((3,), 7)

    def metric(output: Any) -> Tensor:
        logits = primary_of(output)[torch.arange(3), last]
        return logits[:, 3] - logits[:, 5]

    base = {"input_ids": corrupted, "attention_mask": mask}
    source = {"input_ids": clean, "attention_mask": mask}
    sites = resid_pre(model)
    blocks = [(b, "input") for b in site_names_of(model, sites)]
    reference = loop_sweep(model, base, source, blocks, _positions(), metric)
    for chosen in (logit_diff(3, 5), metric):
        result = activation_patching(
            model, source, base, sites, over=each_position(), metric=chosen, per_pair=True
        )
        _compare(result, reference)


def site_names_of(model: nn.Module, sites: Sites) -> list[str]:
    from hookfn import TraceMultiple

    return list(TraceMultiple(model, list(sites.keys)))


@pytest.mark.parametrize("align", ["end", {p: p + 2 for p in range(6)}])
def test_prompts_of_different_lengths(gpt2_model: nn.Module, align: Any) -> None:
    g = torch.Generator().manual_seed(4)
    clean = torch.randint(1, 100, (2, 8), generator=g)  # two tokens longer than corrupted
    corrupted = clean[:, 2:].clone()
    corrupted[:, 1] = (corrupted[:, 1] + 9) % 99 + 1
    result = activation_patching(
        gpt2_model,
        clean,
        corrupted,
        resid_pre(gpt2_model),
        over=each_position(),
        metric=logit_diff(3, 5),
        per_pair=True,
        align=align,
    )
    sites = [(b, "input") for b in _blocks("transformer.h", 3)]
    reference = loop_sweep(
        gpt2_model,
        corrupted,
        clean,
        sites,
        _positions(6),
        logit_diff_of(),
        source_of=lambda t: t[:, 2:],
    )
    _compare(result, reference)
    assert result.labels[2] == tuple(str(p) for p in range(6))


def test_metrics_probability_kl_callable_and_normalized() -> None:
    # The trained demo model: its next-token distributions are peaked, so every metric moves.
    from hookfn.demo import make_patching_pair

    model = load_model()
    pair = make_patching_pair(4, torch.Generator().manual_seed(0), pair_index=2)
    clean, corrupted, answer = pair.clean_ids, pair.corrupted_ids, pair.clean_targets
    sites = [(b, "input") for b in _blocks("transformer.h", 2)]
    with torch.no_grad():
        clean_lp = model(clean)[:, -1].log_softmax(-1)

    def prob(output: Tensor) -> Tensor:
        return output[:, -1].softmax(-1)[torch.arange(4), answer]

    def kl(output: Tensor) -> Tensor:
        lp = output[:, -1].log_softmax(-1)
        return (clean_lp.exp() * (clean_lp - lp)).sum(-1)

    for metric, reference_metric in [
        (probability(answer), prob),
        (kl_to_clean(), kl),
        (prob, prob),
    ]:
        result = activation_patching(
            model,
            clean,
            corrupted,
            resid_pre(model),
            over=each_position(),
            metric=metric,
            per_pair=True,
        )
        _compare(result, loop_sweep(model, corrupted, clean, sites, _positions(), reference_metric))
    kl_result = activation_patching(model, clean, corrupted, resid_pre(model), metric=kl_to_clean())
    assert float(kl_result.clean) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_result.corrupted) > 1.0
    result = activation_patching(
        model,
        clean,
        corrupted,
        resid_pre(model),
        over=each_position(),
        metric=logit_diff(answer, pair.corrupted_targets),
    )
    normalized = result.normalized()
    want = (result.values - result.corrupted) / (result.clean - result.corrupted)
    torch.testing.assert_close(normalized.values, want)
    # Block 0's input at the corrupted position is all that differs: patching it is the clean run.
    torch.testing.assert_close(normalized.values[0, 2], torch.tensor(1.0), atol=1e-4, rtol=0)
    assert float(normalized.values[0].abs().sum() - 1) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(
    "sizes", [{"batch_size": 1}, {"batch_size": 7}, {"memory": "2MB"}, {"memory": 10**9}]
)
def test_chunking_does_not_change_results(gpt2_model: nn.Module, sizes: dict[str, Any]) -> None:
    clean, corrupted = prompt_pair(n=2, at=(1,))
    kwargs: dict[str, Any] = {"over": (each_position(), each_head()), "metric": logit_diff(3, 5)}
    want = activation_patching(gpt2_model, clean, corrupted, head_out(gpt2_model), **kwargs)
    got = activation_patching(gpt2_model, clean, corrupted, head_out(gpt2_model), **sizes, **kwargs)
    torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)


@contextmanager
def seen_lengths(model: nn.Module, name: str) -> Iterator[list[tuple[int, int]]]:
    """The (batch, seq) of every call of ``name`` (a raw hook, to watch what runs)."""
    shapes: list[tuple[int, int]] = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda m, args: shapes.append(tuple(args[0].shape[:2]))  # type: ignore[func-returns-value]
    )
    try:
        yield shapes
    finally:
        handle.remove()


def test_exact_reuse_runs_less_and_equals_the_loop(gpt2_model: nn.Module) -> None:
    # The corrupted token is at position 5: cells before it change nothing (skipped), and
    # cells at later positions run on those positions only, on the cropped key/value cache.
    clean, corrupted = prompt_pair(n=1, at=(5,))
    with seen_lengths(gpt2_model, "transformer.wte") as shapes:
        result = activation_patching(
            gpt2_model,
            clean,
            corrupted,
            resid_pre(gpt2_model),
            over=each_position(),
            metric=lambda out: out.logits[:, -1, 3] - out.logits[:, -1, 5],
            per_pair=True,
        )
    patched = shapes[2:]  # after the clean and the corrupted run
    assert patched
    assert all(seq < SEQ for _, seq in patched)
    assert sum(rows * seq for rows, seq in patched) < 3 * SEQ * SEQ / 2
    sites = [(b, "input") for b in _blocks("transformer.h", 3)]
    _compare(result, loop_sweep(gpt2_model, corrupted, clean, sites, _positions(), logit_diff_of()))
    # Without reuse (causal=False) every cell runs every position, with the same results.
    with seen_lengths(gpt2_model, "transformer.wte") as shapes:
        plain = activation_patching(
            gpt2_model,
            clean,
            corrupted,
            resid_pre(gpt2_model),
            over=each_position(),
            metric=logit_diff(3, 5),
            per_pair=True,
            causal=False,
        )
    assert all(seq == SEQ for _, seq in shapes)
    torch.testing.assert_close(plain.values, result.values, atol=ATOL, rtol=0)


def test_source_cache_equals_source_inputs(gpt2_model: nn.Module, llama_model: nn.Module) -> None:
    clean, corrupted = prompt_pair(at=(3,))
    sites = Sites("transformer.h.*", kind="input")
    from hookfn import Hook

    _, cache = run_with_hooks(gpt2_model, clean, {"transformer.h.*": Hook(input=True)})
    kwargs: dict[str, Any] = {"over": each_position(), "metric": logit_diff(3, 5)}
    from_cache = activation_patching(gpt2_model, cache, corrupted, sites, **kwargs)
    from_inputs = activation_patching(gpt2_model, clean, corrupted, sites, **kwargs)
    torch.testing.assert_close(from_cache.values, from_inputs.values)
    assert torch.isnan(from_cache.clean).all()
    _, foreign = run_with_hooks(llama_model, clean, ["model.layers.0"])
    with pytest.raises(SpecError, match="another model"):
        activation_patching(
            gpt2_model, foreign, corrupted, "transformer.h.0", metric=logit_diff(3, 5)
        )
    wider = gpt2(n_layer=3, width=48)
    _, wide_cache = run_with_hooks(wider, clean, ["transformer.h.*"])
    with pytest.raises(EditError, match="another model"):
        activation_patching(
            gpt2_model, wide_cache, corrupted, "transformer.h.*", metric=logit_diff(3, 5)
        )


def test_labels_with_tokens_and_globs(gpt2_model: nn.Module) -> None:
    clean, corrupted = prompt_pair()
    words = [f"w{i}" for i in range(SEQ)]
    result = activation_patching(
        gpt2_model,
        clean,
        corrupted,
        "transformer.h.*.mlp",
        over=each_position(),
        metric=logit_diff(3, 5),
        tokens=words,
    )
    assert result.labels == (
        ("transformer.h.0.mlp", "transformer.h.1.mlp", "transformer.h.2.mlp"),
        tuple(f"{p} w{p}" for p in range(SEQ)),
    )

    class Tokenizer:
        def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
            return [f"<{i}>" for i in ids]

    result = activation_patching(
        gpt2_model,
        clean,
        corrupted,
        "transformer.h.0",
        over=each_position([0, -1]),
        metric=logit_diff(3, 5),
        tokens=Tokenizer(),
    )
    assert result.labels[1] == (f"0 <{int(corrupted[0, 0])}>", f"7 <{int(corrupted[0, 7])}>")


def test_progress_bar_runs(gpt2_model: nn.Module, capsys: pytest.CaptureFixture[str]) -> None:
    clean, corrupted = prompt_pair()
    activation_patching(
        gpt2_model,
        clean,
        corrupted,
        "transformer.h.*",
        over=each_position(),
        metric=logit_diff(3, 5),
        progress=True,
        batch_size=2,
    )
    assert "patching" in capsys.readouterr().err


# -- bad input: a clear HookfnError before any (patched) forward, nothing left registered ------


@contextmanager
def counted_forwards(model: nn.Module) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))  # type: ignore[func-returns-value]
    try:
        yield calls
    finally:
        handle.remove()


def _bad(
    model: nn.Module, clean: Any, corrupted: Any, sites: Any = "transformer.h.*", **kwargs: Any
) -> None:
    kwargs.setdefault("metric", logit_diff(3, 5))
    activation_patching(model, clean, corrupted, sites, **kwargs)


BEFORE_ANY_FORWARD = [
    ("shapes", {"corrupted": torch.zeros(2, 6, dtype=torch.long)}, SpecError, "align="),
    (
        "pairs",
        {"corrupted": torch.zeros(3, 8, dtype=torch.long)},
        SpecError,
        "one of each per prompt pair",
    ),
    ("mode", {"mode": "denoising"}, SpecError, "'denoise'"),
    ("over", {"over": "position"}, SpecError, "each_position"),
    ("tokens", {"metric": logit_diff([1, 2, 3], 4)}, SpecError, "3 token ids for 2 prompt pairs"),
    ("metric", {"metric": 3}, SpecError, "callable"),
    ("sizes", {"batch_size": 4, "memory": "1GB"}, SpecError, "not both"),
    ("memory", {"memory": "lots"}, SpecError, "'512MB'"),
    ("site", {"sites": "transformer.h.9"}, LayerNotFoundError, "transformer.h"),
    ("keys", {"sites": 3}, SpecError, "layer keys"),
    ("align", {"align": "start"}, SpecError, "'end'"),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "error", "match"), BEFORE_ANY_FORWARD, ids=[c[0] for c in BEFORE_ANY_FORWARD]
)
def test_bad_input_fails_before_any_forward(
    gpt2_model: nn.Module, case: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    clean, corrupted = prompt_pair()
    kwargs = {"corrupted": corrupted, **kwargs}
    before = snapshot_hooks(gpt2_model)
    with counted_forwards(gpt2_model) as calls, pytest.raises(error, match=match):
        _bad(gpt2_model, clean, **kwargs)
    assert calls == []
    assert snapshot_hooks(gpt2_model) == before


BEFORE_PATCHED_FORWARDS = [
    (
        "head split",
        {"sites": "transformer.h.*", "over": each_head(5)},
        EditError,
        "does not split into 5 heads",
    ),
    (
        "metric shape",
        {"metric": lambda out: out.logits[:, -1, 3].mean()},
        HookfnError,
        r"shape \[2\]",
    ),
    ("position", {"over": each_position([9])}, SpecError, "outside the 8 positions"),
    (
        "mask shape",
        {"over": each_index([torch.ones(3, 8, dtype=torch.bool)])},
        EditError,
        "does not fit 2 prompt pairs",
    ),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "error", "match"),
    BEFORE_PATCHED_FORWARDS,
    ids=[c[0] for c in BEFORE_PATCHED_FORWARDS],
)
def test_bad_shapes_fail_after_the_two_baseline_runs(
    gpt2_model: nn.Module, case: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    clean, corrupted = prompt_pair()
    before = snapshot_hooks(gpt2_model)
    with counted_forwards(gpt2_model) as calls, pytest.raises(error, match=match):
        _bad(gpt2_model, clean, corrupted, **kwargs)
    assert len(calls) == 2  # the clean and the corrupted run: they show the shapes
    assert snapshot_hooks(gpt2_model) == before


def test_sites_and_presets_name_the_usual_modules(
    gpt2_model: nn.Module, llama_model: nn.Module
) -> None:
    assert head_out(gpt2_model) == Sites("transformer.h.*.attn.c_proj", kind="input", n_heads=4)
    assert head_out(llama_model) == Sites(
        "model.layers.*.self_attn.o_proj", kind="input", n_heads=4
    )
    assert resid_pre(llama_model) == Sites("model.layers.*", kind="input")
    with pytest.raises(SpecError, match="no stack of blocks"):
        resid_pre(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(SpecError, match="kind"):
        Sites("x", kind="grad")  # type: ignore[arg-type]
