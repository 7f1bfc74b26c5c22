"""``run_with_hooks`` under torch.func: grad, vjp, vmap, jvp, and ``params=`` / ``buffers=``.

References: plain autograd on a copy of the model with a raw forward hook, a Python loop of
runs, and a copy of the model whose weights were changed by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from reference import first, raw_backward, raw_hooks, raw_perturbation_grad, raw_run
from test_grad import gpt2, gpt2_inputs, gpt2_metric, state
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils.checkpoint import checkpoint

from hookfn import (
    Capture,
    Hook,
    HookfnError,
    SpecError,
    TransformError,
    add,
    run_with_hooks,
    steer,
)

LAYERS = ["transformer.h.0", "transformer.h.0.attn", "transformer.h.1.mlp"]
WIDTH = 32


# -- torch.func.grad / vjp: gradients w.r.t. an edit's argument ------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", ["vector", "activation"])
def test_grad_wrt_additive_perturbation_equals_autograd(attn: str, layer: str, shape: str) -> None:
    model, inputs = gpt2(attn), gpt2_inputs()
    before = state(model)
    delta = torch.zeros(WIDTH) if shape == "vector" else torch.zeros(2, 6, WIDTH)

    def metric_of(d: Tensor) -> Tensor:
        out, _ = run_with_hooks(model, inputs, {layer: add(d)})
        return gpt2_metric(out)

    got = grad(metric_of)(delta)
    assert torch.equal(got, raw_perturbation_grad(model, inputs, layer, delta, gpt2_metric))
    if shape == "activation":
        # the gradient w.r.t. an additive perturbation of the output is the gradient w.r.t.
        # the output itself: what Hook(grad=True) captures
        _, caches = run_with_hooks(model, inputs, {layer: Hook(grad=True)}, backward=gpt2_metric)
        assert torch.equal(got, caches[layer].grad_output)
    for name, value in model.state_dict(keep_vars=True).items():
        assert torch.equal(value, before[name])
        assert value.grad is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vjp_wrt_perturbation_equals_autograd(attn: str) -> None:
    model, inputs = gpt2(attn), gpt2_inputs()
    layer = "transformer.h.0.attn"
    delta = torch.zeros(2, 6, WIDTH)

    def metric_of(d: Tensor) -> Tensor:
        return gpt2_metric(run_with_hooks(model, inputs, {layer: add(d)})[0])

    value, pullback = vjp(metric_of, delta)
    (got,) = pullback(torch.ones(()))
    assert torch.equal(got, raw_perturbation_grad(model, inputs, layer, delta, gpt2_metric))
    assert torch.equal(value.detach(), gpt2_metric(model(**inputs)).detach())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grad_has_aux_returns_captures(attn: str) -> None:
    model, inputs = gpt2(attn), gpt2_inputs()
    layer, watched = "transformer.h.0", ["transformer.h.1.attn", "transformer.h.1"]
    vector = torch.randn(WIDTH, generator=torch.Generator().manual_seed(3))

    def metric_of(d: Tensor) -> tuple[Tensor, dict[str, Capture]]:
        out, caches = run_with_hooks(
            model, inputs, {layer: add(d), **{n: Hook(input=True) for n in watched}}
        )
        return gpt2_metric(out), caches

    _, caches = grad(metric_of, has_aux=True)(vector)
    _, seen = raw_run(model, inputs, {layer: lambda x: x + vector}, watched, whole=True)
    for name in watched:
        capture = caches[name]
        assert isinstance(capture, Capture)
        assert capture.n_calls == 1
        assert torch.equal(capture.output, first(seen[name]))
        # the rest of the structure survives: (out, None) from sdpa, (out, weights) from eager
        expected_rest = seen[name][1:] if isinstance(seen[name], tuple) else ()
        got_rest = capture.raw_output[1:] if isinstance(capture.raw_output, tuple) else ()
        assert [type(v) for v in got_rest] == [type(v) for v in expected_rest]
    assert caches["transformer.h.1"].raw_input.kwargs.keys()  # keyword flags came back too


def test_grad_of_metric_and_captured_grads_with_backward_inside_grad() -> None:
    # backward= inside torch.func.grad: the captured gradient is that of the metric, while
    # grad differentiates what the function returns.
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    layer, watched = "transformer.h.0", "transformer.h.1.mlp"
    delta = torch.zeros(WIDTH)

    def f(d: Tensor) -> tuple[Tensor, dict[str, Capture]]:
        out, caches = run_with_hooks(
            model, inputs, {layer: add(d), watched: Hook(grad=True)}, backward=gpt2_metric
        )
        return gpt2_metric(out), caches

    got, caches = grad(f, has_aux=True)(delta)
    _, plain = run_with_hooks(model, inputs, {watched: Hook(grad=True)}, backward=gpt2_metric)
    assert torch.equal(caches[watched].grad_output, plain[watched].grad_output)
    assert torch.equal(got, raw_perturbation_grad(model, inputs, layer, delta, gpt2_metric))


def test_grad_wrt_input_embeddings_with_jacrev() -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    embeds = model.transformer.wte(inputs["input_ids"]).detach()

    def last_logit(e: Tensor) -> Tensor:
        out, _ = run_with_hooks(
            model,
            {"inputs_embeds": e, "attention_mask": inputs["attention_mask"]},
            {"transformer.h.1": add(0.1)},
        )
        return out.logits[0, -1, :3]

    got = jacrev(last_logit)(embeds)
    reference = copy.deepcopy(model)
    leaf = embeds.clone().requires_grad_()
    with raw_hooks(reference, {"transformer.h.1": lambda h: h + 0.1}):
        logits = reference(inputs_embeds=leaf, attention_mask=inputs["attention_mask"]).logits
    rows = [torch.autograd.grad(logits[0, -1, i], leaf, retain_graph=True)[0] for i in range(3)]
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-6)


# -- vmap: a sweep in one batched call -------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("edit", ["add", "steer"])
def test_vmap_over_steering_vectors_equals_loop(attn: str, edit: str) -> None:
    model, inputs = gpt2(attn), gpt2_inputs()
    layer, watched = "transformer.h.0", ["transformer.h.1.attn", "transformer.h.1"]
    vectors = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(4))

    def make(v: Tensor) -> Any:
        return add(v) if edit == "add" else steer(v, 2.0)

    def manual(v: Tensor) -> Callable[[Tensor], Tensor]:
        return (lambda x: x + v) if edit == "add" else (lambda x: x + 2.0 * v / v.norm())

    def run(v: Tensor) -> tuple[Tensor, dict[str, Capture]]:
        out, caches = run_with_hooks(
            model, inputs, {layer: make(v), **dict.fromkeys(watched, "capture")}
        )
        return out.logits, caches

    with torch.no_grad():
        logits, caches = vmap(run)(vectors)
        for k, v in enumerate(vectors):
            expected_logits, seen = raw_run(model, inputs, {layer: manual(v)}, watched)
            torch.testing.assert_close(logits[k], expected_logits.logits, rtol=1e-5, atol=1e-5)
            for name in watched:
                torch.testing.assert_close(caches[name].output[k], seen[name], rtol=1e-5, atol=1e-5)
    assert caches[layer].output.shape == (4, 2, 6, WIDTH)
    if attn == "sdpa":  # the (out, None) of sdpa attention came back through vmap
        assert caches["transformer.h.1.attn"].raw_output[1] is None


def test_vmap_returns_captured_inputs_with_keyword_flags() -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    vectors = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(5))

    def run(v: Tensor) -> dict[str, Capture]:
        spec = {"transformer.h.0": add(v), "transformer.h.1": Hook(input=True)}
        return run_with_hooks(model, inputs, spec)[1]

    with torch.no_grad():
        caches = vmap(run)(vectors)
        _, plain = run_with_hooks(model, inputs, {"transformer.h.1": Hook(input=True)})
    raw = caches["transformer.h.1"].raw_input
    assert raw.kwargs.keys() == plain["transformer.h.1"].raw_input.kwargs.keys()
    for key, value in plain["transformer.h.1"].raw_input.kwargs.items():
        if not isinstance(value, Tensor):
            assert type(raw.kwargs[key]) is type(value), key
    assert caches["transformer.h.1"].input.shape == (3, 2, 6, WIDTH)


def test_vmap_of_grad_captures_a_gradient_per_vector() -> None:
    model, inputs = gpt2("eager"), gpt2_inputs()
    layer, watched = "transformer.h.0", "transformer.h.1.mlp"
    vectors = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(6))

    def f(v: Tensor) -> tuple[Tensor, dict[str, Capture]]:
        out, caches = run_with_hooks(
            model, inputs, {layer: add(v), watched: Hook(grad=True)}, backward=gpt2_metric
        )
        return gpt2_metric(out), caches

    grads, caches = vmap(grad(f, has_aux=True))(vectors)
    for k, v in enumerate(vectors):
        _, plain = run_with_hooks(
            model, inputs, {layer: add(v), watched: Hook(grad=True)}, backward=gpt2_metric
        )
        torch.testing.assert_close(
            caches[watched].grad_output[k], plain[watched].grad_output, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            grads[k],
            raw_perturbation_grad(model, inputs, layer, v, gpt2_metric),
            rtol=1e-4,
            atol=1e-5,
        )


def test_backward_directly_inside_vmap_is_a_transform_error() -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()

    def f(v: Tensor) -> Tensor:
        spec = {"transformer.h.0": Hook(add(v), grad=True)}
        return run_with_hooks(model, inputs, spec, backward=gpt2_metric)[0].logits

    with pytest.raises(TransformError, match=r"vmap\(grad\(f\)\)"):
        vmap(f)(torch.zeros(2, WIDTH))


# -- forward mode ------------------------------------------------------------------------------


def test_jvp_with_eager_attention_equals_directional_derivative() -> None:
    model, inputs = gpt2("eager"), gpt2_inputs()
    layer = "transformer.h.0.mlp"
    tangent = torch.randn(2, 6, WIDTH, generator=torch.Generator().manual_seed(7))
    delta = torch.zeros(2, 6, WIDTH)

    def metric_of(d: Tensor) -> Tensor:
        return gpt2_metric(run_with_hooks(model, inputs, {layer: add(d)})[0])

    _, derivative = jvp(metric_of, (delta,), (tangent,))
    expected = (raw_perturbation_grad(model, inputs, layer, delta, gpt2_metric) * tangent).sum()
    torch.testing.assert_close(derivative, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_forward_mode_through_sdpa_is_a_transform_error(
    transform: str, hook_snapshot: Callable[[nn.Module], Any]
) -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    before = hook_snapshot(model)

    def metric_of(d: Tensor) -> Tensor:
        return gpt2_metric(run_with_hooks(model, inputs, {"transformer.h.0": add(d)})[0])

    delta = torch.zeros(WIDTH)
    forward_mode: Callable[[], Any] = (
        (lambda: jvp(metric_of, (delta,), (torch.ones(WIDTH),)))
        if transform == "jvp"
        else (lambda: jacfwd(metric_of)(delta))
    )
    with pytest.raises(TransformError) as info:
        forward_mode()
    message = str(info.value)
    assert "scaled_dot_product" in message
    assert 'attn_implementation="eager"' in message
    assert isinstance(info.value.__cause__, NotImplementedError)
    assert isinstance(info.value, RuntimeError)  # callers catching RuntimeError still do
    assert hook_snapshot(model) == before


class Faulty(nn.Module):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.error = error

    def forward(self, x: Tensor) -> Tensor:
        self.lin(x)
        raise self.error


@pytest.mark.parametrize(
    "error",
    [RuntimeError("boom"), NotImplementedError("no kernel"), ValueError("bad value")],
    ids=["runtime", "not-implemented", "value"],
)
def test_unrelated_errors_are_not_wrapped(error: Exception) -> None:
    with pytest.raises(type(error)) as info:
        run_with_hooks(Faulty(error), torch.ones(2, 3), {"lin": "capture"})
    assert info.value is error
    assert not isinstance(info.value, HookfnError)


def test_checkpointing_inside_grad_is_a_transform_error() -> None:
    lin = nn.Linear(3, 3)

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: Tensor) -> Tensor:
            return checkpoint(self.lin, x, use_reentrant=False)

    model = Checkpointed()

    def f(v: Tensor) -> Tensor:
        return run_with_hooks(model, torch.ones(2, 3), {"lin": add(v)})[0].sum()

    with pytest.raises(TransformError, match="checkpoint"):
        grad(f)(torch.zeros(3))


# -- params= / buffers= -----------------------------------------------------------------------

PARAM_SWAPS: list[tuple[str, Callable[[Tensor], Tensor]]] = [
    ("transformer.h.0.mlp.c_proj.weight", torch.zeros_like),  # ablate a weight
    ("transformer.h.1.attn.c_attn.bias", lambda p: p + 0.5),
    ("transformer.ln_f.weight", lambda p: -p),
]


@pytest.mark.parametrize(("name", "change"), PARAM_SWAPS, ids=[n for n, _ in PARAM_SWAPS])
def test_params_equal_a_modified_copy(name: str, change: Callable[[Tensor], Tensor]) -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    before = state(model)
    new = change(model.get_parameter(name).detach())
    watched = ["transformer.h.0.mlp", "transformer.h.1.attn", "transformer.ln_f"]
    out, caches = run_with_hooks(
        model,
        inputs,
        {n: Hook(grad=True) for n in watched},
        params={name: new},
        backward=gpt2_metric,
    )
    modified = copy.deepcopy(model)
    with torch.no_grad():
        modified.get_parameter(name).copy_(new)
    expected_out, seen = raw_run(modified, inputs, {}, watched)
    torch.testing.assert_close(out.logits, expected_out.logits, rtol=0, atol=0)
    for layer in watched:
        assert torch.equal(caches[layer].output, seen[layer]), layer
    # the gradients too: autograd on the modified copy
    grads = raw_backward(modified, inputs, gpt2_metric, watched).grads
    for layer in watched:
        assert torch.equal(caches[layer].grad_output, grads[layer]), layer
    # the model itself is as it was
    for key, value in model.state_dict(keep_vars=True).items():
        assert torch.equal(value, before[key]), key
        assert value.grad is None
    assert not torch.equal(out.logits, model(**inputs).logits)


def test_params_of_a_tied_weight_swap_both_uses() -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    assert model.lm_head.weight is model.transformer.wte.weight
    new = model.transformer.wte.weight.detach() * 2.0
    out, _ = run_with_hooks(model, inputs, {}, params={"transformer.wte.weight": new})
    modified = copy.deepcopy(model)
    with torch.no_grad():
        modified.transformer.wte.weight.copy_(new)  # tied: lm_head changes with it
    assert torch.equal(out.logits, modified(**inputs).logits)


def test_buffers_equal_a_modified_copy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU()).eval()
    x = torch.randn(5, 3)
    mean = torch.randn(4)
    out, caches = run_with_hooks(model, x, ["1"], buffers={"1.running_mean": mean})
    modified = copy.deepcopy(model)
    modified[1].running_mean.copy_(mean)
    assert torch.equal(out, modified(x))
    assert torch.equal(caches["1"].output, modified[1](modified[0](x)))
    assert torch.equal(model[1].running_mean, torch.zeros(4))


def test_params_with_forward() -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    name = "transformer.h.0.mlp.c_fc.weight"
    new = torch.zeros_like(model.get_parameter(name))

    def last_logits(ids: Tensor) -> Tensor:
        return model(input_ids=ids).logits[:, -1]

    out, caches = run_with_hooks(
        model, inputs["input_ids"], ["transformer.h.0.mlp"], forward=last_logits, params={name: new}
    )
    modified = copy.deepcopy(model)
    with torch.no_grad():
        modified.get_parameter(name).zero_()
    expected, seen = raw_run(
        modified, {"input_ids": inputs["input_ids"]}, {}, ["transformer.h.0.mlp"]
    )
    assert torch.equal(out, expected.logits[:, -1])
    assert torch.equal(caches["transformer.h.0.mlp"].output, seen["transformer.h.0.mlp"])


def test_grad_wrt_params_through_hooks_equals_autograd() -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    name = "transformer.h.1.mlp.c_fc.weight"
    weight = model.get_parameter(name).detach()

    def metric_of(w: Tensor) -> Tensor:
        out, _ = run_with_hooks(model, inputs, {"transformer.h.0": add(0.25)}, params={name: w})
        return gpt2_metric(out)

    got = grad(metric_of)(weight)
    ref = raw_backward(model, inputs, gpt2_metric, edits={"transformer.h.0": lambda h: h + 0.25})
    assert torch.equal(got, ref.params[name])
    assert model.get_parameter(name).grad is None


def test_vmap_over_weight_scales_equals_loop() -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    name = "transformer.h.0.attn.c_proj.weight"
    weight = model.get_parameter(name).detach()
    factors = torch.tensor([0.0, 0.5, 1.0, 2.0])

    def run(f: Tensor) -> tuple[Tensor, Tensor]:
        spec = ["transformer.h.0.attn"]
        out, caches = run_with_hooks(model, inputs, spec, params={name: weight * f})
        return out.logits, caches["transformer.h.0.attn"].output

    with torch.no_grad():
        logits, outputs = vmap(run)(factors)
        for k, f in enumerate(factors):
            modified = copy.deepcopy(model)
            modified.get_parameter(name).mul_(f)
            expected, seen = raw_run(modified, inputs, {}, ["transformer.h.0.attn"])
            torch.testing.assert_close(logits[k], expected.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                outputs[k], seen["transformer.h.0.attn"], rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize(
    ("params", "buffers", "match"),
    [
        ({"transformer.h.0.mlp.c_fc.wieght": torch.zeros(32, 128)}, None, "c_fc.weight"),
        ({"transformer.h.0.mlp.c_fc.weight": torch.zeros(3, 3)}, None, r"shape \(3, 3\)"),
        ({"transformer.h.0.mlp.c_fc.weight": 0.0}, None, "pass a tensor"),
        ([("transformer.h.0.mlp.c_fc.weight", torch.zeros(32, 128))], None, "mapping"),
    ],
    ids=["typo", "shape", "not-a-tensor", "not-a-mapping"],
)
def test_bad_params_are_spec_errors_and_register_nothing(
    params: Any, buffers: Any, match: str, hook_snapshot: Callable[[nn.Module], Any]
) -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    before = hook_snapshot(model)
    with pytest.raises(SpecError, match=match):
        run_with_hooks(model, inputs, ["transformer.h.0"], params=params, buffers=buffers)
    assert hook_snapshot(model) == before


def test_a_buffer_passed_as_a_param_names_buffers() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    with pytest.raises(SpecError, match="buffers="):
        run_with_hooks(model, torch.ones(2, 3), ["0"], params={"1.running_mean": torch.zeros(4)})


# -- Capture as a pytree ------------------------------------------------------------------------


def test_capture_pytree_children_are_tensors_only() -> None:
    out = torch.ones(2, 3)
    capture = Capture(
        "attn",
        raw_outputs=((out, None),),
        grad_outputs=(None,),
    )
    leaves, spec = pytree.tree_flatten(capture)
    assert len(leaves) == 1
    assert leaves[0] is out
    rebuilt = pytree.tree_unflatten([out * 2], spec)
    assert isinstance(rebuilt, Capture)
    assert torch.equal(rebuilt.output, out * 2)
    assert rebuilt.raw_output[1] is None
    assert rebuilt.grad_outputs == (None,)
    doubled = pytree.tree_map(lambda t: t * 3, capture)
    assert torch.equal(doubled.output, out * 3)
    # pytree utilities that unflatten with placeholders (vmap's out_dims) round-trip
    placeholders = pytree.tree_unflatten([0], spec)
    assert pytree.tree_flatten(placeholders)[0] == [0]
    assert pytree.tree_structure(placeholders) == spec


def test_vmap_in_dims_over_a_capture() -> None:
    # Captures go into transforms as well as out of them.
    capture = Capture("fc", raw_outputs=((torch.arange(6.0).reshape(3, 2), None),))
    summed = vmap(lambda c: c.output.sum())(capture)
    assert torch.equal(summed, torch.tensor([1.0, 5.0, 9.0]))


def test_params_run_is_still_a_functional_call_of_the_same_model() -> None:
    # hooks live on the model's modules, which functional_call keeps: a capture of a swapped
    # run and a plain functional_call agree
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    name = "transformer.h.1.mlp.c_proj.weight"
    new = torch.randn_like(model.get_parameter(name))
    out, _ = run_with_hooks(model, inputs, ["transformer.h.1"], params={name: new})
    expected = functional_call(model, {name: new}, (), dict(inputs))
    assert torch.equal(out.logits, expected.logits)


def _tiny_t5(attention: str) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        attn_implementation=attention,
    )
    return T5ForConditionalGeneration(config).eval()


def test_grad_through_t5_with_sdpa_names_eager_attention() -> None:
    """T5 builds its sdpa mask from its position bias, which requires grad inside the
    transform: a TransformError with the eager-attention hint, not a raw RuntimeError."""
    ids, dec = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 3))

    def loss(model: nn.Module) -> Callable[[Tensor], Tensor]:
        def f(embeds: Tensor) -> Tensor:
            inputs = {"inputs_embeds": embeds, "decoder_input_ids": dec}
            out, _ = run_with_hooks(model, inputs, {"encoder.block.0": Hook(output=False)})
            return out.logits.sum()

        return f

    sdpa = _tiny_t5("sdpa")
    embeds = sdpa.shared(ids).detach()
    with pytest.raises(TransformError, match="eager"):
        torch.func.grad(loss(sdpa))(embeds)
    eager = _tiny_t5("eager")
    grad = torch.func.grad(loss(eager))(embeds)
    reference = embeds.clone().requires_grad_()
    eager(inputs_embeds=reference, decoder_input_ids=dec).logits.sum().backward()
    torch.testing.assert_close(grad, reference.grad)
