"""Op sites (``"module:op"``), attention patterns on sdpa models, and component names
(``blocks.0.attn.hook_z``) on unmodified transformers models, each against an independent
reference: eager attention's ``output_attentions``, the projections computed by hand, raw
forward hooks, TransformerLens's patching functions."""

from __future__ import annotations

import asyncio
import copy
import math
import threading
from typing import Any

import pytest
import torch
import transformers
from conftest import snapshot_hooks
from reference import raw_run
from torch import Tensor, nn

from hookfn import (
    Args,
    Hook,
    LayerNotFoundError,
    SpecError,
    ablate,
    add,
    components,
    register_components,
    run_with_hooks,
)

transformers.utils.logging.set_verbosity_error()
VOCAB = 100


def make(kind: str, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    common: dict[str, Any] = {"vocab_size": VOCAB, "attn_implementation": attn}
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0, **common
        )
        return transformers.GPT2LMHeadModel(config).eval()
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, **common,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "neox":
        config = transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, rotary_pct=0.5, **common,
        )  # fmt: skip
        return transformers.GPTNeoXForCausalLM(config).eval()
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, **common,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def inputs(kind: str) -> dict[str, Tensor]:
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if kind in ("llama", "bert"):  # padding: left for a decoder, right for an encoder
        mask[1, :2] = 0 if kind == "llama" else 1
        mask[1, -2:] = 1 if kind == "llama" else 0
    return {"input_ids": ids, "attention_mask": mask}


def eager_patterns(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    for module in eager.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    with torch.no_grad():
        return eager(**batch, output_attentions=True).attentions  # type: ignore[no-any-return]


ATTENTION = {
    "gpt2": "transformer.h.{}.attn",
    "llama": "model.layers.{}.self_attn",
    "neox": "gpt_neox.layers.{}.attention",
    "bert": "encoder.layer.{}.attention.self",
}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox", "bert"])
def test_patterns_on_sdpa_equal_eager_output_attentions(kind: str) -> None:
    model = make(kind)
    batch = inputs(kind)
    expected = eager_patterns(model, batch)
    with torch.no_grad():
        plain = model(**batch)
        out, caches = run_with_hooks(
            model, batch, ["blocks.*.attn.hook_pattern", ATTENTION[kind].format(1) + ":pattern"]
        )
    for layer, want in enumerate(expected):
        got = caches[f"blocks.{layer}.attn.hook_pattern"].output
        mask = batch["attention_mask"]
        if kind == "llama":  # the query rows of left padding see nothing: compare real rows
            got, want = (
                got[mask.bool()[:, None, :].expand(-1, got.shape[1], -1)],
                want[mask.bool()[:, None, :].expand(-1, want.shape[1], -1)],
            )
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        caches[ATTENTION[kind].format(1) + ":pattern"].output,
        caches["blocks.1.attn.hook_pattern"].output,
    )
    first = "last_hidden_state" if kind == "bert" else "logits"
    torch.testing.assert_close(out[first], plain[first], atol=1e-5, rtol=1e-5)


def test_pattern_of_an_eager_attention_is_its_softmax() -> None:
    model = make("gpt2", attn="eager")
    batch = inputs("gpt2")
    expected = eager_patterns(model, batch)
    with torch.no_grad():
        _, caches = run_with_hooks(model, batch, ["blocks.*.attn.hook_pattern"])
    for layer, want in enumerate(expected):
        torch.testing.assert_close(caches[f"blocks.{layer}.attn.hook_pattern"].output, want)


def _heads(x: Tensor, n: int) -> Tensor:
    b, s, _ = x.shape
    return x.view(b, s, n, -1).transpose(1, 2)


def test_qkv_and_z_equal_the_projections_by_hand_on_gpt2() -> None:
    model = make("gpt2")
    batch = inputs("gpt2")
    block = model.transformer.h[0]  # type: ignore[attr-defined, index]
    _, raw = raw_run(model, batch, capture=["transformer.h.0.ln_1"])
    with torch.no_grad():
        q, k, v = block.attn.c_attn(raw["transformer.h.0.ln_1"]).split(32, dim=-1)
        _, caches = run_with_hooks(
            model, batch, ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
                           "blocks.0.attn.hook_z"],
        )  # fmt: skip
    for name, want in (("q", q), ("k", k), ("v", v)):
        torch.testing.assert_close(caches[f"blocks.0.attn.hook_{name}"].output, _heads(want, 4))
    seen: list[Tensor] = []
    handle = block.attn.c_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    torch.testing.assert_close(caches["blocks.0.attn.hook_z"].output, seen[0].view(2, 6, 4, 8))


def test_q_and_k_are_after_the_rotary_embedding_on_llama() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = make("llama")
    batch = inputs("llama")
    attn = model.model.layers[0].self_attn  # type: ignore[attr-defined, index]
    _, raw = raw_run(model, batch, capture=["model.layers.0.input_layernorm"])
    x = raw["model.layers.0.input_layernorm"]
    with torch.no_grad():
        q = _heads(attn.q_proj(x), 4)
        k = _heads(attn.k_proj(x), 2)
        v = _heads(attn.v_proj(x), 2)
        positions = torch.arange(6)[None].expand(2, -1)
        cos, sin = model.model.rotary_emb(x, positions)  # type: ignore[attr-defined]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        _, caches = run_with_hooks(model, batch, ["blocks.0.attn.hook_*"])
    torch.testing.assert_close(caches["blocks.0.attn.hook_q"].output, q)
    for name, want in (("k", k), ("v", v)):
        got = caches[f"blocks.0.attn.hook_{name}"].output
        if got.shape[1] != want.shape[1]:  # the attention repeated the key/value heads
            want = want.repeat_interleave(got.shape[1] // want.shape[1], dim=1)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox", "bert"])
def test_residual_and_output_components_equal_raw_hooks(kind: str) -> None:
    model = make(kind)
    batch = inputs(kind)
    names = components(model)
    assert "blocks.1.attn.hook_pattern" in names
    with torch.no_grad():
        _, caches = run_with_hooks(model, batch, ["blocks.0.*", "blocks.0.mlp.hook_post"])
    captured = {}
    handles = []

    def keep(name: str, where: str) -> Any:
        def before(module: nn.Module, args: Any, kwargs: Any) -> None:
            captured.setdefault(name, (args[0] if args else next(iter(kwargs.values()))).clone())

        def after(module: nn.Module, args: Any, out: Any) -> None:
            captured.setdefault(name, (out[0] if isinstance(out, tuple) else out).clone())

        return before if where == "input" else after

    for component, text in names.items():
        if not component.startswith("blocks.0.") or "attn.hook_" in component:
            continue
        where, path = text.split(" ", 1)
        module = model.get_submodule(path)
        if where == "input":
            handles.append(
                module.register_forward_pre_hook(keep(component, where), with_kwargs=True)
            )
        else:
            handles.append(module.register_forward_hook(keep(component, where)))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured) >= 5  # (GPT-NeoX's parallel residual has no resid_mid)
    for component, want in captured.items():
        torch.testing.assert_close(caches[component].output, want)


def test_head_out_patching_equals_transformer_lens() -> None:
    pytest.importorskip("transformer_lens.model_bridge.sources")
    from test_patching_transformer_lens import _tl
    from transformer_lens import patching
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    from hookfn.patching import activation_patching, each_index, logit_diff

    model = make("gpt2")
    inner = copy.deepcopy(model)
    bridge = build_bridge_from_module(inner, "GPT2LMHeadModel", hf_config=inner.config).eval()
    generator = torch.Generator().manual_seed(2)
    clean = torch.randint(1, VOCAB, (2, 6), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(1, VOCAB, (2,), generator=generator)
    want = _tl(patching.get_act_patch_attn_head_out_all_pos, bridge, clean, corrupted)
    got = activation_patching(
        model, clean, corrupted, "blocks.*.attn.hook_z", over=each_index(list(range(4)), dim=-2),
        metric=logit_diff(3, 5),
    )  # fmt: skip
    assert got.values.shape == want.shape
    torch.testing.assert_close(got.values, want.float(), atol=1e-5, rtol=0)
    assert want.max() - want.min() > 1e-3


def _attention_by_hand(block: nn.Module, x: Tensor, edit: Any) -> Tensor:
    """GPT-2's attention, computed op by op, with ``edit`` applied to its pattern."""
    q, k, v = (_heads(t, 4) for t in block.attn.c_attn(x).split(32, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    pattern = edit(torch.softmax(scores.masked_fill(~causal, float("-inf")), -1))
    z = (pattern @ v).transpose(1, 2).reshape(x.shape)
    return block.attn.c_proj(z)


def test_pattern_edit_equals_a_hand_edited_attention() -> None:
    model = make("gpt2")
    ids = inputs("gpt2")["input_ids"]
    block = model.transformer.h[0]  # type: ignore[attr-defined, index]

    def zero_head(p: Tensor) -> Tensor:
        p = p.clone()
        p[:, 1] = 0
        return p

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        return (_attention_by_hand(block, args[0], zero_head), *out[1:])

    handle = block.attn.register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        out, _ = run_with_hooks(model, ids, {"blocks.0.attn.hook_pattern": ablate(1, dim=1)})
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


def test_gradient_with_respect_to_the_pattern_under_torch_func() -> None:
    model = make("gpt2")
    ids = inputs("gpt2")["input_ids"]
    mask = torch.ones_like(ids)
    block = model.transformer.h[0]  # type: ignore[attr-defined, index]

    def through_hookfn(delta: Tensor) -> Tensor:
        out, _ = run_with_hooks(
            model,
            {"input_ids": ids, "attention_mask": mask},
            {"blocks.0.attn.hook_pattern": add(delta)},
        )
        return out.logits[:, -1, :3].sum()  # type: ignore[no-any-return]

    def by_hand(delta: Tensor) -> Tensor:
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            return (_attention_by_hand(block, args[0], lambda p: p + delta), *out[1:])

        handle = block.attn.register_forward_hook(hook)
        try:
            return model(ids).logits[:, -1, :3].sum()  # type: ignore[no-any-return]
        finally:
            handle.remove()

    delta = 0.01 * torch.randn(2, 4, 6, 6)
    grad = torch.func.grad(through_hookfn)(delta)
    leaf = delta.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(by_hand(leaf), [leaf])
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
    _, caches = run_with_hooks(
        model, ids, {"blocks.0.attn.hook_pattern": Hook(grad=True)},
        backward=lambda out: out.logits[:, -1, :3].sum(),
    )  # fmt: skip
    zero = torch.zeros_like(delta, requires_grad=True)
    (at_zero,) = torch.autograd.grad(by_hand(zero), [zero])
    torch.testing.assert_close(caches["blocks.0.attn.hook_pattern"].grad_output, at_zero)


# -- op sites in general ------------------------------------------------------------------


def _demo_attention_by_hand(attn: nn.Module, x: Tensor, edit: Any) -> Tensor:
    """The demo model's attention, op by op, with ``edit`` applied to its softmax."""
    b, s, d = x.shape
    q, k, v = (t.view(b, s, 4, 16).transpose(1, 2) for t in attn.c_attn(x).split(d, dim=-1))
    scores = (q @ k.transpose(-2, -1)) / 4.0
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    pattern = edit(torch.softmax(scores.masked_fill(~causal, torch.finfo(x.dtype).min), -1))
    return attn.c_proj((pattern @ v).transpose(1, 2).reshape(b, s, d))  # type: ignore[no-any-return]


def test_op_sites_capture_and_edit_torch_function_calls() -> None:
    from hookfn.demo import load_model

    model = load_model()
    ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    name = "transformer.h.0.attn"
    attn = model.get_submodule(name)
    seen: dict[str, Tensor] = {}

    def keep(module: nn.Module, args: Any, out: Tensor) -> None:
        seen["x"] = args[0]

    handle = attn.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(ids)
            x = seen["x"]
            by_hand = {}
            _demo_attention_by_hand(attn, x, lambda p: by_hand.setdefault("pattern", p))
    finally:
        handle.remove()
    with torch.no_grad():
        _, caches = run_with_hooks(
            model, ids, {f"{name}:softmax": Hook(input=True), f"{name}:matmul.1": "capture"}
        )
    torch.testing.assert_close(caches[f"{name}:softmax"].output, by_hand["pattern"])
    assert caches[f"{name}:softmax"].input.shape == (2, 4, 8, 8)  # the scores
    assert caches[f"{name}:matmul.1"].output.shape == (2, 4, 8, 16)  # pattern @ values
    # An edit of the op's result equals the attention computed by hand with that edit.
    factor = torch.rand(2, 4, 8, 8)
    with torch.no_grad():
        out, _ = run_with_hooks(model, ids, {f"{name}:softmax": lambda p: p * factor})
        expected, _ = raw_run(
            model,
            ids,
            {name: lambda y: _demo_attention_by_hand(attn, seen["x"], lambda p: p * factor)},
        )
    torch.testing.assert_close(out, expected)


def test_op_keys_are_checked() -> None:
    model = make("gpt2")
    with pytest.raises(SpecError, match="after ':'"):
        run_with_hooks(model, inputs("gpt2"), ["transformer.h.0.attn:soft max"])
    with pytest.raises(LayerNotFoundError):
        run_with_hooks(model, inputs("gpt2"), ["transformer.h.9.attn:softmax"])


def test_layers_lists_op_sites_and_components() -> None:
    from hookfn import layers

    model = make("gpt2")
    rows = {info.name: info for info in layers(model, inputs("gpt2"), ops=True)}
    only = layers(model, inputs("gpt2"), "transformer.h.0.attn", ops=True).names
    assert only[0] == "transformer.h.0.attn"
    assert "transformer.h.0.attn:scaled_dot_product_attention" in only
    assert all(name.startswith("transformer.h.0.attn:") for name in only[1:])  # its own ops
    sdpa = rows["transformer.h.0.attn:scaled_dot_product_attention"]
    assert (sdpa.type, sdpa.shape, sdpa.calls) == ("op", (2, 4, 6, 8), 1)
    assert rows["blocks.1.attn.hook_pattern"].shape == (2, 4, 6, 6)
    assert rows["blocks.0.attn.hook_z"].shape == (2, 6, 4, 8)
    assert not any(name.endswith((":view", ":transpose")) for name in rows)
    assert set(components(model)) <= set(rows)
    with torch.no_grad():  # each listed op key names what it lists
        _, caches = run_with_hooks(model, inputs("gpt2"), [sdpa.name])
    assert caches[sdpa.name].output.shape == sdpa.shape


def test_unknown_architecture_says_how_to_add_one() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(LayerNotFoundError, match="register_components"):
        run_with_hooks(model, torch.randn(1, 4), ["blocks.0.hook_resid_pre"])
    with pytest.raises(LayerNotFoundError, match="hook_resid_pre"):
        run_with_hooks(make("gpt2"), inputs("gpt2"), ["blocks.0.hook_resid_prex"])


def test_register_components_for_another_architecture() -> None:
    model = make("gpt2")
    register_components(
        "gpt2-custom", "h", {"hook_in": ("input", "mlp"), "attn.hook_w": ("pattern", "attn")}
    )
    try:
        model.config.model_type = "gpt2-custom"
        with torch.no_grad():
            _, caches = run_with_hooks(
                model, inputs("gpt2"), ["blocks.1.hook_in", "blocks.0.attn.hook_w"]
            )
            _, raw = raw_run(model, inputs("gpt2"), capture=["transformer.h.1.ln_2"])
        torch.testing.assert_close(caches["blocks.1.hook_in"].output, raw["transformer.h.1.ln_2"])
        assert caches["blocks.0.attn.hook_w"].output.shape == (2, 4, 6, 6)
    finally:
        model.config.model_type = "gpt2"
    with pytest.raises(SpecError, match="where"):
        register_components("x", "h", {"a": ("middle", "")})


# -- call scope: nothing leaks ---------------------------------------------------------------


def test_the_function_mode_is_call_scoped() -> None:
    model = make("gpt2")
    batch = inputs("gpt2")
    before = snapshot_hooks(model)
    other: list[int] = []
    go, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        go.wait()
        with torch.no_grad():
            model(**batch)
        other.append(torch._C._len_torch_function_stack())
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()

    def forward(**kwargs: Any) -> Any:
        go.set()
        done.wait(30)
        return model(**kwargs)

    with torch.no_grad():
        _, caches = run_with_hooks(model, batch, ["blocks.*.attn.hook_pattern"], forward=forward)
    thread.join()
    assert len(caches["blocks.0.attn.hook_pattern"].outputs) == 1  # this run's call only

    async def task() -> int:
        with torch.no_grad():
            _, c = run_with_hooks(model, batch, ["blocks.0.attn.hook_pattern"])
        return len(c["blocks.0.attn.hook_pattern"].outputs)

    async def both() -> list[int]:
        return list(await asyncio.gather(task(), task()))

    assert asyncio.run(both()) == [1, 1]

    class Boom(Exception):
        pass

    def explode(module: nn.Module, args: Any) -> None:
        raise Boom

    handle = model.transformer.h[0].mlp.register_forward_pre_hook(explode)  # type: ignore[attr-defined, index]
    try:
        with pytest.raises(Boom):
            run_with_hooks(model, batch, ["transformer.h.0:softmax", "blocks.0.attn.hook_q"])
    finally:
        handle.remove()
    assert torch._C._len_torch_function_stack() == 0
    assert snapshot_hooks(model) == before
    assert other == [0]


def test_components_work_with_patch_from_and_the_patching_sweeps() -> None:
    from hookfn import patch_from
    from hookfn.patching import (
        activation_patching,
        attribution_patching,
        each_position,
        logit_diff,
        resid_pre,
    )

    model = make("gpt2")
    clean = inputs("gpt2")["input_ids"]
    corrupted = clean.clone()
    corrupted[:, 2] = 7
    with torch.no_grad():
        expected = model(clean).logits
        _, cache = run_with_hooks(model, clean, ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre"])
        # Every head of block 0 and the whole residual stream into block 1: the clean run.
        out, _ = run_with_hooks(
            model,
            corrupted,
            {
                "blocks.0.attn.hook_z": patch_from(cache),
                "blocks.1.hook_resid_pre": patch_from(cache),
            },
        )
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    metric = logit_diff(3, 5)
    by_module = resid_pre(model)  # the blocks' inputs, named as modules
    for sweep in (activation_patching, attribution_patching):
        by_component = sweep(
            model, clean, corrupted, "blocks.*.hook_resid_pre", over=each_position(), metric=metric
        )
        reference = sweep(model, clean, corrupted, by_module, over=each_position(), metric=metric)
        torch.testing.assert_close(by_component.values, reference.values, atol=1e-5, rtol=1e-5)


def test_op_sites_and_components_on_a_compiled_model() -> None:
    model = make("gpt2")
    batch = inputs("gpt2")
    compiled = torch.compile(model, backend="eager")
    keys = ["transformer.h.0.attn:sdpa", "blocks.0.attn.hook_pattern"]
    with torch.no_grad():
        compiled(**batch)
        _, plain = run_with_hooks(model, batch, keys)
        _, through = run_with_hooks(compiled, batch, keys)  # hooked modules run eagerly
    for key in keys:
        torch.testing.assert_close(through[key].output, plain[key].output)


# -- found by trying to break them -------------------------------------------------------------


def test_grouped_query_heads_in_a_decode_step_are_every_head() -> None:
    # transformers packs the one-token query of a grouped-query model into the key/value
    # heads; the sites still see [batch, heads, 1, keys], equal to eager attention's.
    model = make("llama")
    batch = inputs("llama")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        first = model(ids, attention_mask=mask, use_cache=True)
        step = first.logits[:, -1].argmax(-1, keepdim=True)
        longer = torch.cat([mask, torch.ones_like(step)], 1)
        cache = copy.deepcopy(first.past_key_values)
        out, caches = run_with_hooks(
            model,
            {"input_ids": step, "attention_mask": longer, "past_key_values": cache},
            ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_q"],
        )
        plain = model(
            step, attention_mask=longer, past_key_values=copy.deepcopy(first.past_key_values)
        )
        eager = copy.deepcopy(model)
        eager.config._attn_implementation = "eager"
        want = eager(
            step, attention_mask=longer, past_key_values=copy.deepcopy(first.past_key_values),
            output_attentions=True,
        ).attentions[0]  # fmt: skip
    assert caches["blocks.0.attn.hook_q"].output.shape == (2, 4, 1, 8)
    torch.testing.assert_close(caches["blocks.0.attn.hook_pattern"].output, want)
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)


def test_a_float_mask_row_of_only_minus_infinity_gives_zero_weights_not_nan() -> None:
    model = make("llama")
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.full((1, 1, 5, 5), float("-inf")).triu(1)
    mask[0, 0, 0, :] = float("-inf")  # query 0 may see nothing
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        out, caches = run_with_hooks(
            model, {"input_ids": ids, "attention_mask": mask}, ["blocks.0.attn.hook_pattern"]
        )
    assert not plain.isnan().any()
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(caches["blocks.0.attn.hook_pattern"].output[0, :, 0], torch.zeros(4, 5))


def test_a_nested_run_stopped_early_leaves_no_function_mode() -> None:
    from hookfn import TraceMultiple

    model = make("gpt2", attn="eager")
    ids = inputs("gpt2")["input_ids"]
    with torch.no_grad(), TraceMultiple(model, {"transformer.h.0.attn:softmax": "capture"}) as tm:
        run_with_hooks(model, ids, {"transformer.h.0.attn": "capture"}, stop_early=True)
        assert torch._C._len_torch_function_stack() == 0
        torch.softmax(torch.zeros(3), 0)  # outside the model: not a site's call
        model(ids)
    assert torch._C._len_torch_function_stack() == 0
    # The softmax of the stopped forward (the attention ran before the stop) and of the last
    # one; not the one called outside the model.
    assert [tuple(t.shape) for t in tm["transformer.h.0.attn:softmax"].capture.outputs] == [
        (2, 4, 6, 6),
        (2, 4, 6, 6),
    ]


def test_an_op_site_counts_the_calls_its_module_makes_itself() -> None:
    from hookfn import layers

    model = make("gpt2")
    ids = inputs("gpt2")["input_ids"]
    listed = {row.name: row for row in layers(model, ids, "transformer.h.0", ops=True)}
    with torch.no_grad():
        _, caches = run_with_hooks(model, ids, ["transformer.h.0:add", "transformer.h.0:add.1"])
        _, raw = raw_run(model, ids, capture=["transformer.h.0"])
    adds = caches["transformer.h.0:add"].outputs  # the block's two residual additions
    assert len(adds) == listed["transformer.h.0:add"].calls == 2
    torch.testing.assert_close(adds[1], raw["transformer.h.0"])  # the second is the output
    torch.testing.assert_close(caches["transformer.h.0:add.1"].output, raw["transformer.h.0"])


def test_an_exact_op_key_or_component_wins_over_a_glob_of_the_same() -> None:
    model = make("gpt2")
    ids = inputs("gpt2")["input_ids"]
    with torch.no_grad():
        _, alone = run_with_hooks(model, ids, {"transformer.h.0.attn:pattern": ablate(1, dim=1)})
        _, both = run_with_hooks(
            model,
            ids,
            {
                "transformer.h.*.attn:pattern": "capture",
                "transformer.h.0.attn:pattern": ablate(1, dim=1),
                "blocks.*.attn.hook_z": "capture",
                "blocks.0.attn.hook_z": ablate(2, dim=-2),
                "transformer.h.*": "capture",  # ('*' does not take an op site's ':')
            },
        )
    pattern = both["transformer.h.0.attn:pattern"].output
    assert torch.equal(pattern[:, 1], torch.zeros_like(pattern[:, 1]))
    assert torch.equal(both["blocks.0.attn.hook_z"].output[:, :, 2], torch.zeros(2, 6, 8))
    assert "transformer.h.1.attn:pattern" in both
    assert not any(
        name.startswith("transformer.h.") and ":" in name and "attn" not in name for name in both
    )
    torch.testing.assert_close(pattern, alone["transformer.h.0.attn:pattern"].output)


def test_op_keys_of_the_attention_take_no_call_index_and_dunder_names_work() -> None:
    model = make("gpt2", attn="eager")
    ids = inputs("gpt2")["input_ids"]
    with pytest.raises(SpecError, match="no call index"):
        run_with_hooks(model, ids, ["transformer.h.0.attn:pattern.1"])
    with torch.no_grad():
        _, caches = run_with_hooks(model, ids, ["transformer.h.0.attn:__matmul__"])
    assert caches["transformer.h.0.attn:__matmul__"].n_calls == 2  # scores, then weights @ v


def test_components_of_a_wrapped_model() -> None:
    model = make("gpt2")
    assert components(nn.DataParallel(model)) == components(model)


def test_an_op_site_its_module_never_calls_says_so() -> None:
    from hookfn import CaptureError

    model = make("gpt2")
    with torch.no_grad():
        _, caches = run_with_hooks(model, inputs("gpt2"), ["transformer.h.0.mlp:q"])
    with pytest.raises(CaptureError, match=r"ops=True"):
        caches["transformer.h.0.mlp:q"].output  # noqa: B018


class Recursive(nn.Module):
    """Adds 1, calls itself ``depth`` times, then doubles: each call makes one add."""

    def forward(self, x: Tensor, depth: int) -> Tensor:
        y = torch.add(x, 1)
        if depth:
            y = self(y, depth - 1)
        return torch.mul(y, 2)


def test_op_sites_in_a_recursive_module_count_each_call_on_its_own() -> None:
    model = nn.Sequential()
    model.add_module("r", Recursive())
    x = torch.zeros(1)

    def run(spec: dict[str, Any]) -> Tensor:
        out, _ = run_with_hooks(
            model, Args(x, depth=1), spec, forward=lambda x, depth: model.r(x, depth)
        )
        return out  # type: ignore[no-any-return]

    # By hand: ((0 + 1 + 10) + 1 + 10) * 2 * 2 with every add edited; no call makes a second add.
    assert run({"r:add": add(10.0)}).item() == ((0 + 1 + 10) + 1 + 10) * 4
    with pytest.warns(Warning, match="never called"):
        assert run({"r:add.1": add(10.0)}).item() == ((0 + 1) + 1) * 4


def test_the_modules_own_hooks_are_not_its_forwards_calls() -> None:
    model = make("gpt2")
    ids = inputs("gpt2")["input_ids"]
    with torch.no_grad():
        _, alone = run_with_hooks(model, ids, ["transformer.h.0:add.0"])
        _, beside = run_with_hooks(
            model,
            ids,
            {
                "transformer.h.0": Hook(edit_input=add(0.0), output=False),
                "transformer.h.0:add.0": "capture",
            },
        )
    torch.testing.assert_close(
        beside["transformer.h.0:add.0"].output, alone["transformer.h.0:add.0"].output
    )


def test_a_double_star_op_key_reaches_every_module_below() -> None:
    model = make("gpt2", attn="eager")
    ids = inputs("gpt2")["input_ids"]
    with torch.no_grad():  # (most modules below call no softmax: they record nothing)
        _, caches = run_with_hooks(model, ids, {"transformer.**:softmax": "capture"})
    called = [name for name, capture in caches.items() if capture.n_calls]
    assert called == ["transformer.h.0.attn:softmax", "transformer.h.1.attn:softmax"]


def test_a_stop_inside_a_users_function_mode_leaves_the_users_mode_alone() -> None:
    from torch.overrides import TorchFunctionMode

    from hookfn import TraceMultiple

    class Count(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            return func(*args, **(kwargs or {}))

    model = make("gpt2", attn="eager")
    ids = inputs("gpt2")["input_ids"]
    spec = {"transformer.h.0.attn:softmax": "capture"}
    with torch.no_grad(), TraceMultiple(model, spec, stop_early=True) as tm, Count():
        model(ids)  # the stop ends the block inside the user's mode
    assert torch._C._len_torch_function_stack() == 0
    assert tm["transformer.h.0.attn:softmax"].capture.output.shape == (2, 4, 6, 6)


def test_two_spellings_of_one_op_site_are_refused_and_in_place_ops_are_their_own() -> None:
    model = make("gpt2")
    ids = inputs("gpt2")["input_ids"]
    with pytest.raises(SpecError, match="two spellings"):
        run_with_hooks(
            model,
            ids,
            ["transformer.h.0.attn:sdpa", "transformer.h.0.attn:scaled_dot_product_attention"],
        )
    from hookfn._ops import op_name

    assert (op_name(torch.Tensor.add_), op_name(torch.Tensor.__matmul__)) == ("add_", "matmul")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_written_out_attention_matches_sdpa_in_low_precision(dtype: torch.dtype) -> None:
    from hookfn._ops import explicit_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=generator).to(dtype) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)  # float32 beside low-precision values, as a user may pass
    mask[1, :, :, :2] = torch.finfo(torch.float32).min
    mask[0, :, 0, :] = torch.finfo(torch.float32).min  # a row that sees nothing
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(dtype))
    got = explicit_attention(q, k, v, attn_mask=mask, pattern=lambda w: w)
    assert got.dtype == dtype
    torch.testing.assert_close(got[:, :, 1:], want[:, :, 1:], atol=2e-2, rtol=2e-2)


def test_keys_and_values_of_a_grouped_query_model_are_its_key_value_heads_in_every_step() -> None:
    model = make("llama")
    batch = inputs("llama")
    with torch.no_grad():
        _, caches = run_with_hooks(
            model,
            Args(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2,
                 do_sample=False, pad_token_id=0),
            ["blocks.0.attn.hook_k", "blocks.0.attn.hook_q"],
            forward=model.generate,
        )  # fmt: skip
    assert [tuple(t.shape) for t in caches["blocks.0.attn.hook_k"].outputs] == [
        (2, 2, 6, 8),
        (2, 2, 7, 8),
    ]
    assert [tuple(t.shape)[:3] for t in caches["blocks.0.attn.hook_q"].outputs] == [
        (2, 4, 6),
        (2, 4, 1),
    ]
