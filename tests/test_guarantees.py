"""The guarantees: no leaks, the model is not changed, other hooks untouched, clear errors."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hookfn import (
    EditError,
    Hook,
    HookfnError,
    LayerNotFoundError,
    SpecError,
    TraceMultiple,
    add,
    run_with_hooks,
)


class Boom(Exception):
    """A user's own exception."""


def _raise(exc: BaseException) -> Callable[..., Any]:
    def edit(x: Tensor) -> Tensor:
        raise exc

    return edit


def _delta(seed: int = 0) -> Tensor:
    return torch.randn(32, generator=torch.Generator().manual_seed(seed))


def _trace_block_raises(model: nn.Module, inputs: Any) -> None:
    with TraceMultiple(model, {"transformer.h.*": (True, True, add(_delta()))}):
        model(**inputs)
        raise Boom("after the forward")


# Each scenario: (run(model, inputs), exception type or None).
SCENARIOS = [
    pytest.param(
        lambda m, i: run_with_hooks(
            m,
            i,
            {
                "transformer.h.*": "capture",
                "transformer.h.0": Hook(add(_delta()), input=True, edit_input=add(_delta(1))),
                "transformer.h.1.attn": Hook(input=True, clone=False, detach=False),
            },
        ),
        None,
        id="captures-and-edits",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(m, i, ["transformer.h.0.mlp"], stop_early=True),
        None,
        id="stop-early",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(
            m,
            i,
            {"transformer.h.0": Hook(grad=True, grad_input=True), "transformer.h.1": add(1.0)},
            backward=lambda out: out.logits.sum(),
        ),
        None,
        id="backward",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(
            m, i, {"transformer.wte": "capture", "transformer.h.1": _raise(Boom("edit"))}
        ),
        Boom,
        id="edit-raises",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(
            m, i, {"transformer.h.0.attn": _raise(KeyboardInterrupt()), "lm_head": "capture"}
        ),
        KeyboardInterrupt,
        id="keyboard-interrupt-in-edit",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(
            m,
            {"input_ids": torch.randint(0, 100, (1, 40))},  # longer than n_positions
            {"transformer.wte": add(_delta()), "transformer.h.*": "capture"},
        ),
        IndexError,
        id="model-raises",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(
            m,
            i,
            {"transformer.h.0": "capture"},
            forward=lambda **kw: (m(**kw), (_ for _ in ()).throw(Boom("forward")))[0],
        ),
        Boom,
        id="forward-fn-raises-after-model",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(m, i, {"transformer.h.0": lambda x: x[..., :3]}),
        EditError,
        id="edit-wrong-shape",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(
            m, i, {"transformer.h.0": "capture", "transformer.h.O": "capture"}
        ),
        LayerNotFoundError,
        id="bad-spec-second-key-unknown",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(m, i, {"transformer.h.0": add(1.0), "lm_head": "captur"}),
        SpecError,
        id="bad-spec-second-value",
    ),
    pytest.param(
        lambda m, i: run_with_hooks(m, i, {"transformer.h.*": "capture", "*.h.1": "capture"}),
        SpecError,
        id="bad-spec-clash",
    ),
    pytest.param(_trace_block_raises, Boom, id="trace-multiple-block-raises"),
]


def _model_state(model: nn.Module) -> dict[str, Any]:
    """Parameters and buffers (as bytes), flags, and gradients of every module."""

    def raw(t: Tensor) -> Tensor:
        return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()

    return {
        "params": [
            (n, raw(p), p.dtype, p.requires_grad, p.grad)
            for n, p in model.named_parameters(remove_duplicate=False)
        ],
        "buffers": [(n, raw(b), b.dtype) for n, b in model.named_buffers(remove_duplicate=False)],
        "training": [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)],
    }


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def equal(x: Any, y: Any) -> bool:
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            return isinstance(x, Tensor) and isinstance(y, Tensor) and torch.equal(x, y)
        if isinstance(x, (tuple, list)):
            return len(x) == len(y) and all(equal(i, j) for i, j in zip(x, y, strict=True))
        return bool(x == y)

    return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("scenario", "raises"), SCENARIOS)
def test_every_run_leaves_hooks_and_model_exactly_as_before(
    tiny_gpt2, gpt2_inputs, hook_snapshot, scenario, raises
):
    model = tiny_gpt2
    hooks_before = hook_snapshot(model)
    reference = copy.deepcopy(model)  # an independent copy of the state before the run
    with torch.no_grad():
        logits_before = reference(**gpt2_inputs).logits
    if raises is None:
        scenario(model, gpt2_inputs)
    else:
        with pytest.raises(raises):
            scenario(model, gpt2_inputs)
    assert hook_snapshot(model) == hooks_before
    assert _same_state(_model_state(model), _model_state(reference))
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(**gpt2_inputs).logits, logits_before)  # still the same model


@pytest.mark.parametrize(
    ("spec", "raises"),
    [
        ({"transformer.h.0": "capture", "transformer.h.O": "capture"}, LayerNotFoundError),
        ({"transformer.h.0": "capture", "transformer.h.1": 42}, SpecError),
        ({"transformer.h.0": "capture", 3: "capture"}, SpecError),
        ({"transformer.h.0": "capture", "transformer.*.9": "capture"}, LayerNotFoundError),
        ({"transformer.h.*": "capture", "transformer.*.0": "capture"}, SpecError),
    ],
)
def test_a_bad_spec_fails_before_anything_is_registered(
    tiny_gpt2, gpt2_inputs, monkeypatch, spec, raises
):
    # Every hook dictionary of the model records what is inserted into it.
    registered: list[str] = []

    class Spy(OrderedDict[int, Any]):
        def __init__(self, owner: str, items: Any) -> None:
            super().__init__(items)
            self.owner = owner

        def __setitem__(self, key: int, value: Any) -> None:
            registered.append(self.owner)
            super().__setitem__(key, value)

    for module in tiny_gpt2.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks"):
            spy = Spy(type(module).__name__, getattr(module, attr))
            monkeypatch.setattr(module, attr, spy)
    with pytest.raises(raises):
        run_with_hooks(tiny_gpt2, gpt2_inputs, spec)
    with pytest.raises(raises):
        TraceMultiple(tiny_gpt2, spec)
    assert registered == []
    # the spy does see registrations when the spec is fine
    run_with_hooks(tiny_gpt2, gpt2_inputs, ["transformer.h.0"])
    assert registered == ["GPT2Block"]


def _mixed_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    model[1].eval()  # running statistics are not updated: the run must not change them
    model[3].weight.requires_grad_(False)
    model[1].running_mean.add_(torch.randn(8))
    return model


@pytest.mark.parametrize(
    "spec",
    [
        {"0": add(torch.randn(8)), "1": Hook(input=True), "3": "capture"},
        {"*": Hook(detach=False, clone=False)},
        {"0": Hook(edit_input=add(1.0), grad=True), "3": Hook(grad_input=True)},
    ],
)
def test_flags_buffers_and_frozen_parameters_are_unchanged(spec):
    model = _mixed_model()
    reference = copy.deepcopy(model)
    x = torch.randn(5, 4)
    run_with_hooks(model, x, spec, backward=lambda out: out.square().sum())
    assert _same_state(_model_state(model), _model_state(reference))
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    assert model[0].weight.requires_grad
    assert not model[3].weight.requires_grad


# -- other hooks ---------------------------------------------------------------------------------


def test_pre_existing_user_hooks_are_untouched_and_still_fire(
    tiny_gpt2, gpt2_inputs, hook_snapshot
):
    block, attn = tiny_gpt2.transformer.h[0], tiny_gpt2.transformer.h[0].attn
    fired: dict[str, list[Any]] = {"fwd": [], "pre": [], "kw": [], "always": [], "global": []}
    handles = [
        block.register_forward_hook(lambda m, i, o: fired["fwd"].append(o.detach().clone())),
        block.register_forward_pre_hook(
            lambda m, a, k: fired["pre"].append(a[0].detach().clone()), with_kwargs=True
        ),
        attn.register_forward_hook(
            lambda m, a, k, o: fired["kw"].append(sorted(k)), with_kwargs=True
        ),
        attn.register_forward_hook(lambda m, i, o: fired["always"].append(1), always_call=True),
        nn.modules.module.register_module_forward_hook(
            lambda m, i, o: fired["global"].append(1) if m is block else None
        ),
    ]
    try:
        with torch.no_grad():
            tiny_gpt2(**gpt2_inputs)
        clean_out = fired["fwd"][0]
        fired = {k: [] for k in fired}
        before = hook_snapshot(tiny_gpt2)
        delta = _delta(3)
        with torch.no_grad():
            run_with_hooks(
                tiny_gpt2,
                gpt2_inputs,
                {
                    "transformer.h.0": Hook(add(delta), input=True),
                    "transformer.h.0.attn": "capture",
                },
            )
        assert hook_snapshot(tiny_gpt2) == before
        assert [len(v) for v in fired.values()] == [1, 1, 1, 1, 1]
        # the user's hook runs after the edit: it sees what the rest of the model sees
        assert torch.equal(fired["fwd"][0], clean_out + delta)
        # and they fire in a failing run too, and are still there afterwards
        with pytest.raises(Boom), torch.no_grad():
            run_with_hooks(tiny_gpt2, gpt2_inputs, {"transformer.h.1": _raise(Boom())})
        assert hook_snapshot(tiny_gpt2) == before
        assert [len(v) for v in fired.values()] == [2, 2, 2, 2, 2]
    finally:
        for handle in handles:
            handle.remove()


def _hidden_states_reference(model: nn.Module, ids: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Block outputs of a run with ``delta`` added to block 0, by plain hooks (no recorder)."""
    store: list[Tensor] = []
    handles = [
        model.transformer.h[0].register_forward_hook(lambda m, i, o: o + delta, prepend=True),
        model.transformer.h[0].register_forward_hook(lambda m, i, o: store.append(o.detach())),
        model.transformer.h[1].register_forward_hook(lambda m, i, o: store.append(o.detach())),
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return store[0], store[1]


def test_transformers_hidden_state_hooks_see_the_edit_on_every_call(make_gpt2, hook_snapshot):
    model = make_gpt2(seed=11)  # fresh: transformers installs its hooks on first use
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    delta = _delta(4)
    want_h0, want_h1 = _hidden_states_reference(model, ids, delta)
    inputs = {"input_ids": ids, "output_hidden_states": True}
    for call in range(2):  # the first call installs transformers' hooks during the run
        before = hook_snapshot(model)
        with torch.no_grad():
            out, caches = run_with_hooks(model, inputs, {"transformer.h.0": add(delta)})
        if call == 1:
            assert hook_snapshot(model) == before
        assert len(out.hidden_states) == 3
        assert torch.equal(caches["transformer.h.0"].output, want_h0)
        assert torch.equal(out.hidden_states[1], want_h0), f"call {call}"
    with torch.no_grad():
        plain = model(**inputs)
    assert len(model.transformer.h[0]._forward_hooks) == 1  # transformers' recorder
    assert torch.equal(plain.hidden_states[0], out.hidden_states[0])
    assert not torch.equal(plain.hidden_states[1], out.hidden_states[1])
    assert want_h1.shape == plain.hidden_states[2].shape


# -- errors ----------------------------------------------------------------------------------------

WRONG_EDITS = [
    # (layer, hook value, fragments the message must hold)
    ("transformer.h.0", lambda x: x[..., :3], ["'transformer.h.0'", "(2, 6, 3)", "(2, 6, 32)"]),
    ("transformer.h.1", lambda x: x.sum(), ["'transformer.h.1'", "shape ()", "(2, 6, 32)"]),
    (
        "transformer.h.0.attn",
        lambda x: x[:1],
        ["'transformer.h.0.attn'", "(1, 6, 32)", "(2, 6, 32)"],
    ),
    ("transformer.h.0", lambda x: 1.0, ["'transformer.h.0'", "float", "(2, 6, 32)"]),
    ("transformer.h.0", lambda x: [x], ["'transformer.h.0'", "list", "(2, 6, 32)"]),
    ("transformer.h.0", lambda x: x.numpy(), ["'transformer.h.0'", "ndarray", "(2, 6, 32)"]),
    (
        "transformer.h.0.mlp",
        Hook(edit_input=lambda x: x[..., :8]),
        ["'transformer.h.0.mlp'", "input", "(2, 6, 8)", "(2, 6, 32)"],
    ),
]


@pytest.mark.parametrize(("layer", "value", "fragments"), WRONG_EDITS)
def test_a_wrong_edit_result_is_an_edit_error_naming_layer_and_shapes(
    tiny_gpt2, gpt2_inputs, hook_snapshot, layer, value, fragments
):
    before = hook_snapshot(tiny_gpt2)
    with pytest.raises(EditError) as info, torch.no_grad():
        run_with_hooks(tiny_gpt2, gpt2_inputs, {layer: value})
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert isinstance(info.value, HookfnError)
    assert hook_snapshot(tiny_gpt2) == before


@pytest.mark.parametrize(
    "make_spec",
    [
        pytest.param(lambda exc: {"transformer.h.0": _raise(exc)}, id="output-edit"),
        pytest.param(
            lambda exc: {"transformer.h.0": Hook(edit_input=_raise(exc))}, id="input-edit"
        ),
        pytest.param(
            lambda exc: {"transformer.h.0": lambda x, site: (_ for _ in ()).throw(exc)},
            id="two-argument-edit",
        ),
    ],
)
@pytest.mark.parametrize("exc_type", [Boom, ValueError, RuntimeError, KeyboardInterrupt])
def test_user_exception_in_an_edit_propagates_unchanged(
    tiny_gpt2, gpt2_inputs, make_spec, exc_type
):
    exc = exc_type("mine")
    with pytest.raises(exc_type) as info, torch.no_grad():
        run_with_hooks(tiny_gpt2, gpt2_inputs, make_spec(exc))
    assert info.value is exc
    assert type(info.value) is exc_type
    assert not isinstance(info.value, HookfnError)


def test_nested_runs_keep_their_order_ahead_of_other_hooks():
    """An inner run sees the outer run's edit; a foreign hook sees both edits; captures of
    both runs hold what the rest of the model receives (both edits)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    a, b = torch.randn(4), torch.randn(4)
    with torch.no_grad():
        h = model[0](x)
        want = model[2](torch.tanh(h + a + b))
    foreign: list[Tensor] = []
    handle = model[0].register_forward_hook(lambda m, i, o: foreign.append(o.detach().clone()))
    inner: dict[str, Any] = {}

    def forward(x: Tensor) -> Tensor:
        out, caches = run_with_hooks(model, x, {"0": add(b)})
        inner.update(caches)
        return out

    try:
        with torch.no_grad():
            out, outer = run_with_hooks(model, x, {"0": add(a)}, forward=forward)
    finally:
        handle.remove()
    assert torch.allclose(outer["0"].output, h + a + b)  # what the next layer receives
    assert torch.allclose(inner["0"].output, h + a + b)  # the inner one sees its edit
    assert len(foreign) == 1
    assert torch.allclose(foreign[0], h + a + b)  # a foreign hook sees both
    assert torch.allclose(out, want)
