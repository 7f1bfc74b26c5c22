"""Step-aware edits (`on_prompt`, `on_generated`, `on_calls`, `from_step`, `when`) against
raw forward hooks that count the calls themselves, on generated tokens and logits."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest
import torch
import transformers
from reference import first, with_first
from torch import Tensor

from hookfn import (
    Args,
    Hook,
    Site,
    SpecError,
    add,
    from_step,
    on_calls,
    on_generated,
    on_prompt,
    run_with_hooks,
    scale,
    steer,
    when,
)

N_NEW = 6
LAYER = "transformer.h.0"


@pytest.fixture(scope="module")
def model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def _ids() -> Tensor:
    return torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(1))


VECTOR = torch.randn(32, generator=torch.Generator().manual_seed(2)) * 8


def _generate_raw(
    model: transformers.GPT2LMHeadModel, active: Callable[[int], bool], use_cache: bool = True
) -> tuple[Tensor, Tensor]:
    """Greedy generation with a plain forward hook that adds VECTOR on the calls ``active``
    picks, counting the calls itself; returns the tokens and the stacked logits."""
    calls = [0]

    def hook(module: torch.nn.Module, args: object, out: object) -> object:
        i = calls[0]
        calls[0] += 1
        if active(i):
            return with_first(out, first(out) + VECTOR)
        return None

    handle = model.get_submodule(LAYER).register_forward_hook(hook)
    try:
        result = model.generate(
            _ids(), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=N_NEW,
            do_sample=False, output_scores=True, return_dict_in_generate=True,
            use_cache=use_cache, pad_token_id=0,
        )  # fmt: skip
    finally:
        handle.remove()
    return result.sequences, torch.stack(result.scores)


def _generate(
    model: transformers.GPT2LMHeadModel, edit: object, use_cache: bool = True
) -> tuple[Tensor, Tensor]:
    args = Args(
        _ids(), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=N_NEW,
        do_sample=False, output_scores=True, return_dict_in_generate=True,
        use_cache=use_cache, pad_token_id=0,
    )  # fmt: skip
    result, _ = run_with_hooks(
        model, args, {LAYER: Hook(edit, output=False)}, forward=model.generate
    )
    return result.sequences, torch.stack(result.scores)


def _odd_call(site: Site) -> bool:
    return site.call % 2 == 1


CASES = [
    ("on_prompt", on_prompt(add(VECTOR)), lambda i: i == 0),
    ("on_generated", on_generated(add(VECTOR)), lambda i: i >= 1),
    ("from_step_3", from_step(3, add(VECTOR)), lambda i: i >= 3),
    ("on_calls", on_calls([1, 4], add(VECTOR)), lambda i: i in (1, 4)),
    ("when", when(_odd_call, add(VECTOR)), lambda i: i % 2 == 1),
]


@pytest.mark.parametrize(("name", "edit", "active"), CASES, ids=[c[0] for c in CASES])
def test_step_edits_equal_raw_hooks(
    model: transformers.GPT2LMHeadModel,
    name: str,
    edit: object,
    active: Callable[[int], bool],
) -> None:
    want_tokens, want_logits = _generate_raw(model, active)
    tokens, logits = _generate(model, edit)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    # The edit does something: the logits differ from an unedited generation.
    _plain_tokens, plain_logits = _generate_raw(model, lambda i: False)
    assert not torch.equal(logits, plain_logits)


def test_from_step_leaves_the_first_tokens(model: transformers.GPT2LMHeadModel) -> None:
    # from_step(k): the first k generated tokens (logits of calls 0..k-1) are unchanged.
    plain_tokens, plain_logits = _generate_raw(model, lambda i: False)
    tokens, logits = _generate(model, from_step(3, steer(VECTOR, 40.0)))
    assert torch.equal(logits[:3], plain_logits[:3])
    assert torch.equal(tokens[:, : 5 + 3], plain_tokens[:, : 5 + 3])
    assert not torch.equal(logits[3:], plain_logits[3:])
    assert not torch.equal(tokens, plain_tokens)


def test_without_cache_a_call_is_a_whole_forward(model: transformers.GPT2LMHeadModel) -> None:
    # Without the KV cache each call runs the whole sequence: call k still counts steps.
    want_tokens, want_logits = _generate_raw(model, lambda i: i >= 2, use_cache=False)
    tokens, logits = _generate(model, from_step(2, add(VECTOR)), use_cache=False)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)


def test_site_kind_in_a_predicate() -> None:
    x = torch.zeros(2)
    module = torch.nn.Identity()
    edit = when(_is_input, add(1.0))
    assert torch.equal(edit(x, Site("a", call=0, kind="input", module=module)), torch.ones(2))
    assert edit(x, Site("a", call=0, kind="output", module=module)) is x


def _is_input(site: Site) -> bool:
    return site.kind == "input"


def test_inactive_call_returns_x_itself() -> None:
    x = torch.randn(3)
    site = Site("a", call=1, kind="output", module=torch.nn.Identity())
    assert on_prompt(add(1.0))(x, site) is x
    assert from_step(2, scale(0.0))(x, site) is x


def test_repr_equality_pickle() -> None:
    edits = [
        on_prompt(add(1.0)),
        on_generated(scale(2.0)),
        from_step(3, steer(torch.ones(4), 2.0)),
        on_calls([2, 0], add(1.0)),
        when(_odd_call, add(1.0)),
    ]
    assert [repr(e) for e in edits] == [
        "on_prompt(add(1.0))",
        "on_generated(scale(2.0))",
        "from_step(3, steer(tensor(shape=(4,), dtype=torch.float32), alpha=2.0))",
        "on_calls([0, 2], add(1.0))",
        "when(_odd_call, add(1.0))",
    ]
    for edit in edits:
        copy = pickle.loads(pickle.dumps(edit))
        assert copy == edit
        assert hash(copy) == hash(edit)
        assert repr(copy) == repr(edit)
    assert on_calls(0, add(1.0)) == on_prompt(add(1.0))
    assert from_step(1, add(1.0)) == on_generated(add(1.0))
    assert from_step(1, add(1.0)) != from_step(2, add(1.0))
    assert on_prompt(add(1.0)) != on_prompt(add(2.0))
    assert on_prompt(add(1.0)) >> add(2.0) == on_prompt(add(1.0)) >> add(2.0)


def test_lambda_predicate_does_not_pickle() -> None:
    edit = when(lambda site: site.call == 0, add(1.0))
    assert repr(edit).startswith("when(")
    assert "<lambda>" in repr(edit)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(edit)


@pytest.mark.parametrize(
    "build",
    [
        lambda: from_step(-1, add(1.0)),
        lambda: from_step(1.5, add(1.0)),
        lambda: from_step(True, add(1.0)),
        lambda: on_calls([], add(1.0)),
        lambda: on_calls([0, -2], add(1.0)),
        lambda: on_calls("0", add(1.0)),
        lambda: on_prompt(3),
        lambda: when(3, add(1.0)),
    ],
)
def test_bad_arguments_are_spec_errors(build: Callable[[], object]) -> None:
    with pytest.raises(SpecError):
        build()
