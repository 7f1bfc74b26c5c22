"""`hookfn.nethook` against nethook's documented behaviour and against plain forward hooks."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from reference import count_calls, raw_hooks_whole, raw_references
from torch import nn

from hookfn import HookfnError, LayerNotFoundError, SpecError, nethook

ATTN = "transformer.h.0.attn"
MLP = "transformer.h.0.mlp"


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))


# -- retained outputs and inputs --------------------------------------------------------


def test_output_is_the_whole_structure_by_reference(tiny_gpt2: nn.Module) -> None:
    module = tiny_gpt2.get_submodule(ATTN)
    with raw_references(module) as calls, nethook.Trace(tiny_gpt2, ATTN) as t:
        tiny_gpt2(_ids())
    (_, reference), *_ = calls
    assert isinstance(t.output, tuple)
    assert len(t.output) == len(reference)
    assert t.output[0] is reference[0]  # nethook's default: a reference, no copy
    assert t.output[0].requires_grad  # ... still attached to the graph (detach=False)


def test_clone_and_detach(tiny_gpt2: nn.Module) -> None:
    module = tiny_gpt2.get_submodule(MLP)
    with raw_references(module) as calls:
        with nethook.Trace(tiny_gpt2, MLP, clone=True) as cloned:
            tiny_gpt2(_ids())
        with nethook.Trace(tiny_gpt2, MLP, detach=True) as detached:
            tiny_gpt2(_ids())
    assert cloned.output is not calls[0][1]
    assert torch.equal(cloned.output, calls[0][1])
    assert cloned.output.data_ptr() != calls[0][1].data_ptr()
    assert cloned.output.requires_grad
    assert not detached.output.requires_grad
    assert torch.equal(detached.output, calls[1][1])
    assert detached.output.data_ptr() == calls[1][1].data_ptr()  # detached, not copied


def test_retain_input_is_the_only_argument_or_their_tuple() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    model = nn.Sequential(nn.Linear(3, 3))
    x = torch.randn(2, 3)
    with nethook.Trace(model, "0", retain_input=True) as t:
        model(x)
    assert t.input is x
    two = Two()
    a, b = torch.randn(2), torch.randn(2)
    with nethook.Trace(two, retain_input=True, retain_output=False) as t2:
        two(a, b)
    assert isinstance(t2.input, tuple)
    assert t2.input[0] is a
    assert t2.input[1] is b
    with pytest.raises(AttributeError, match="retain_output=True"):
        _ = t2.output


def test_last_call_wins() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(2, 3)
    with raw_references(shared) as calls, nethook.Trace(model, "0", retain_input=True) as t:
        model(x)
    assert len(calls) == 2
    assert t.output is calls[1][1]
    assert t.input is calls[1][0][0]


def test_output_before_any_call_is_an_attribute_error() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    with nethook.Trace(model, "0") as t:
        assert not hasattr(t, "output")
        with pytest.raises(AttributeError, match="has not run"):
            _ = t.output


# -- edits --------------------------------------------------------------------------------


def _edit_named(output: Any, layer: str) -> Any:
    return (output[0] * 0.5 + (1.0 if layer == ATTN else 0.0), *output[1:])


def _edit_positional(o: Any, name: str) -> Any:
    return (o[0] * 0.5 + (1.0 if name == ATTN else 0.0), *o[1:])


def _edit_reversed(layer: str, output: Any) -> Any:
    return (output[0] * 0.5 + (1.0 if layer == ATTN else 0.0), *output[1:])


def _edit_keyword_only(*, output: Any) -> Any:
    return (output[0] * 0.5 + 1.0, *output[1:])


@pytest.mark.parametrize(
    "edit", [_edit_named, _edit_positional, _edit_reversed, _edit_keyword_only], ids=repr
)
def test_edit_output_by_parameter_name(tiny_gpt2: nn.Module, edit: Any) -> None:
    module = tiny_gpt2.get_submodule(ATTN)
    ids = _ids()
    with torch.no_grad():
        with raw_hooks_whole(module, lambda out: (out[0] * 0.5 + 1.0, *out[1:])):
            expected = tiny_gpt2(ids).logits
        with nethook.Trace(tiny_gpt2, ATTN, edit_output=edit) as t:
            got = tiny_gpt2(ids).logits
        with raw_references(module) as calls:
            tiny_gpt2(ids)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(t.output[0], calls[0][1][0] * 0.5 + 1.0)  # the edited tuple


def test_edit_output_receives_the_inputs_and_the_layer_name() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    seen: list[Any] = []

    def edit(output: torch.Tensor, layer: str, inputs: tuple[Any, ...]) -> torch.Tensor:
        seen.append((layer, inputs))
        return output + inputs[0].sum()

    x = torch.randn(2, 3)
    with torch.no_grad(), nethook.TraceDict(model, ["0", "1"], edit_output=edit):
        got = model(x)
    assert [layer for layer, _ in seen] == ["0", "1"]
    assert seen[0][1][0] is x
    with torch.no_grad():
        h = model[0](x) + x.sum()
        expected = model[1](h) + h.sum()
    torch.testing.assert_close(got, expected)


def test_edit_returning_none_keeps_the_output() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    x = torch.randn(2, 3)
    with torch.no_grad(), nethook.Trace(model, "0", edit_output=lambda output: None) as t:
        out = model(x)
    assert torch.equal(out, model(x).detach())
    assert torch.equal(t.output, out)


def test_an_edit_that_cannot_be_called_is_a_type_error() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="'extra'"):
        nethook.Trace(model, "0", edit_output=lambda output, layer, inputs, extra: output)


# -- gradients ------------------------------------------------------------------------


def test_retain_grad_fills_output_grad_even_before_an_in_place_op() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    with nethook.Trace(model, "0", retain_grad=True) as t:
        y = model(x)
    y.sum().backward()
    # The reference: plain autograd on the hidden activation.
    with torch.no_grad():
        h = model[0](x)
    h.requires_grad_(True)
    (expected,) = torch.autograd.grad(model[2](torch.relu(h)).sum(), h)
    assert t.output.grad is not None
    torch.testing.assert_close(t.output.grad, expected)


def test_retain_grad_on_a_module_that_needs_no_grad() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    nethook.set_requires_grad(False, model)
    x = torch.randn(5, 3)
    with nethook.Trace(model, "0", retain_grad=True) as t:
        y = model(x)
    y.sum().backward()
    expected = model[1].weight.detach().expand(5, 4)
    torch.testing.assert_close(t.output.grad, expected)


# -- stop -------------------------------------------------------------------------------


def test_stop_ends_the_forward_and_the_block_catches_it(tiny_gpt2: nn.Module) -> None:
    reached = []
    later_block = tiny_gpt2.get_submodule("transformer.h.1")
    with (
        count_calls(later_block) as later,
        nethook.Trace(tiny_gpt2, "transformer.h.0", stop=True) as t,
    ):
        tiny_gpt2(_ids())
        reached.append(True)
    assert reached == []
    assert later == []
    assert t.output.shape == (2, 6, 32)


def test_stop_without_a_block_raises_stop_forward() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    t = nethook.Trace(model, "0", stop=True)
    try:
        with pytest.raises(nethook.StopForward):
            model(torch.randn(2, 3))
    finally:
        t.close()
    assert t.output.shape == (2, 3)


def test_trace_dict_stops_after_the_last_layer_listed() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    with count_calls(model[2]) as third, nethook.TraceDict(model, ["1", "0"], stop=True) as td:
        model(torch.randn(2, 3))
    # "0" is listed last: the forward stops after it, so "1" never runs.
    assert third == []
    assert td["0"].output.shape == (2, 3)
    with pytest.raises(AttributeError, match="has not run"):
        _ = td["1"].output


# -- hooks from construction, layer=None, closing ---------------------------------------


def test_hooks_are_active_from_construction_until_close(hook_snapshot: Any) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    before = hook_snapshot(model)
    t = nethook.Trace(model, "1", edit_output=lambda output: output + 1)
    x = torch.randn(2, 3)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, torch.relu(model[0](x)) + 1)
        assert torch.equal(t.output, out)
        t.close()
        t.close()  # idempotent
        assert hook_snapshot(model) == before
        torch.testing.assert_close(model(x), torch.relu(model[0](x)))


def test_layer_none_hooks_the_module_itself() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    x = torch.randn(2, 3)
    with nethook.Trace(model, edit_output=lambda output, layer: output * 2) as t:
        out = model(x)
    assert t.layer is None
    assert t.output is out
    torch.testing.assert_close(out, model[0](x) * 2)


def test_an_error_in_the_block_removes_every_hook(hook_snapshot: Any) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    before = hook_snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), nethook.TraceDict(model, ["0", "1"]):
        raise RuntimeError("boom")
    assert hook_snapshot(model) == before


def test_a_bad_layer_in_trace_dict_leaves_no_hook(hook_snapshot: Any) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    before = hook_snapshot(model)
    with pytest.raises(LookupError, match="no module named '00'; closest: '0'"):
        nethook.TraceDict(model, ["0", "00", "1"])
    assert hook_snapshot(model) == before


# -- TraceDict ------------------------------------------------------------------------


def test_trace_dict_matches_plain_hooks(tiny_gpt2: nn.Module) -> None:
    names = ["transformer.h.1", ATTN, "transformer.h.1"]
    attn, h1 = tiny_gpt2.get_submodule(ATTN), tiny_gpt2.get_submodule("transformer.h.1")
    with (
        torch.no_grad(),
        raw_references(attn) as attn_calls,
        raw_references(h1) as h1_calls,
        nethook.TraceDict(tiny_gpt2, names, clone=True) as td,
    ):
        tiny_gpt2(_ids())
    assert list(td) == ["transformer.h.1", ATTN]  # listed order, once each
    torch.testing.assert_close(td[ATTN].output[0], attn_calls[0][1][0])
    torch.testing.assert_close(td["transformer.h.1"].output, h1_calls[0][1])


def test_trace_dict_with_per_layer_options() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    x = torch.randn(2, 3)
    layers = {"0": {"retain_input": True, "edit_output": lambda output: output * 0}, "1": {}}
    with torch.no_grad(), nethook.TraceDict(model, layers, detach=True) as td:
        out = model(x)
    assert torch.equal(td["0"].input, x)
    assert not td["0"].output.requires_grad
    assert torch.equal(td["0"].output, torch.zeros(2, 3))
    with pytest.raises(AttributeError, match="retain_input=True"):
        _ = td["1"].input
    torch.testing.assert_close(out, model[1](torch.zeros(2, 3)))
    with pytest.raises(SpecError, match="options of layer '0'"):
        nethook.TraceDict(model, {"0": {"retain": True}})
    with pytest.raises(SpecError, match=r"\['0'\]"):
        nethook.TraceDict(model, "0")  # type: ignore[arg-type]


# -- helpers ----------------------------------------------------------------------------


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 3),
        nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)),
        nn.ReLU(),
        nn.Linear(3, 2),
    )


@pytest.mark.parametrize(
    ("kwargs", "by_hand"),
    [
        ({"first_layer": "1", "last_layer": "2"}, lambda m, x: m[2](m[1](x))),
        ({"after_layer": "0", "upto_layer": "3"}, lambda m, x: m[2](m[1](x))),
        ({"after_layer": "1.0"}, lambda m, x: m[3](m[2](m[1][2](m[1][1](x))))),
        ({"upto_layer": "1.2"}, lambda m, x: m[1][1](m[1][0](m[0](x)))),
        ({"first_layer": "1.1", "last_layer": "2"}, lambda m, x: m[2](m[1][2](m[1][1](x)))),
        ({"single_layer": "1.1"}, lambda m, x: m[1][1](x)),
        ({"last_layer": "0"}, lambda m, x: m[0](x)),
    ],
)
def test_subsequence_runs_the_layers_it_names(kwargs: dict[str, str], by_hand: Any) -> None:
    model = _chain()
    part = nethook.subsequence(model, **kwargs)
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(part(x), by_hand(model, x))


def test_subsequence_copies_unless_sharing_weights() -> None:
    model = _chain()
    copied = nethook.subsequence(model, first_layer="0", last_layer="1")
    shared = nethook.subsequence(model, first_layer="0", last_layer="1", share_weights=True)
    assert shared[0] is model[0]
    assert copied[0] is not model[0]
    assert torch.equal(copied[0].weight, model[0].weight)
    model.eval()
    assert not nethook.subsequence(model, last_layer="2").training


def test_subsequence_errors() -> None:
    model = _chain()
    with pytest.raises(LookupError, match=r"'1\.7'"):
        nethook.subsequence(model, first_layer="1.7")
    with pytest.raises(SpecError, match=r"not an nn\.Sequential"):
        nethook.subsequence(model, first_layer="0.weight")
    with pytest.raises(SpecError, match="not both"):
        nethook.subsequence(model, first_layer="0", after_layer="1")


def test_module_and_parameter_lookup(tiny_gpt2: nn.Module) -> None:
    assert nethook.get_module(tiny_gpt2, ATTN) is tiny_gpt2.transformer.h[0].attn
    assert nethook.get_module(tiny_gpt2, "") is tiny_gpt2
    weight = nethook.get_parameter(tiny_gpt2, "transformer.h.0.mlp.c_fc.weight")
    assert weight is tiny_gpt2.transformer.h[0].mlp.c_fc.weight
    assert nethook.module_names(tiny_gpt2) == [n for n, _ in tiny_gpt2.named_modules()]
    with pytest.raises(LayerNotFoundError, match=r"closest: 'transformer\.h\.0\.attn'"):
        nethook.get_module(tiny_gpt2, "transformer.h.0.atn")
    with pytest.raises(LookupError, match="no parameter"):
        nethook.get_parameter(tiny_gpt2, "transformer.h.0.mlp.weight")


def test_replace_module_and_set_requires_grad() -> None:
    model = _chain()
    new = nn.Identity()
    nethook.replace_module(model, "1.1", new)
    assert model[1][1] is new
    nethook.replace_module(model, "2", nn.Tanh())
    assert isinstance(model[2], nn.Tanh)
    with pytest.raises(LookupError):
        nethook.replace_module(model, "1.9", nn.Identity())
    nethook.set_requires_grad(False, model)
    assert not any(p.requires_grad for p in model.parameters())
    t = torch.zeros(2)
    nethook.set_requires_grad(True, model[0], t)
    assert t.requires_grad
    assert all(p.requires_grad for p in model[0].parameters())
    assert not model[3].weight.requires_grad
    with pytest.raises(HookfnError, match="modules and tensors"):
        nethook.set_requires_grad(True, "model")  # type: ignore[arg-type]


def test_recursive_copy() -> None:
    a = torch.randn(2, requires_grad=True) * 1
    value = {"a": (a, None, [a]), "n": 3}
    assert nethook.recursive_copy(value) is value
    copied = nethook.recursive_copy(value, clone=True, detach=True)
    assert copied["n"] == 3
    assert copied["a"][1] is None
    for tensor in (copied["a"][0], copied["a"][2][0]):
        assert tensor.data_ptr() != a.data_ptr()
        assert not tensor.requires_grad
        assert torch.equal(tensor, a)
    leaf = torch.randn(2)
    kept = nethook.recursive_copy((leaf,), retain_grad=True)
    assert kept[0] is leaf
    assert leaf.requires_grad


def test_invoke_with_optional_args() -> None:
    invoke = nethook.invoke_with_optional_args
    assert invoke(lambda output, layer: (output, layer), output=1, layer="a") == (1, "a")
    assert invoke(lambda layer, output: (layer, output), output=1, layer="a") == ("a", 1)
    assert invoke(lambda x, y: (x, y), output=1, layer="a") == (1, "a")
    assert invoke(lambda x: x, output=1, layer="a") == 1
    assert invoke(lambda x, y=5: (x, y), 7) == (7, 5)
    assert invoke(lambda *args, **kwargs: (args, kwargs), 1, z=2) == ((1,), {"z": 2})
    with pytest.raises(TypeError, match="'missing'"):
        invoke(lambda output, missing: output, output=1)


def test_works_with_a_deep_copy_of_the_model() -> None:
    # Traces of two models with the same names act on their own model only.
    model = nn.Sequential(nn.Linear(3, 3))
    other = copy.deepcopy(model)
    x = torch.randn(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), nethook.Trace(model, "0", edit_output=lambda output: output * 0):
            assert torch.equal(model(x), torch.zeros(2, 3))
            assert torch.equal(other(x), other[0](x))
