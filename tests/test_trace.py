"""`Trace` / `TraceMultiple`: the DeepHook API, against raw ``register_forward_hook`` references."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from reference import raw_hooks, raw_inputs, raw_run
from torch import Tensor, nn

from hookfn import CaptureError, Hook, HookfnError, SpecError, Trace, TraceMultiple


def _delta(seed: int = 0) -> Tensor:
    return torch.randn(32, generator=torch.Generator().manual_seed(seed))


def _registered(module: nn.Module) -> tuple[int, int]:
    return len(module._forward_hooks), len(module._forward_pre_hooks)


def test_deephook_readme_example(tiny_gpt2, gpt2_inputs):
    """The original README example, as written, with GPT-2 and an ``encoded_input`` dict."""
    model = tiny_gpt2
    encoded_input = gpt2_inputs

    # Reference: plain hooks doing what the README describes.
    names = ["transformer.wpe", "transformer.h.0"]
    with (
        torch.no_grad(),
        raw_hooks(model, {"transformer.h.0": lambda o: o + 1}, names) as ref,
        raw_inputs(model, ["transformer.h.0"]) as ref_inputs,
    ):
        ref_logits = model(**encoded_input).logits
    ((h0_args, _),) = ref_inputs["transformer.h.0"]

    # --- the README, verbatim ---
    def edit_fn(output):
        return output + 1  # a simple function that adds 1 to the output

    layer_settings = {
        "transformer.wpe": (True, False, None),  # retain output, don't retain input, no edit
        "transformer.h.0": (True, True, edit_fn),  # retain output and input, use edit_fn
        # Add more layers as needed...
    }

    with TraceMultiple(model, layer_settings) as tm, torch.no_grad():
        out = model(**encoded_input)

    # Access the input and output of each hooked layer
    wpe_output = tm["transformer.wpe"].output
    h0_input = tm["transformer.h.0"].input
    h0_output = tm["transformer.h.0"].output
    # --- end of the README ---

    assert torch.equal(wpe_output, ref["transformer.wpe"][0])
    assert torch.equal(h0_input, h0_args[0])
    assert torch.equal(h0_output, ref["transformer.h.0"][0])  # the EDITED output
    assert torch.equal(out.logits, ref_logits)
    with torch.no_grad():
        assert not torch.allclose(model(**encoded_input).logits, ref_logits)  # edit mattered


@pytest.mark.parametrize("takes_layer", [False, True])
def test_edit_fn_with_one_or_two_arguments(tiny_gpt2, gpt2_inputs, takes_layer):
    delta = _delta(1)
    layers_seen: list[Any] = []

    def edit_one(output):
        return output + delta

    def edit_two(output, layer):
        layers_seen.append(layer)
        return output + delta

    block = "transformer.h.1"
    ref_out, edited = raw_run(tiny_gpt2, gpt2_inputs, {block: lambda o: o + delta}, [block])
    want = ref_out.logits
    edit = edit_two if takes_layer else edit_one
    with Trace(tiny_gpt2, "transformer.h.1", edit_output=edit) as trace, torch.no_grad():
        out = tiny_gpt2(**gpt2_inputs)
    assert torch.equal(out.logits, want)
    assert torch.equal(trace.output, edited[block])
    if takes_layer:
        assert layers_seen == ["transformer.h.1"]
        assert isinstance(layers_seen[0], str)
        assert str(layers_seen[0]) == "transformer.h.1"
    else:
        assert layers_seen == []


@pytest.mark.parametrize("kind", ["Trace", "TraceMultiple"])
def test_edit_returning_none_leaves_output_unchanged(tiny_gpt2, gpt2_inputs, kind):
    calls: list[int] = []

    def observe(output):
        calls.append(1)
        return None

    with torch.no_grad():
        want = tiny_gpt2(**gpt2_inputs).logits
        _, ref = raw_run(tiny_gpt2, gpt2_inputs, capture=["transformer.h.0"])
        if kind == "Trace":
            ctx: Any = Trace(tiny_gpt2, "transformer.h.0", edit_output=observe)
        else:
            ctx = TraceMultiple(tiny_gpt2, {"transformer.h.0": (True, False, observe)})
        with ctx as t:
            out = tiny_gpt2(**gpt2_inputs)
    trace = t if kind == "Trace" else t["transformer.h.0"]
    assert calls == [1]
    assert torch.equal(out.logits, want)
    assert torch.equal(trace.output, ref["transformer.h.0"])


TRACE_FACTORIES = [
    pytest.param(lambda m: Trace(m, "transformer.h.0", retain_input=True), id="Trace"),
    pytest.param(
        lambda m: Trace(m, m.transformer.h[0], retain_input=True, edit_output=lambda o: o),
        id="Trace-module-object",
    ),
    pytest.param(
        lambda m: TraceMultiple(m, {"transformer.h.0": (True, True, None), "lm_head": "capture"}),
        id="TraceMultiple",
    ),
    pytest.param(lambda m: TraceMultiple(m, ["transformer.h.*"]), id="TraceMultiple-glob"),
]


@pytest.mark.parametrize("make", TRACE_FACTORIES)
def test_nothing_registered_before_enter_and_all_removed_after_exit(
    tiny_gpt2, gpt2_inputs, hook_snapshot, make
):
    before = hook_snapshot(tiny_gpt2)
    block = tiny_gpt2.transformer.h[0]
    base = _registered(block)
    ctx = make(tiny_gpt2)
    assert hook_snapshot(tiny_gpt2) == before  # constructing registers nothing
    with ctx:
        hooks, pre_hooks = _registered(block)
        assert hooks in (base[0] + 1, base[0] + 2)  # an edit step, and an after step
        assert pre_hooks in (base[1], base[1] + 1)
        with torch.no_grad():
            tiny_gpt2(**gpt2_inputs)
    assert hook_snapshot(tiny_gpt2) == before


@pytest.mark.parametrize("make", TRACE_FACTORIES)
def test_hooks_removed_when_the_block_raises(tiny_gpt2, gpt2_inputs, hook_snapshot, make):
    before = hook_snapshot(tiny_gpt2)

    def run_then_fail() -> None:
        with make(tiny_gpt2), torch.no_grad():
            tiny_gpt2(**gpt2_inputs)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_then_fail()
    assert hook_snapshot(tiny_gpt2) == before


def test_hooks_act_only_inside_the_block(tiny_gpt2, gpt2_inputs):
    delta = _delta(2)
    with torch.no_grad():
        clean = tiny_gpt2(**gpt2_inputs).logits
        with Trace(tiny_gpt2, "transformer.h.0", edit_output=lambda o: o + delta) as trace:
            edited = tiny_gpt2(**gpt2_inputs).logits
        after = tiny_gpt2(**gpt2_inputs).logits  # after exit: no edit, no new record
    assert not torch.allclose(clean, edited)
    assert torch.equal(after, clean)
    assert trace.capture.n_calls == 1


def test_retain_flags(tiny_gpt2, gpt2_inputs):
    with (
        Trace(tiny_gpt2, "transformer.h.0", retain_output=False, retain_input=True) as only_in,
        torch.no_grad(),
    ):
        tiny_gpt2(**gpt2_inputs)
    with pytest.raises(CaptureError, match="retain_output=True"):
        _ = only_in.output
    with torch.no_grad(), raw_inputs(tiny_gpt2, ["transformer.h.0"]) as ref:
        tiny_gpt2(**gpt2_inputs)
    ((args, _),) = ref["transformer.h.0"]
    assert torch.equal(only_in.input, args[0])

    with Trace(tiny_gpt2, "transformer.h.0") as only_out, torch.no_grad():
        tiny_gpt2(**gpt2_inputs)
    with pytest.raises(CaptureError, match="retain_input=True"):
        _ = only_out.input
    assert only_out.output.shape == (2, 6, 32)


def test_output_of_a_layer_that_did_not_run(tiny_gpt2):
    with Trace(tiny_gpt2, "transformer.h.0") as trace:
        pass
    with pytest.raises(CaptureError, match="recorded no output"):
        _ = trace.output


def test_unknown_layer_in_trace_multiple(tiny_gpt2, gpt2_inputs):
    with TraceMultiple(tiny_gpt2, ["transformer.h.0", "lm_head"]) as tm, torch.no_grad():
        tiny_gpt2(**gpt2_inputs)
    with pytest.raises(CaptureError, match=r"transformer\.h\.1.*traced layers") as info:
        _ = tm["transformer.h.1"]
    assert isinstance(info.value, LookupError)
    assert "transformer.h.1" not in tm
    assert "lm_head" in tm
    assert tm.get("transformer.h.1") is None
    assert tm.get("lm_head") is tm["lm_head"]
    assert list(tm) == ["transformer.h.0", "lm_head"]
    assert len(tm) == 2
    assert list(tm.captures()) == ["transformer.h.0", "lm_head"]


def test_trace_of_a_glob_matching_several_layers_is_an_error(tiny_gpt2):
    with pytest.raises(SpecError, match="TraceMultiple"):
        Trace(tiny_gpt2, "transformer.h.*")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda m: Trace(m, "transformer.h.0"), id="Trace"),
        pytest.param(lambda m: TraceMultiple(m, ["transformer.h.0"]), id="TraceMultiple"),
    ],
)
def test_entering_twice_at_once_is_an_error_and_reentry_after_exit_works(
    tiny_gpt2, gpt2_inputs, hook_snapshot, make
):
    before = hook_snapshot(tiny_gpt2)
    ctx = make(tiny_gpt2)
    with ctx:
        with pytest.raises(HookfnError, match="already active"), ctx:
            pass
        with torch.no_grad():
            tiny_gpt2(**gpt2_inputs)
    assert hook_snapshot(tiny_gpt2) == before
    with ctx, torch.no_grad():  # a second use starts from fresh records
        tiny_gpt2(**gpt2_inputs)
        tiny_gpt2(**gpt2_inputs)
    trace = ctx if isinstance(ctx, Trace) else ctx["transformer.h.0"]
    assert trace.capture.n_calls == 2
    assert hook_snapshot(tiny_gpt2) == before


def test_trace_multiple_records_match_raw_hooks_for_every_block(tiny_gpt2, gpt2_inputs):
    _, ref = raw_run(tiny_gpt2, gpt2_inputs, capture=["transformer.h.0", "transformer.h.1"])
    with (
        TraceMultiple(tiny_gpt2, {"transformer.h.*": (True, False, None)}) as tm,
        torch.no_grad(),
    ):
        tiny_gpt2(**gpt2_inputs)
    assert torch.equal(tm["transformer.h.0"].output, ref["transformer.h.0"])
    assert torch.equal(tm["transformer.h.1"].output, ref["transformer.h.1"])


def test_a_gradient_capture_does_not_depend_on_read_order() -> None:
    """nethook's retain_grad pattern: read the output after the block, then backward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with Trace(model, "0", hook=Hook(grad=True)) as t:
        y = model(x)
    _ = t.output  # read before the backward pass
    y.sum().backward()
    h = model[0](x).detach().requires_grad_()
    (reference,) = torch.autograd.grad(model[2](model[1](h)).sum(), h)
    torch.testing.assert_close(t.grad_output, reference)
    torch.testing.assert_close(t.capture.grad_output, reference)


def test_stop_early_ends_a_trace_multiple_block_normally() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with TraceMultiple(model, ["0"], stop_early=True) as tm, torch.no_grad():
        model(x)
        raise AssertionError("not reached: the forward stopped")
    torch.testing.assert_close(tm["0"].output, model[0](x))


def test_an_exit_taken_inside_a_block_never_closes_a_later_run() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.randn(2, 4)
    trace = Trace(model, "0", edit_output=lambda h: h * 0)
    with trace, torch.no_grad():
        model(x)
        taken = trace.__exit__
    trace.__enter__()
    try:
        del taken  # dropped: it belonged to the first run
        assert len(model[0]._forward_hooks) == 2
        with torch.no_grad():
            assert torch.equal(model(x), torch.zeros(2, 4))
    finally:
        trace.__exit__(None, None, None)
    assert not model[0]._forward_hooks


def test_bad_arguments_of_the_context_managers_are_spec_errors() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    tm = TraceMultiple(model, ["0"])
    with pytest.raises(HookfnError, match="belongs to a TraceMultiple"), tm["0"]:
        pass
    with pytest.raises(SpecError, match="TraceMultiple for several"):
        Trace(model, ["0"])  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="strict"):
        TraceMultiple(model, ["0"], strict="yes")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="DataParallel"):
        TraceMultiple(torch.nn.DataParallel(model), ["module.0"], stop_early=True)
    assert not model[0]._forward_hooks
