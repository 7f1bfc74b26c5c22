"""`Capture`, `Args` and `primary`: immutability, pytree, accessors, options, structured values."""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from reference import raw_run
from torch import Tensor, nn

from hookfn import Args, Capture, CaptureError, Hook, add, primary, run_with_hooks


def _delta(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _linear_capture() -> tuple[nn.Module, Tensor, Capture]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    x = torch.randn(2, 4)
    _, caches = run_with_hooks(model, x, {"0": Hook(input=True)})
    return model, x, caches["0"]


# -- immutability and pytree -------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["name", "raw_outputs", "raw_inputs", "grad_outputs", "grad_inputs"]
)
def test_capture_is_frozen(field):
    _, _, capture = _linear_capture()
    with pytest.raises(AttributeError):
        setattr(capture, field, ())
    with pytest.raises((AttributeError, TypeError)):
        capture.extra = 1  # type: ignore[attr-defined]
    assert isinstance(capture.raw_outputs, tuple)
    assert isinstance(capture.raw_inputs, tuple)


def test_args_is_immutable():
    args = Args(torch.ones(1), scale=2)
    with pytest.raises(AttributeError):
        args.args = ()  # type: ignore[misc]
    assert isinstance(args.args, tuple)


def test_pytree_round_trip():
    model, x, capture = _linear_capture()
    leaves, spec = pytree.tree_flatten(capture)
    # one output tensor, then the one positional input tensor
    assert len(leaves) == 2
    assert leaves[0] is capture.raw_outputs[0]
    assert leaves[1] is capture.raw_inputs[0].args[0]
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, Capture)
    assert rebuilt == capture
    assert rebuilt.name == "0"
    assert rebuilt.raw_outputs[0] is capture.raw_outputs[0]
    with torch.no_grad():
        assert torch.equal(rebuilt.output, model[0](x))
    assert torch.equal(rebuilt.input, x)


def test_pytree_map_over_a_dict_of_captures(tiny_gpt2, gpt2_inputs):
    with torch.no_grad():
        _, caches = run_with_hooks(
            tiny_gpt2,
            gpt2_inputs,
            {"transformer.h.0.attn": "capture", "transformer.h.0.mlp": Hook(input=True)},
        )
    doubled = pytree.tree_map_only(Tensor, lambda t: t * 2, caches)
    assert list(doubled) == list(caches)
    for name in caches:
        assert isinstance(doubled[name], Capture)
        assert torch.equal(doubled[name].output, caches[name].output * 2)
    assert torch.equal(
        doubled["transformer.h.0.mlp"].input, caches["transformer.h.0.mlp"].input * 2
    )
    assert doubled["transformer.h.0.attn"].raw_output[1] is None  # structure kept


def _torch_save_round_trip(value: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "round_trip",
    [
        pytest.param(lambda v: pickle.loads(pickle.dumps(v)), id="pickle"),
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(copy.copy, id="copy"),
        pytest.param(_torch_save_round_trip, id="torch.save"),
    ],
)
def test_captures_with_inputs_can_be_saved_and_copied(round_trip):
    _, x, capture = _linear_capture()
    again = round_trip({"0": capture})["0"]
    assert isinstance(again, Capture)
    assert isinstance(again.raw_input, Args)
    assert torch.equal(again.input, x)
    assert torch.equal(again.output, capture.output)
    assert round_trip(Args(x, scale=2)) == Args(x.clone(), scale=2)


# -- equality ----------------------------------------------------------------------------------


def test_capture_equality_compares_tensor_values():
    t = torch.randn(2, 3)
    a = Capture("fc", (t,), (Args(t, k=1),))
    same = Capture("fc", (t.clone(),), (Args(t.clone(), k=1),))
    assert a == same
    assert (a != same) is False
    for other in [
        Capture("fc2", (t,), (Args(t, k=1),)),
        Capture("fc", (t + 1,), (Args(t, k=1),)),
        Capture("fc", (t,), (Args(t, k=2),)),
        Capture("fc", (t.double(),), (Args(t, k=1),)),
        Capture("fc", (t, t), (Args(t, k=1),)),
        Capture("fc", ((t, None),), (Args(t, k=1),)),
    ]:
        assert a != other
    assert a != "fc"
    with pytest.raises(TypeError):
        hash(a)


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        (Args(torch.ones(2)), Args(torch.ones(2)), True),
        (Args(torch.ones(2)), Args(torch.zeros(2)), False),
        (Args(x=torch.ones(2), y=1), Args(y=1, x=torch.ones(2)), True),
        (Args(torch.ones(2), y=1), Args(torch.ones(2), y=2), False),
        (Args(torch.ones(2)), Args(x=torch.ones(2)), False),
        (Args((torch.ones(2), None)), Args((torch.ones(2), None)), True),
        (Args(1, "a"), Args(1, "a"), True),
    ],
)
def test_args_equality(left, right, equal):
    assert (left == right) is equal


# -- accessors ------------------------------------------------------------------------------

T1, T2 = torch.ones(2), torch.zeros(2)

ACCESSORS = [
    # (capture, attribute, expected value or an error message pattern)
    (Capture("a", (T1,)), "output", T1),
    (Capture("a", (T1,)), "outputs", (T1,)),
    (Capture("a", (T1,)), "n_calls", 1),
    (Capture("a", ((T1, None),)), "output", T1),
    (Capture("a", ((T1, None),)), "raw_output", (T1, None)),
    (Capture("a", ([T1, T2],)), "output", T1),
    (Capture("a", ({"h": T1, "aux": T2},)), "output", T1),
    (Capture("a", (T1, T2)), "outputs", (T1, T2)),
    (Capture("a", (T1, T2)), "output", r"called 2 times.*\.outputs\[i\]"),
    (Capture("a", (T1, T2)), "raw_output", r"called 2 times.*\.raw_outputs\[i\]"),
    (Capture("a", (T1, T2)), "n_calls", 2),
    (Capture("a"), "output", "recorded no output"),
    (Capture("a"), "outputs", ()),
    (Capture("a"), "n_calls", 0),
    (Capture("a", ((None, T1),)), "output", "no primary tensor.*raw_output"),
    (Capture("a", (), (Args(T1, k=T2),)), "input", T1),
    (Capture("a", (), (Args(k=T2),)), "input", T2),
    (Capture("a", (), (Args(T1), Args(T2))), "inputs", (T1, T2)),
    (Capture("a", (), (Args(T1), Args(T2))), "input", r"called 2 times.*\.inputs\[i\]"),
    (Capture("a", (), (Args(T1),)), "n_calls", 1),
    (Capture("a", (T1,)), "input", "recorded no input"),
    (Capture("a", (T1,), (), (T2,)), "grad_output", T2),
    (Capture("a", (T1,), (), (None,)), "grad_output", "no gradient"),
    (Capture("a", (T1,)), "grad_output", "no grad_output"),
    (Capture("a", (T1,)), "grad_input", "no grad_input"),
]


@pytest.mark.parametrize(("capture", "attribute", "expected"), ACCESSORS)
def test_accessors(capture, attribute, expected):
    if isinstance(expected, str):
        with pytest.raises(CaptureError, match=expected) as info:
            getattr(capture, attribute)
        assert repr(capture.name) in str(info.value)
        return
    got = getattr(capture, attribute)
    if isinstance(expected, Tensor):
        assert got is expected
    elif isinstance(expected, tuple):
        assert len(got) == len(expected)
        assert all(g is e for g, e in zip(got, expected, strict=True))
    else:
        assert got == expected


def test_repr_names_the_layer_and_calls():
    assert repr(Capture("enc.0", (T1, T2))) == "Capture('enc.0', calls=2, outputs=[(2,) x2])"


PRIMARY = [
    (T1, T1),
    ((T1, None), T1),
    ((None, T1), None),
    ((), None),
    ([T1, T2], T1),
    ({"a": T1, "b": T2}, T1),
    (OrderedDict(b=T2, a=T1), T2),
    (Args(T1, T2), T1),
    (Args(k=T2), T2),
    (Args((T1, None)), T1),
    (Args(), None),
    (None, None),
    (3, None),
]


@pytest.mark.parametrize(("value", "expected"), PRIMARY)
def test_primary(value, expected):
    assert primary(value) is expected


# -- faithfulness and capture options ---------------------------------------------------------


def _linear_relu_inplace() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True))


def test_clone_keeps_the_capture_faithful_under_a_following_inplace_op():
    model = _linear_relu_inplace()
    x = torch.randn(8, 4)
    out_ref, ref = raw_run(model, x, capture=["0"])
    assert (ref["0"] < 0).any()  # ReLU(inplace=True) changes that tensor afterwards
    with torch.no_grad():
        out, caches = run_with_hooks(model, x, ["0"])
    assert torch.equal(caches["0"].output, ref["0"])
    assert torch.equal(out, out_ref)


def test_clone_false_stores_a_reference_that_later_inplace_ops_change():
    # The documented opt-out: cheaper, but the capture is the module's own tensor.
    model = _linear_relu_inplace()
    x = torch.randn(8, 4)
    with torch.no_grad():
        before_relu = model[0](x)
        out, caches = run_with_hooks(model, x, {"0": Hook(clone=False)})
    captured = caches["0"].output
    assert torch.equal(captured, torch.relu(before_relu))  # mutated by the ReLU
    assert not torch.equal(captured, before_relu)
    assert captured.data_ptr() == out.data_ptr()  # same storage as the model's output


def test_input_capture_is_faithful_when_the_module_mutates_its_input():
    class Doubles(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.mul_(2)

    model = nn.Sequential(nn.Linear(3, 3), Doubles())
    x = torch.randn(2, 3)
    with torch.no_grad():
        before = model[0](x)
        _, caches = run_with_hooks(model, x, {"1": Hook(input=True, output=False)})
    assert torch.equal(caches["1"].input, before)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_option(detach):
    model, x = _linear_relu_inplace(), torch.randn(8, 4)
    model[1] = nn.Tanh()
    _, caches = run_with_hooks(model, x, {"0": Hook(detach=detach)})
    captured = caches["0"].output
    assert captured.requires_grad is (not detach)
    assert (captured.grad_fn is None) is detach
    if not detach:
        # the graph through the capture is the model's own: same gradient as by hand
        (grad,) = torch.autograd.grad(captured.sum(), model[0].weight)
        want = torch.autograd.grad(model[0](x).sum(), model[0].weight)[0]
        assert torch.allclose(grad, want)


@pytest.mark.parametrize(
    ("options", "dtype", "same_storage"),
    [
        ({"dtype": torch.float16}, torch.float16, False),
        ({"dtype": torch.float64, "clone": False}, torch.float64, False),
        ({"device": "cpu"}, torch.float32, False),
        ({"device": "cpu", "clone": False}, torch.float32, True),
        ({"device": torch.device("cpu"), "dtype": torch.bfloat16}, torch.bfloat16, False),
    ],
)
def test_device_and_dtype_options(options, dtype, same_storage):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out, caches = run_with_hooks(
            model, ids, {"0": Hook(input=True, **options), "1": Hook(**options)}
        )
        want = model[0](ids)
    captured = caches["0"].output
    assert captured.dtype == dtype
    assert captured.device == torch.device("cpu")
    assert torch.equal(captured, want.to(dtype))
    assert caches["0"].input.dtype == torch.int64  # integer tensors keep their dtype
    assert torch.equal(caches["0"].input, ids)
    assert (caches["1"].output.data_ptr() == out.data_ptr()) is same_storage


# -- structured outputs ---------------------------------------------------------------------


def test_gpt2_attention_tuple_output(tiny_gpt2, gpt2_inputs):
    _, whole = raw_run(tiny_gpt2, gpt2_inputs, capture=["transformer.h.0.attn"], whole=True)
    raw = whole["transformer.h.0.attn"]
    assert isinstance(raw, tuple)  # the structure this test is about
    with torch.no_grad():
        _, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, ["transformer.h.0.attn"])
    capture = caches["transformer.h.0.attn"]
    assert isinstance(capture.output, Tensor)
    assert torch.equal(capture.output, raw[0])
    assert isinstance(capture.raw_output, tuple)
    assert len(capture.raw_output) == len(raw)
    assert capture.raw_output[1:] == raw[1:]
    assert capture.output.shape == (2, 6, 32)  # the whole batch, not output[0] of a tensor


def test_gpt2_attention_edit_changes_only_the_first_element(tiny_gpt2, gpt2_inputs):
    attn = tiny_gpt2.transformer.h[1].attn
    delta = _delta((32,), seed=3)
    seen: list[Any] = []
    want = raw_run(tiny_gpt2, gpt2_inputs, {"transformer.h.1.attn": lambda h: h + delta})[0].logits
    # what the rest of the block receives
    handle = attn.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            out, caches = run_with_hooks(
                tiny_gpt2, gpt2_inputs, {"transformer.h.1.attn": add(delta)}
            )
    finally:
        handle.remove()
    assert torch.equal(out.logits, want)
    assert isinstance(seen[0], tuple)
    assert len(seen[0]) == 2
    assert seen[0][1] is None
    assert torch.equal(seen[0][0], caches["transformer.h.1.attn"].output)


class _ReturnsDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.lin(x)
        return {"hidden": h, "aux": h.sum(-1)}


class _ReturnsModelOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        h = self.lin(x)
        return BaseModelOutput(last_hidden_state=h, hidden_states=(x, h))


_Pair = namedtuple("_Pair", ["hidden", "aux"])


class _ReturnsNamedTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> _Pair:
        h = self.lin(x)
        return _Pair(h, h.sum(-1))


class _ReturnsList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.lin(x)
        return [h, h.sum(-1)]


class _ReturnsMax(nn.Module):
    """Returns a ``torch.return_types.max``: a tuple subclass that is not a namedtuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Any:
        return torch.max(self.lin(x), dim=-1)


def _hidden(value: Any) -> Tensor:
    if isinstance(value, dict) and "hidden" in value:
        return value["hidden"]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    return value[0]


def _others(value: Any) -> list[Any]:
    if hasattr(value, "last_hidden_state"):
        return [value.hidden_states]
    if isinstance(value, dict):
        return [value["aux"]]
    return list(value[1:])


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Any:
        return self.inner(x)


@pytest.mark.parametrize(
    "inner", [_ReturnsDict, _ReturnsModelOutput, _ReturnsNamedTuple, _ReturnsList, _ReturnsMax]
)
def test_structured_output_capture_and_edit(inner):
    torch.manual_seed(4)
    model = _Wrap(inner())
    x = torch.randn(2, 3)
    delta = _delta((1,), seed=5)  # broadcasts onto every primary tensor here
    with torch.no_grad():
        plain = model(x)
        out, caches = run_with_hooks(model, x, {"inner": add(delta)})
    capture = caches["inner"]
    assert type(out) is type(plain)
    assert type(capture.raw_output) is type(plain)
    # the primary tensor (first item / value) is edited; the rest is untouched
    assert torch.equal(_hidden(out), _hidden(plain) + delta)
    assert torch.equal(capture.output, _hidden(plain) + delta)
    got, expected = pytree.tree_leaves(_others(out)), pytree.tree_leaves(_others(plain))
    assert len(got) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # capture only: the primary tensor and the whole structure
    with torch.no_grad():
        _, caches = run_with_hooks(model, x, ["inner"])
    assert torch.equal(caches["inner"].output, _hidden(plain))
    assert type(caches["inner"].raw_output) is type(plain)
