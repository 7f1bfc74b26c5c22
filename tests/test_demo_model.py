"""The shipped demo model: weights load, it solves its task, and it is shaped like GPT-2."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from reference import raw_hooks, raw_run
from torch import nn

from hookfn.demo import (
    DEMO_CONFIG,
    KEYS,
    N_PAIRS,
    QUERY_POSITION,
    SEP,
    SEQ_LEN,
    TOKEN_TO_ID,
    VALUES,
    VOCAB,
    WEIGHTS_PATH,
    TinyGPT,
    TinyGPTConfig,
    decode,
    encode,
    load_model,
    make_batch,
    make_patching_pair,
)
from hookfn.demo.model import MLP, Block, CausalSelfAttention


@pytest.fixture(scope="module")
def model() -> TinyGPT:
    """The shipped model, loaded once for the module; tests must not modify it."""
    return load_model()


def _answer_from_text(prompt: str) -> str:
    """Solve a prompt from its text alone: the digit bound to the query key."""
    *bindings, sep, query = prompt.split()
    assert sep == SEP
    (value,) = [b[1] for b in bindings if b[0] == query]
    return value


def _predict(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids)
    return logits[:, QUERY_POSITION].argmax(dim=-1)


# --- weights -------------------------------------------------------------------------------------


def test_weights_file_is_small_and_loads_with_weights_only() -> None:
    assert WEIGHTS_PATH.is_file()
    assert WEIGHTS_PATH.stat().st_size < 500_000
    state_dict = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    fresh = TinyGPT(DEMO_CONFIG)
    assert set(state_dict) == set(fresh.state_dict())
    for name, tensor in fresh.state_dict().items():
        assert state_dict[name].shape == tensor.shape, name


def test_load_model_is_eval_float32_and_tied(model: TinyGPT) -> None:
    assert isinstance(model, TinyGPT)
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config == DEMO_CONFIG


def test_load_model_returns_independent_copies() -> None:
    first, second = load_model(), load_model()
    with torch.no_grad():
        first.transformer.wte.weight.zero_()
    assert second.transformer.wte.weight.abs().sum() > 0


# --- the task ------------------------------------------------------------------------------------


def test_model_solves_fresh_batches(model: TinyGPT) -> None:
    generator = torch.Generator().manual_seed(2024)
    input_ids, targets = make_batch(2000, generator)
    accuracy = float((_predict(model, input_ids) == targets).float().mean())
    assert accuracy > 0.9


def test_batch_targets_match_prompt_text() -> None:
    input_ids, targets = make_batch(200, torch.Generator().manual_seed(7))
    assert input_ids.shape == (200, SEQ_LEN)
    assert input_ids.dtype == torch.long
    assert targets.shape == (200,)
    for row, target in zip(input_ids, targets, strict=True):
        prompt = decode(row)
        assert decode(target) == _answer_from_text(prompt)
        keys = [token[0] for token in prompt.split()[:N_PAIRS]]
        assert len(set(keys)) == N_PAIRS


def test_model_answers_a_handwritten_prompt(model: TinyGPT) -> None:
    prompt = "a3 c7 b1 e7 g0 d2 | c"
    assert decode(_predict(model, encode(prompt)[None])[0]) == "7"


def test_encode_decode_round_trip() -> None:
    ids = encode("a3 c7 b1 e7 g0 d2 | c")
    assert ids.tolist() == encode("a3c7b1e7g0d2|c").tolist()
    assert decode(ids) == "a3 c7 b1 e7 g0 d2 | c"
    assert decode(ids.tolist()) == decode(ids)
    assert decode(torch.tensor(TOKEN_TO_ID["7"])) == "7"
    assert decode(encode("a 3")) == "a 3"
    assert len(VOCAB) == len(set(VOCAB)) == len(KEYS) + len(VALUES) + 1 + len(KEYS) * len(VALUES)


@pytest.mark.parametrize("bad", ["a3 x", "A3", "c7 ?"])
def test_encode_rejects_unknown_tokens(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown token"):
        encode(bad)


def test_decode_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode([len(VOCAB)])
    with pytest.raises(ValueError, match="at most one dimension"):
        decode(torch.zeros(2, 2, dtype=torch.long))


def test_patching_pair_differs_in_one_binding_value() -> None:
    pair = make_patching_pair(100, torch.Generator().manual_seed(3), pair_index=2)
    assert pair.position == 2
    differs = pair.clean_ids != pair.corrupted_ids
    assert differs[:, pair.position].all()
    assert differs.sum().item() == 100
    assert (pair.clean_targets != pair.corrupted_targets).all()
    for clean, corrupted, clean_target, corrupted_target in zip(
        pair.clean_ids,
        pair.corrupted_ids,
        pair.clean_targets,
        pair.corrupted_targets,
        strict=True,
    ):
        clean_binding, corrupted_binding = decode(clean[2]), decode(corrupted[2])
        assert clean_binding[0] == corrupted_binding[0]  # same key, different value
        assert decode(clean_target) == _answer_from_text(decode(clean))
        assert decode(corrupted_target) == _answer_from_text(decode(corrupted))
    with pytest.raises(ValueError, match="pair_index"):
        make_patching_pair(1, pair_index=N_PAIRS)


def _patch(position: int, source: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An output with the activation at ``position`` replaced by ``source``'s."""

    def patch(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, position] = source[:, position]
        return output

    return patch


def test_patching_clean_into_corrupted_restores_the_clean_answer(model: TinyGPT) -> None:
    pair = make_patching_pair(300, torch.Generator().manual_seed(11), pair_index=1)
    last = f"transformer.h.{DEMO_CONFIG.n_layer - 1}"
    names = ["transformer.wte", "transformer.h.0.attn", last]
    _, clean = raw_run(model, pair.clean_ids, capture=names)

    def restored(name: str, position: int) -> float:
        with raw_hooks(model, {name: _patch(position, clean[name])}):
            predictions = _predict(model, pair.corrupted_ids)
        return float((predictions == pair.clean_targets).float().mean())

    corrupted = _predict(model, pair.corrupted_ids)
    assert float((corrupted == pair.corrupted_targets).float().mean()) > 0.9
    # The corrupted token itself, and the query position after the last block: trivially.
    assert restored("transformer.wte", pair.position) > 0.9
    assert restored(last, QUERY_POSITION) > 0.9
    # The shipped model moves the value to the query position in block 0's attention.
    assert restored("transformer.h.0.attn", QUERY_POSITION) > 0.9
    # Positions that carry nothing about the queried value restore nothing.
    assert restored("transformer.wte", N_PAIRS) < 0.1
    assert restored(last, pair.position) < 0.1


# --- architecture --------------------------------------------------------------------------------


def test_module_names_mirror_gpt2(model: TinyGPT) -> None:
    modules = dict(model.named_modules())
    expected: dict[str, type[nn.Module]] = {
        "transformer": nn.Module,
        "transformer.wte": nn.Embedding,
        "transformer.wpe": nn.Embedding,
        "transformer.h": nn.ModuleList,
        "transformer.ln_f": nn.LayerNorm,
        "lm_head": nn.Linear,
    }
    for i in range(DEMO_CONFIG.n_layer):
        block = f"transformer.h.{i}"
        expected |= {
            block: Block,
            f"{block}.ln_1": nn.LayerNorm,
            f"{block}.attn": CausalSelfAttention,
            f"{block}.attn.c_attn": nn.Linear,
            f"{block}.attn.c_proj": nn.Linear,
            f"{block}.ln_2": nn.LayerNorm,
            f"{block}.mlp": MLP,
            f"{block}.mlp.c_fc": nn.Linear,
            f"{block}.mlp.act": nn.GELU,
            f"{block}.mlp.c_proj": nn.Linear,
        }
    for name, kind in expected.items():
        assert name in modules, name
        assert isinstance(modules[name], kind), name
    assert f"transformer.h.{DEMO_CONFIG.n_layer}" not in modules
    # Attention has no submodules besides its two projections.
    attn_children = {name for name, _ in modules["transformer.h.0.attn"].named_children()}
    assert attn_children == {"c_attn", "c_proj"}


def test_every_module_returns_a_plain_tensor(model: TinyGPT) -> None:
    kinds: dict[str, type] = {}
    handles = [
        module.register_forward_hook(
            lambda module, args, output, name=name: kinds.__setitem__(name, type(output))
        )
        for name, module in model.named_modules()
        if not isinstance(module, nn.ModuleList)
    ]
    try:
        logits = model(make_batch(2, torch.Generator().manual_seed(0))[0])
    finally:
        for handle in handles:
            handle.remove()
    assert type(logits) is torch.Tensor
    assert logits.shape == (2, SEQ_LEN, len(VOCAB))
    assert kinds
    assert all(kind is torch.Tensor for kind in kinds.values()), kinds


def test_logits_are_causal(model: TinyGPT) -> None:
    input_ids, _ = make_batch(8, torch.Generator().manual_seed(5))
    for t in range(SEQ_LEN):
        changed = input_ids.clone()
        changed[:, t] = (changed[:, t] + 1) % len(VOCAB)
        with torch.no_grad():
            before, after = model(input_ids), model(changed)
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-5)
        assert not torch.allclose(after[:, t:], before[:, t:])


def test_forward_mode_ad_matches_finite_differences(model: TinyGPT) -> None:
    double = copy.deepcopy(model).double()
    input_ids, _ = make_batch(2, torch.Generator().manual_seed(9))
    hidden = double.transformer.wte(input_ids) + double.transformer.wpe(torch.arange(SEQ_LEN))
    tangent = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)).double()

    def head(x: torch.Tensor) -> torch.Tensor:
        for block in double.transformer.h:
            x = block(x)
        out: torch.Tensor = double.lm_head(double.transformer.ln_f(x))
        return out

    with torch.no_grad():
        jvp_out = torch.func.jvp(head, (hidden,), (tangent,))[1]
        eps = 1e-6
        finite = (head(hidden + eps * tangent) - head(hidden - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(jvp_out, finite, rtol=1e-5, atol=1e-6)


def test_forward_rejects_bad_inputs(model: TinyGPT) -> None:
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        model(torch.zeros(1, DEMO_CONFIG.n_ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(DEMO_CONFIG.n_ctx, dtype=torch.long))


def test_config_is_frozen_and_validated() -> None:
    config = TinyGPTConfig(vocab_size=10)
    assert config.d_head == config.d_model // config.n_head
    with pytest.raises(AttributeError):
        config.n_layer = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="divisible"):
        TinyGPTConfig(vocab_size=10, d_model=30, n_head=4)
    with pytest.raises(ValueError, match="positive"):
        TinyGPTConfig(vocab_size=0)
