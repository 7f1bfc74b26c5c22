"""hookfn on transformers models (GPT-2, Llama, BERT), eager and sdpa attention.

References are raw ``register_forward_hook`` runs and transformers' own ``hidden_states`` /
``attentions`` outputs. Random weights from tiny configs; no hub access.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import snapshot_hooks
from reference import raw_hooks, raw_run
from torch import Tensor, nn

from hookfn import Args, Hook, add, run_with_hooks

transformers = pytest.importorskip("transformers")

VOCAB = 50
N_LAYERS = 2


@dataclass(frozen=True)
class Arch:
    """A tiny model family and the names of its parts."""

    id: str
    build: Callable[[], nn.Module]
    block: str  # format string with {i}
    attn: str
    mlp: str
    final_norm: str | None  # applied to the last block's output in hidden_states[-1]
    causal: bool

    def blocks(self) -> list[str]:
        return [self.block.format(i=i) for i in range(N_LAYERS)]


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=N_LAYERS,
        n_embd=32,
        n_head=4,
        n_positions=16,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        pad_token_id=0,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


ARCHS = [
    Arch("gpt2", _gpt2, "transformer.h.{i}", ".attn", ".mlp", "transformer.ln_f", True),
    Arch("llama", _llama, "model.layers.{i}", ".self_attn", ".mlp", "model.norm", True),
    Arch("bert", _bert, "encoder.layer.{i}", ".attention.self", ".output", None, False),
]
ATTN = ["eager", "sdpa"]


def _make(arch: Arch, attn: str) -> nn.Module:
    torch.manual_seed(0)
    model = arch.build().eval()
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    return model


def _inputs(seed: int = 1) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _hooked(model: nn.Module, inputs: Any, spec: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return run_with_hooks(model, inputs, spec, **kwargs)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_captures_equal_raw_hooks(arch: Arch, attn: str) -> None:
    model = _make(arch, attn)
    inputs = _inputs()
    names = [
        name for block in arch.blocks() for name in (block, block + arch.attn, block + arch.mlp)
    ]
    ref_out, ref = raw_run(model, inputs, capture=names)
    out, caches = _hooked(model, inputs, names)
    assert list(caches) == names
    for name in names:
        assert torch.equal(caches[name].output, ref[name]), name
    assert torch.equal(_logits(out), _logits(ref_out))


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_edits_equal_raw_hook_edits(arch: Arch, attn: str) -> None:
    # An edit of a block and of an attention module (a tuple output: the edit acts on its
    # first item) changes the model's output exactly as hand-written hooks do.
    model = _make(arch, attn)
    inputs = _inputs()
    block0, attn1 = arch.blocks()[0], arch.blocks()[1] + arch.attn
    steer = torch.randn(32)
    ref_out, _ = raw_run(model, inputs, {block0: lambda x: x + steer, attn1: lambda x: x * 0.5})
    plain_out, _ = raw_run(model, inputs)
    out, _ = _hooked(model, inputs, {block0: add(steer), attn1: lambda x: x * 0.5})
    torch.testing.assert_close(_logits(out), _logits(ref_out))
    assert not torch.allclose(_logits(out), _logits(plain_out))


@pytest.mark.parametrize("preinstalled", [True, False], ids=["hf-hooks-first", "hf-hooks-later"])
@pytest.mark.parametrize("layer", [0, N_LAYERS - 1])
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_edit_of_block_is_visible_in_hidden_states(
    arch: Arch, attn: str, layer: int, preinstalled: bool
) -> None:
    # transformers records hidden_states with forward hooks of its own. Whether those were
    # installed by an earlier call or are installed during the hooked one, the returned
    # hidden_states[i + 1] must hold block i's *edited* output.
    model = _make(arch, attn)
    inputs = _inputs()
    blocks = arch.blocks()
    twin = copy.deepcopy(model)  # the references run here, so they install nothing on model
    _, plain = raw_run(twin, inputs, capture=blocks)
    ref_out, _ = raw_run(
        twin, inputs, {blocks[layer]: lambda x: x + 1.0}, output_hidden_states=True
    )
    if preinstalled:
        raw_run(model, _inputs(seed=2), output_hidden_states=True)
    assert any(m._forward_hooks for m in model.modules()) == preinstalled

    out, caches = _hooked(
        model, Args(**inputs, output_hidden_states=True), {blocks[layer]: add(1.0)}
    )

    expected = plain[blocks[layer]] + 1.0
    torch.testing.assert_close(caches[blocks[layer]].output, expected, rtol=0, atol=0)
    hidden = out.hidden_states
    assert len(hidden) == N_LAYERS + 1
    if arch.final_norm is not None and layer == N_LAYERS - 1:
        expected = model.get_submodule(arch.final_norm)(expected)
    torch.testing.assert_close(hidden[layer + 1], expected)
    for i in range(len(hidden)):
        if i != layer + 1:  # layers after the edit: the edited run by raw hooks agrees
            torch.testing.assert_close(hidden[i], ref_out.hidden_states[i])
    torch.testing.assert_close(_logits(out), _logits(ref_out))


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_input_edit_of_first_block_is_visible_in_hidden_states(arch: Arch, attn: str) -> None:
    # hidden_states[0] is what the first block receives: an input edit there shows.
    model = _make(arch, attn)
    inputs = _inputs()
    raw_run(model, inputs, output_hidden_states=True)  # transformers' hooks first
    plain_out, _ = raw_run(model, inputs, output_hidden_states=True)
    block0 = arch.blocks()[0]
    out, caches = _hooked(
        model,
        Args(**inputs, output_hidden_states=True),
        {block0: Hook(edit_input=add(2.0), output=False, input=True)},
    )
    torch.testing.assert_close(out.hidden_states[0], plain_out.hidden_states[0] + 2.0)
    torch.testing.assert_close(caches[block0].input, plain_out.hidden_states[0] + 2.0)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_attention_weights_capture_equals_output_attentions(arch: Arch) -> None:
    # Eager attention returns (output, weights); the whole tuple stays reachable.
    model = _make(arch, "eager")
    inputs = _inputs()
    names = [block + arch.attn for block in arch.blocks()]
    out, caches = _hooked(model, Args(**inputs, output_attentions=True), names)
    assert len(out.attentions) == N_LAYERS
    for i, name in enumerate(names):
        weights = caches[name].raw_output[1]
        assert weights.shape == (2, 4, 6, 6)
        torch.testing.assert_close(weights, out.attentions[i], rtol=0, atol=0)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_transformers_hooks_survive_runs(arch: Arch, attn: str) -> None:
    model = _make(arch, attn)
    inputs = _inputs()
    blocks = arch.blocks()
    raw_run(model, inputs, output_hidden_states=True, output_attentions=True)
    installed = snapshot_hooks(model)
    assert sum(len(v) for v in installed.values()) >= N_LAYERS  # transformers' recorders

    spec = {blocks[0]: add(1.0), blocks[1] + arch.attn: "capture", blocks[1]: Hook(input=True)}
    _hooked(model, Args(**inputs, output_hidden_states=True), spec)

    def fail(x: Tensor) -> Tensor:
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        _hooked(model, Args(**inputs, output_hidden_states=True), {blocks[1]: fail})
    assert snapshot_hooks(model) == installed

    # ... and they still work: hidden_states equal the blocks' outputs taken by raw hooks.
    out, ref = raw_run(model, inputs, capture=blocks, output_hidden_states=True)
    for i, block in enumerate(blocks[:-1]):
        torch.testing.assert_close(out.hidden_states[i + 1], ref[block], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_hooks_installed_during_a_run_are_transformers_own(arch: Arch) -> None:
    # The first output_hidden_states call installs transformers' hooks for good. When that
    # call is a hooked one, exactly those stay behind, as with a plain call.
    model = _make(arch, "sdpa")
    twin = copy.deepcopy(model)
    inputs = _inputs()
    raw_run(twin, inputs, output_hidden_states=True)
    _hooked(model, Args(**inputs, output_hidden_states=True), {arch.blocks()[0]: add(1.0)})

    def counts(m: nn.Module) -> dict[str, int]:
        return {key: len(value) for key, value in snapshot_hooks(m).items()}

    assert counts(model) == counts(twin)
    out, ref = raw_run(model, inputs, capture=arch.blocks(), output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[1], ref[arch.blocks()[0]], rtol=0, atol=0)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.causal], ids=lambda a: a.id)
def test_generate_records_every_step(arch: Arch) -> None:
    model = _make(arch, "sdpa")
    ids = _inputs()["input_ids"]
    block = arch.blocks()[1]
    args = Args(ids, max_new_tokens=3, do_sample=False)

    with raw_hooks(model, capture=[block]) as ref:
        ref_tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
    store = ref[block]

    tokens, caches = run_with_hooks(model, args, [block], forward=model.generate)
    assert torch.equal(tokens, ref_tokens)
    assert caches[block].n_calls == len(store) == 3
    for got, want in zip(caches[block].outputs, store, strict=True):
        assert torch.equal(got, want)
    assert [o.shape[1] for o in caches[block].outputs] == [6, 1, 1]  # prefill, then 1 token


def test_gpt2_edit_steers_generation() -> None:
    # An edit at every generation step changes the generated tokens as a raw hook does.
    model = _make(ARCHS[0], "sdpa")
    ids = _inputs()["input_ids"]
    steer = torch.randn(32) * 5
    with raw_hooks(model, {"transformer.h.0": lambda h: h + steer}):
        ref_tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    tokens, _ = run_with_hooks(
        model,
        Args(ids, max_new_tokens=4, do_sample=False),
        {"transformer.h.0": Hook(add(steer), output=False)},
        forward=model.generate,
    )
    assert torch.equal(tokens, ref_tokens)
