"""Gradients through hooks: ``Hook(grad=True)``, ``grad_input``, ``edit_grad``, ``backward=``.

Every gradient is compared with plain autograd on a copy of the model: ``retain_grad()`` on
the tensor a raw ``register_forward_hook`` sees, then ``metric.backward()``. Activation
checkpointing is compared with the same model run without it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from reference import count_calls, raw_backward, raw_input_grad
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from hookfn import (
    Hook,
    HookfnError,
    TraceMultiple,
    TransformError,
    add,
    replace,
    run_with_hooks,
    scale,
)

# -- models -------------------------------------------------------------------------------


def make_gpt2(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    """The tiny GPT-2 of the test suite, without dropout (so train mode is deterministic)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


_GPT2: dict[str, nn.Module] = {}


def gpt2(attn: str) -> nn.Module:
    """A shared tiny GPT-2 per attention implementation; tests never change it."""
    if attn not in _GPT2:
        _GPT2[attn] = make_gpt2(attn)
    return _GPT2[attn]


def gpt2_inputs(seed: int = 1) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpt2_metric(out: Any) -> Tensor:
    """A scalar that depends on every position: log-probability of token 3, summed."""
    return out.logits.log_softmax(-1)[..., 3].sum()


class Branch(nn.Module):
    """Returns a tuple ``(out, None)``, like an attention module without weights."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return torch.tanh(self.lin(x)), None


class ResidualNet(nn.Module):
    """``inner``'s output feeds both ``branch`` and a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.branch = Branch()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x)
        out, _ = self.branch(h)
        return self.head(torch.relu(h + out))


def residual_net() -> nn.Module:
    torch.manual_seed(0)
    return ResidualNet()


def toy_metric(out: Tensor) -> Tensor:
    return (out[:, 0] * out[:, 1]).sum()


TOY_INPUT = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))

# -- helpers ----------------------------------------------------------------------------------


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    for name, param in model.named_parameters():
        assert param.grad is None, f"{name}.grad was set"
        assert param.requires_grad, name


# -- Hook(grad=True): the gradient of the metric w.r.t. a layer's output ---------------------

GPT2_LAYERS = [
    "transformer.wte",  # embedding
    "transformer.h.0",  # block: its output is the residual stream
    "transformer.h.0.attn",  # returns (out, weights or None); out feeds a residual sum
    "transformer.h.0.mlp",  # feeds a residual sum
    "transformer.h.1.attn.c_attn",
    "transformer.h.1",
    "transformer.ln_f",
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grad_output_equals_retain_grad_gpt2(attn: str) -> None:
    model, inputs = gpt2(attn), gpt2_inputs()
    before = state(model)
    _, caches = run_with_hooks(
        model, inputs, {n: Hook(grad=True) for n in GPT2_LAYERS}, backward=gpt2_metric
    )
    ref = raw_backward(model, inputs, gpt2_metric, GPT2_LAYERS)
    outputs, grads = ref.outputs, ref.grads
    for name in GPT2_LAYERS:
        assert torch.equal(caches[name].grad_output, grads[name]), name
        assert torch.equal(caches[name].output, outputs[name]), name
        assert len(caches[name].grad_outputs) == 1
    assert caches["transformer.h.0.attn"].grad_output.abs().sum() > 0
    assert_unchanged(model, before)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "name",
    [
        "transformer.h.0",  # its input also feeds the block's residual sum
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
        "transformer.h.1.ln_2",
        "transformer.ln_f",
        "lm_head",
    ],
)
def test_grad_input_equals_leaf_reference_gpt2(attn: str, name: str) -> None:
    model, inputs = gpt2(attn), gpt2_inputs()
    before = state(model)
    _, caches = run_with_hooks(model, inputs, {name: Hook(grad_input=True)}, backward=gpt2_metric)
    expected = raw_input_grad(model, inputs, name, gpt2_metric)
    assert torch.equal(caches[name].grad_input, expected)
    assert_unchanged(model, before)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_output_and_input_grads_in_one_call(attn: str) -> None:
    model, inputs = gpt2(attn), gpt2_inputs()
    names = ["transformer.h.0.attn", "transformer.h.1"]
    _, caches = run_with_hooks(
        model,
        inputs,
        {n: Hook(grad=True, grad_input=True, input=True) for n in names},
        backward=gpt2_metric,
    )
    grads = raw_backward(model, inputs, gpt2_metric, names).grads
    for name in names:
        assert torch.equal(caches[name].grad_output, grads[name])
        assert torch.equal(
            caches[name].grad_input, raw_input_grad(model, inputs, name, gpt2_metric)
        )


@pytest.mark.parametrize("name", ["inner", "branch", "branch.lin", "head"])
def test_grad_output_equals_retain_grad_residual_and_tuple(name: str) -> None:
    model = residual_net()
    _, caches = run_with_hooks(model, TOY_INPUT, {name: Hook(grad=True)}, backward=toy_metric)
    grads = raw_backward(model, TOY_INPUT, toy_metric, [name]).grads
    assert torch.equal(caches[name].grad_output, grads[name])
    assert caches[name].grad_output.abs().sum() > 0


def test_grad_input_is_the_modules_share_of_a_residual_input() -> None:
    # inner's output feeds branch and the residual sum: branch's grad_input is the share that
    # flows through branch only, inner's grad_output the total.
    model = residual_net()
    _, caches = run_with_hooks(
        model,
        TOY_INPUT,
        {"inner": Hook(grad=True), "branch": Hook(grad_input=True)},
        backward=toy_metric,
    )
    share = raw_input_grad(model, TOY_INPUT, "branch", toy_metric)
    total = raw_backward(model, TOY_INPUT, toy_metric, ["inner"]).grads
    assert torch.equal(caches["branch"].grad_input, share)
    assert torch.equal(caches["inner"].grad_output, total["inner"])
    assert not torch.equal(share, total["inner"])


def test_grad_of_a_layer_followed_by_an_inplace_op() -> None:
    # A full backward hook breaks when an in-place op follows the module; a tensor hook sees
    # the gradient of the module's own output (before the in-place ReLU changed it).
    torch.manual_seed(0)
    inplace = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    plain = copy.deepcopy(inplace)
    plain[1] = nn.ReLU()
    x = TOY_INPUT
    _, caches = run_with_hooks(inplace, x, {"0": Hook(grad=True)}, backward=toy_metric)
    ref = raw_backward(plain, x, toy_metric, ["0"])
    outputs, grads = ref.outputs, ref.grads
    assert torch.equal(caches["0"].grad_output, grads["0"])
    assert torch.equal(caches["0"].output, outputs["0"])  # the clone predates the ReLU
    assert (caches["0"].output < 0).any()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grads_of_a_frozen_model(attn: str) -> None:
    # Nothing requires grad in a frozen model: the graph starts at the first hooked layer.
    model, inputs = copy.deepcopy(gpt2(attn)), gpt2_inputs()
    model.requires_grad_(False)
    names = ["transformer.h.0", "transformer.h.1.attn", "transformer.ln_f"]
    spec = {n: Hook(grad=True) for n in names}
    spec["transformer.h.1.mlp"] = Hook(grad_input=True)
    _, caches = run_with_hooks(model, inputs, spec, backward=gpt2_metric)
    grads = raw_backward(gpt2(attn), inputs, gpt2_metric, names).grads
    for name in names:
        assert torch.equal(caches[name].grad_output, grads[name]), name
    assert torch.equal(
        caches["transformer.h.1.mlp"].grad_input,
        raw_input_grad(gpt2(attn), inputs, "transformer.h.1.mlp", gpt2_metric),
    )
    assert not any(p.requires_grad for p in model.parameters())


# -- edit_grad ------------------------------------------------------------------------------

GRAD_EDITS: list[tuple[str, Any, Callable[[Tensor], Tensor]]] = [
    ("scale0", scale(0.0), lambda g: g * 0.0),
    ("replace0", replace(0.0), torch.zeros_like),
    ("scale2", scale(2.0), lambda g: g * 2.0),
    ("lambda", lambda g: g.flip(-1), lambda g: g.flip(-1)),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", ["transformer.h.0.mlp", "transformer.h.1.attn"])
@pytest.mark.parametrize(("label", "edit", "manual"), GRAD_EDITS, ids=[e[0] for e in GRAD_EDITS])
def test_edit_grad_equals_raw_tensor_hook(
    attn: str, layer: str, label: str, edit: Any, manual: Callable[[Tensor], Tensor]
) -> None:
    model, inputs = gpt2(attn), gpt2_inputs()
    before = state(model)
    watched = ["transformer.wte", "transformer.h.0.ln_2", layer]
    spec = {n: Hook(grad=True) for n in watched}
    spec[layer] = Hook(grad=True, edit_grad=edit)
    _, caches = run_with_hooks(model, inputs, spec, backward=gpt2_metric)
    grads = raw_backward(model, inputs, gpt2_metric, watched, grad_fns={layer: manual}).grads
    unedited = raw_backward(model, inputs, gpt2_metric, watched).grads
    for name in watched:
        # the capture at the edited layer is what flows on: the edited gradient
        expected = manual(unedited[name]) if name == layer else grads[name]
        assert torch.equal(caches[name].grad_output, expected), name
    assert not torch.equal(caches["transformer.wte"].grad_output, unedited["transformer.wte"])
    assert_unchanged(model, before)


def test_stop_gradient_through_a_block_zeroes_everything_upstream() -> None:
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    _, caches = run_with_hooks(
        model,
        inputs,
        {"transformer.h.0": Hook(grad=True), "transformer.h.1": Hook(edit_grad=scale(0.0))},
        backward=gpt2_metric,
    )
    assert torch.equal(
        caches["transformer.h.0"].grad_output, torch.zeros_like(caches["transformer.h.0"].output)
    )


# -- only tensor hooks ----------------------------------------------------------------------


def test_gradients_use_tensor_hooks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a module backward hook was registered")

    for method in (
        "register_full_backward_hook",
        "register_full_backward_pre_hook",
        "register_backward_hook",
    ):
        monkeypatch.setattr(nn.Module, method, forbidden)
    model, inputs = gpt2("sdpa"), gpt2_inputs()
    seen: list[int] = []

    def count_backward_hooks(x: Tensor) -> Tensor:
        seen.append(sum(len(m._backward_hooks) for m in model.modules()))
        return x

    run_with_hooks(
        model,
        inputs,
        {
            "transformer.h.0": Hook(count_backward_hooks, grad=True, grad_input=True),
            "transformer.h.1.mlp": Hook(grad=True, edit_grad=scale(0.5)),
        },
        backward=gpt2_metric,
    )
    assert seen == [0]


# -- backward= details ----------------------------------------------------------------------


def test_output_graph_is_kept_after_backward() -> None:
    model = residual_net()
    x = TOY_INPUT.clone().requires_grad_()
    out, _ = run_with_hooks(model, x, {"inner": Hook(grad=True)}, backward=toy_metric)
    (grad_x,) = torch.autograd.grad(toy_metric(out), x)  # the graph was not freed
    x_ref = TOY_INPUT.clone().requires_grad_()
    toy_metric(copy.deepcopy(model)(x_ref)).backward()
    assert torch.equal(grad_x, x_ref.grad)


def test_undetached_grad_capture_is_differentiable() -> None:
    # detach=False keeps the captured gradient on the graph: d/dx of sum(dm/dh) by autograd.
    model = residual_net()
    x = TOY_INPUT.clone().requires_grad_()
    _, caches = run_with_hooks(
        model, x, {"inner": Hook(grad=True, detach=False)}, backward=toy_metric
    )
    (second,) = torch.autograd.grad(caches["inner"].grad_output.sum(), x)

    reference = copy.deepcopy(model)
    x_ref = TOY_INPUT.clone().requires_grad_()
    h = reference.inner(x_ref)
    out, _ = reference.branch(h)
    metric = toy_metric(reference.head(torch.relu(h + out)))
    (dh,) = torch.autograd.grad(metric, h, create_graph=True)
    (expected,) = torch.autograd.grad(dh.sum(), x_ref)
    assert torch.equal(second, expected)


def test_backward_without_autograd_is_an_error() -> None:
    with torch.no_grad(), pytest.raises(HookfnError, match="does not require grad"):
        run_with_hooks(residual_net(), TOY_INPUT, {"inner": Hook(grad=True)}, backward=toy_metric)


# -- activation checkpointing ---------------------------------------------------------------


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing (non-reentrant, its default)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers before 5.x
        enable = model.gradient_checkpointing_enable
    enable()
    model.train()


CHECKPOINT_SPEC: dict[str, Any] = {
    # edits whose results the backward pass needs (saved by the ops after them)
    "transformer.h.0.mlp": Hook(add(0.3), grad=True, grad_input=True),
    "transformer.h.1.attn": Hook(scale(0.5), grad=True, input=True),
    "transformer.h.1.ln_2": Hook(edit_input=lambda x: x * 1.5, grad_input=True),
    "transformer.h.0": Hook(grad=True),
    "transformer.h.1.ln_1": Hook(grad=True, edit_grad=scale(2.0)),
    "transformer.h.0.attn.c_attn": "capture",
}


def assert_same_captures(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        a, b = got[name], expected[name]
        assert a.n_calls == b.n_calls == 1, name
        assert len(a.grad_outputs) == len(b.grad_outputs), name
        assert len(a.grad_inputs) == len(b.grad_inputs), name
        # (not a == b: transformers turns the KV cache off under checkpointing, so the
        # captured keyword arguments differ; every tensor must not)
        for field in ("raw_outputs", "grad_outputs", "grad_inputs"):
            assert _tensors(getattr(a, field)) == _tensors(getattr(b, field)), (name, field)
        assert _tensors(a.inputs) == _tensors(b.inputs), name


class _Exact:
    """A tensor that compares by value (torch.equal), for comparing lists of tensors."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Exact) and torch.equal(self.tensor, other.tensor)

    def __repr__(self) -> str:
        return f"_Exact({tuple(self.tensor.shape)})"


def _tensors(value: Any) -> list[Any]:
    leaves = torch.utils._pytree.tree_leaves(value)
    return [_Exact(x) if isinstance(x, Tensor) else x for x in leaves]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("early_stop", [True, False])
def test_gradient_checkpointing_replays_edits_and_records_once(attn: str, early_stop: bool) -> None:
    plain = make_gpt2(attn).train()
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed)
    before = state(checkpointed)
    inputs = gpt2_inputs()
    out, expected = run_with_hooks(plain, inputs, CHECKPOINT_SPEC, backward=gpt2_metric)
    with (
        set_checkpoint_early_stop(early_stop),
        count_calls(checkpointed.transformer.h[1].attn) as calls,
    ):
        out_ckpt, got = run_with_hooks(checkpointed, inputs, CHECKPOINT_SPEC, backward=gpt2_metric)
    assert len(calls) == 2  # the forward was re-run during backward, with the hooks in place
    assert torch.equal(out_ckpt.logits, out.logits)
    assert_same_captures(got, expected)
    # and both agree with autograd, the same edits made by raw hooks on a plain copy
    reference = raw_checkpoint_spec_grad(plain, inputs)
    assert torch.equal(got["transformer.h.0"].grad_output, reference)
    unedited = raw_backward(plain, inputs, gpt2_metric, ["transformer.h.0"]).grads
    assert not torch.equal(reference, unedited["transformer.h.0"])  # the edits matter
    assert_unchanged(checkpointed, before)


def raw_checkpoint_spec_grad(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """CHECKPOINT_SPEC's edits by raw hooks; the gradient at ``transformer.h.0``'s output."""
    ref = raw_backward(
        model,
        inputs,
        gpt2_metric,
        ["transformer.h.0"],
        edits={"transformer.h.0.mlp": lambda h: h + 0.3, "transformer.h.1.attn": lambda h: h * 0.5},
        pre_edits={"transformer.h.1.ln_2": lambda h: h * 1.5},
        grad_fns={"transformer.h.1.ln_1": lambda g: g * 2.0},
    )
    grad = ref.grads["transformer.h.0"]
    assert grad is not None
    return grad


class SharedStack(nn.Module):
    """One layer applied three times, each application checkpointed (a shared layer)."""

    def __init__(self, reentrant: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.use_checkpoint = True
        self.reentrant = reentrant

    def step(self, h: Tensor) -> Tensor:
        return torch.tanh(self.shared(h))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for _ in range(3):
            if self.use_checkpoint:
                h = checkpoint(self.step, h, use_reentrant=self.reentrant)
            else:
                h = self.step(h)
        return self.head(h)


def test_checkpointed_shared_layer_replays_each_call_with_its_site() -> None:
    torch.manual_seed(0)
    checkpointed = SharedStack()
    plain = copy.deepcopy(checkpointed)
    plain.use_checkpoint = False
    x = TOY_INPUT.clone().requires_grad_()

    def by_call(h: Tensor, site: Any) -> Tensor:
        return h * (1.0 + site.call)

    spec = {
        "embed": Hook(grad=True),
        "shared": Hook(by_call, grad=True, grad_input=True),
        "head": Hook(grad_input=True),
    }
    _, expected = run_with_hooks(plain, x, spec, backward=toy_metric)
    _, got = run_with_hooks(checkpointed, x, spec, backward=toy_metric)
    for name in spec:
        assert got[name].n_calls == expected[name].n_calls
        assert len(got[name].grad_outputs) == len(expected[name].grad_outputs)
        assert got[name] == expected[name], name
    assert got["shared"].n_calls == 3


def test_checkpointing_with_a_users_own_backward_inside_a_trace() -> None:
    plain = make_gpt2("eager").train()
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed)
    inputs = gpt2_inputs()
    spec = {
        "transformer.h.0.mlp": Hook(scale(0.0), grad=True),
        "transformer.h.1.attn": Hook(add(0.2), grad=True),
    }
    results = []
    for model in (plain, checkpointed):
        with TraceMultiple(model, spec) as tm:
            gpt2_metric(model(**inputs)).backward()
        results.append(tm.captures())
        for param in model.parameters():
            param.grad = None
    expected, got = results
    for name in spec:
        assert got[name].n_calls == 1
        assert got[name] == expected[name], name


def test_reentrant_checkpointing_with_backward_is_a_transform_error() -> None:
    torch.manual_seed(0)
    model = SharedStack(reentrant=True)
    x = TOY_INPUT.clone().requires_grad_()
    with pytest.raises(TransformError, match="use_reentrant=False") as info:
        # a gradient wanted below the checkpointed segments: autograd.grad must cross them
        run_with_hooks(
            model, x, {"embed": Hook(grad=True), "shared": Hook(grad=True)}, backward=toy_metric
        )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_input_grads_inside_reentrant_checkpointing_are_absent_not_an_error() -> None:
    # The first forward of a reentrant checkpoint runs under no_grad: no gradient can reach
    # a hook inside it, and registering one must not fail.
    torch.manual_seed(0)
    model = SharedStack(reentrant=True)
    x = TOY_INPUT.clone().requires_grad_()
    with TraceMultiple(model, {"shared": Hook(grad_input=True, grad=True)}) as tm:
        model(x)
    assert tm["shared"].capture.grad_inputs == (None, None, None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gradient_checkpointing_on_cuda_replays_edits_in_engine_threads() -> None:
    # On CUDA the engine re-runs checkpointed forwards in its device threads.
    plain = make_gpt2("sdpa").train().cuda()
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed)
    inputs = {k: v.cuda() for k, v in gpt2_inputs().items()}
    out, expected = run_with_hooks(plain, inputs, CHECKPOINT_SPEC, backward=gpt2_metric)
    with count_calls(checkpointed.transformer.h[1].attn) as calls:
        out_ckpt, got = run_with_hooks(checkpointed, inputs, CHECKPOINT_SPEC, backward=gpt2_metric)
    assert len(calls) == 2
    torch.testing.assert_close(out_ckpt.logits, out.logits, rtol=0, atol=0)
    for name in CHECKPOINT_SPEC:
        assert got[name].n_calls == 1, name
        for a, b in zip(got[name].grad_outputs, expected[name].grad_outputs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
