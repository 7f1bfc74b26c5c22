"""The hook path: hook order, what a capture holds, edit errors in context, objects a
capture cannot copy, and the one stop-early rule."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from reference import count_calls, raw_hooks_whole, raw_run
from torch import Tensor, nn

from hookfn import (
    Args,
    EditError,
    Hook,
    Omitted,
    PartialEditWarning,
    Trace,
    TraceMultiple,
    add,
    replace,
    run_with_hooks,
    scale,
)


def test_the_edit_runs_before_other_hooks_and_the_capture_after_them() -> None:
    """A user's hook on the same module sees the edit; when it changes the output too, the
    capture holds what the rest of the model receives."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    a, c = torch.randn(4), torch.randn(4)
    seen: list[Tensor] = []

    def users_hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        seen.append(out.detach().clone())
        return out + c

    handle = model[0].register_forward_hook(users_hook)
    try:
        with torch.no_grad():
            out, caches = run_with_hooks(model, x, {"0": add(a)})
    finally:
        handle.remove()
    ref_out, ref = raw_run(model, x, {"0": lambda h: h + a + c}, capture=["0"])
    torch.testing.assert_close(seen[0], ref["0"] - c)  # the user's hook saw the edit
    torch.testing.assert_close(caches["0"].output, ref["0"])  # what the next layer got
    torch.testing.assert_close(out, ref_out)


def test_edit_errors_name_the_edit_and_the_site() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(EditError, match=r"at layer '0' \(output, call 0\).*shape") as info:
        run_with_hooks(model, torch.randn(2, 4), {"0": lambda h: h[:, :2]})
    assert "returned shape (2, 2)" in str(info.value)
    assert model[0]._forward_hooks == {}


class _Cache:
    """An object no copy can take apart (as a transformers ``DynamicCache``)."""

    def __init__(self) -> None:
        self.keys = [torch.zeros(1)]


class _WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.cache = _Cache()

    def forward(self, x: Tensor) -> tuple[Tensor, _Cache]:
        return self.linear(x), self.cache


def test_objects_a_capture_cannot_copy_are_omitted_unless_references_are_asked() -> None:
    model = nn.Sequential(_WithCache())
    x = torch.randn(2, 4)
    _, caches = run_with_hooks(model, x, ["0"])
    tensor, placeholder = caches["0"].raw_output
    assert placeholder == Omitted("_Cache")
    torch.testing.assert_close(tensor, model[0].linear(x))
    _, by_reference = run_with_hooks(model, x, {"0": Hook(clone=False)})
    assert by_reference["0"].raw_output[1] is model[0].cache


def test_one_stop_early_rule_for_inputs_and_outputs() -> None:
    """A site is done once its last forward record of its first call is taken: the input
    of a layer whose output is not kept stops the forward before the layer runs."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with count_calls(model[1]) as calls, torch.no_grad():
        out, caches = run_with_hooks(
            model, x, {"1": Hook(input=True, output=False)}, stop_early=True
        )
    assert out is None
    assert calls == [1]
    torch.testing.assert_close(caches["1"].input, model[0](x))
    with count_calls(model[2]) as later, torch.no_grad():
        run_with_hooks(model, x, {"1": Hook(input=True)}, stop_early=True)
    assert later == []  # with the output kept, it stops after the layer


def test_stop_ends_a_trace_block_normally() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    reached = []
    with Trace(model, "0", stop=True) as t, torch.no_grad():
        model(x)
        reached.append(True)  # skipped: the forward stopped at layer 0
    assert reached == []
    torch.testing.assert_close(t.output, model[0](x))
    assert model[0]._forward_hooks == {}


def test_whole_structure_edits_see_and_replace_the_whole_value() -> None:
    """``Hook(whole=True)``: the output tuple and the argument list, as a raw hook sees them;
    the result replaces them unchecked (here: a batch grown from 1 row to 3)."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: Tensor, *, shift: Tensor) -> tuple[Tensor, Tensor]:
            return self.linear(x) + shift, x

    model = nn.Sequential(Pair())
    x, shift, other = torch.randn(1, 4), torch.randn(4), torch.randn(4)

    def grow(args: Args) -> Args:
        return Args(args.args[0].expand(3, 4), shift=other)

    def swap(out: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return out[1], out[0]

    hook = Hook(swap, edit_input=grow, input=True, whole=True)
    with torch.no_grad():
        out, caches = run_with_hooks(model, Args(x, shift=shift), {"0": hook}, forward=model[0])
        expected = model[0].linear(x.expand(3, 4)) + other
    torch.testing.assert_close(out[1], expected)
    torch.testing.assert_close(out[0], x.expand(3, 4))
    assert torch.equal(caches["0"].raw_input.kwargs["shift"], other)
    assert caches["0"].raw_output[0].shape == (3, 4)


def test_a_transformers_cache_in_an_output_is_omitted(tiny_gpt2: nn.Module) -> None:
    """A ``DynamicCache`` changes after the run and holds the graph: it is left out."""
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        out, caches = run_with_hooks(
            tiny_gpt2, {"input_ids": ids, "use_cache": True}, ["transformer"]
        )
    raw = caches["transformer"].raw_output
    cache_key = next(k for k in raw if k != "last_hidden_state")
    assert type(raw[cache_key]) is Omitted
    assert "Cache" in raw[cache_key].type_name
    assert type(out[cache_key]).__name__ == raw[cache_key].type_name  # the model's own, kept
    with torch.no_grad():
        torch.testing.assert_close(
            raw["last_hidden_state"], tiny_gpt2.transformer(ids).last_hidden_state
        )


# -- edits that cannot take effect: a structure whose other tensors the model reads --------


def _mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return MixtralForCausalLM(config).eval()


def _clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": 64,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
        vision_config={**small, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )
    return CLIPModel(config).eval()


def test_an_edit_of_a_routers_logits_warns_and_a_whole_edit_reaches_the_experts() -> None:
    model = _mixtral()
    ids = torch.randint(0, 64, (1, 5))
    router = "model.layers.0.mlp.gate"
    with torch.no_grad():
        plain = model(ids).logits
        with pytest.warns(PartialEditWarning, match="router|other floating-point"):
            out, _ = run_with_hooks(model, ids, {router: replace(0.0)})
    torch.testing.assert_close(out.logits, plain)  # the experts read the untouched scores

    def even_scores(output: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        logits, scores, indices = output
        return logits, torch.full_like(scores, 0.5), indices

    with torch.no_grad():
        out, _ = run_with_hooks(model, ids, {router: Hook(even_scores, whole=True)})
        with raw_hooks_whole(model.get_submodule(router), even_scores):
            reference = model(ids).logits
    torch.testing.assert_close(out.logits, reference)
    assert not torch.allclose(out.logits, plain)


def test_an_edit_of_clips_hidden_states_warns_and_a_whole_edit_reaches_the_pooled_output() -> None:
    model = _clip()
    inputs = {"input_ids": torch.randint(2, 64, (2, 5)), "pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        plain = model(**inputs).logits_per_image
        with pytest.warns(PartialEditWarning, match="BaseModelOutputWithPooling"):
            out, _ = run_with_hooks(model, inputs, {"text_model": replace(0.0)})
    torch.testing.assert_close(out.logits_per_image, plain)  # CLIPModel reads pooler_output
    shift = torch.randn(16)

    def shift_pooled(output: Any) -> Any:
        output["pooler_output"] = output["pooler_output"] + shift
        return output

    with torch.no_grad():
        out, _ = run_with_hooks(model, inputs, {"text_model": Hook(shift_pooled, whole=True)})
        with raw_hooks_whole(model.text_model, shift_pooled):
            reference = model(**inputs).logits_per_image
    torch.testing.assert_close(out.logits_per_image, reference)
    assert not torch.allclose(out.logits_per_image, plain)


def test_input_edits_run_before_other_pre_hooks_and_input_captures_after_them() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    a, c = torch.randn(4), torch.randn(4)
    seen: list[Tensor] = []

    def users_pre_hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        seen.append(args[0].detach().clone())
        return (args[0] + c,)

    handle = model[1].register_forward_pre_hook(users_pre_hook)
    try:
        with torch.no_grad():
            out, caches = run_with_hooks(model, x, {"1": Hook(edit_input=add(a), input=True)})
            h = model[0](x)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], h + a)  # the user's pre-hook saw the edit
    torch.testing.assert_close(caches["1"].input, h + a + c)  # what the module received
    with torch.no_grad():
        torch.testing.assert_close(out, model[1](h + a + c))


def test_an_edit_grad_acts_on_a_backward_pass_after_the_block() -> None:
    """Gradient hooks live on the run's own graph: a backward pass through that graph after
    the block still meets them; a new forward pass builds a graph without them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with Trace(model, "0", hook=Hook(edit_grad=lambda g: g * 0, grad=True)) as t:
        y = model(x)
    y.sum().backward()  # after the block
    assert torch.equal(model[0].weight.grad, torch.zeros_like(model[0].weight))
    assert torch.equal(t.grad_output, torch.zeros(3, 4))
    model.zero_grad()
    model(x).sum().backward()  # a new graph: no edit
    h = model[0](x).detach().requires_grad_()
    (reference,) = torch.autograd.grad(model[2](model[1](h)).sum(), h)
    torch.testing.assert_close(model[0].bias.grad, reference.sum(0))


def test_a_capture_keeps_only_its_part() -> None:
    """``Hook(part=...)``: an index or a function applied before the copy; the copy holds
    the part's memory only, not a view of the whole activation."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        h = model[0](x)
        _, caches = run_with_hooks(
            model,
            x,
            {
                "0": Hook(part=(slice(None), -1)),
                "1": Hook(part=lambda t: t.mean(1), input=True),
            },
        )
    last = caches["0"].output
    torch.testing.assert_close(last, h[:, -1])
    assert last.untyped_storage().nbytes() == last.numel() * last.element_size()
    torch.testing.assert_close(caches["1"].output, torch.tanh(h).mean(1))
    torch.testing.assert_close(caches["1"].input, h.mean(1))


def test_a_part_that_does_not_fit_names_the_layer() -> None:
    from hookfn import CaptureError, SpecError

    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(CaptureError, match=r"layer '0' \(shape \(2, 4\)\)"):
        run_with_hooks(model, torch.randn(2, 4), {"0": Hook(part=(slice(None), 7))})
    assert not model[0]._forward_hooks
    with pytest.raises(SpecError, match="part"):
        Hook(part="last")


# -- gradients at sites that share one tensor ---------------------------------------------


def test_a_parent_and_its_last_child_take_their_gradients_in_flow_order() -> None:
    """A parent returns its last child's tensor: the parent's gradient step comes first
    (nearer the metric), the child's after it, as the gradient flows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    metric = lambda y: y.sum()  # noqa: E731
    expected = model[1].weight.detach().expand(3, 4)  # d metric / d output of "0"
    _, caches = run_with_hooks(
        model, x, {"0": Hook(edit_grad=scale(0.0)), "0.1": Hook(grad=True)}, backward=metric
    )
    assert torch.equal(caches["0.1"].grad_output, torch.zeros(3, 4))  # after the parent's edit
    _, caches = run_with_hooks(
        model, x, {"0": Hook(grad=True), "0.1": Hook(edit_grad=scale(0.0))}, backward=metric
    )
    torch.testing.assert_close(caches["0"].grad_output, expected)  # before the child's edit


def test_an_identity_probe_takes_the_gradient_through_itself_only() -> None:
    class Probed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.probe = nn.Identity()
            self.out = nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = self.inp(x)
            return self.out(self.probe(h)) + h.sin().sum(-1, keepdim=True)

    torch.manual_seed(0)
    model, x = Probed(), torch.randn(3, 4)
    _, caches = run_with_hooks(model, x, {"probe": Hook(grad=True)}, backward=lambda y: y.sum())
    torch.testing.assert_close(caches["probe"].grad_output, model.out.weight.detach().expand(3, 4))


def test_checkpointing_a_layer_called_twice_warns_about_the_replayed_calls() -> None:
    from torch.utils.checkpoint import checkpoint

    from hookfn import HookfnWarning

    shared = nn.Linear(4, 4)

    def segment(x: Tensor) -> Tensor:
        return torch.tanh(shared(torch.tanh(shared(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = shared

        def forward(self, x: Tensor) -> Tensor:
            return checkpoint(segment, x, use_reentrant=False)  # type: ignore[no-any-return]

    x = torch.randn(2, 4, requires_grad=True)
    with pytest.warns(HookfnWarning, match="called several times"):
        run_with_hooks(Net(), x, {"shared": Hook(add(1.0), grad=True)}, backward=lambda y: y.sum())


def test_a_nested_run_keeps_a_users_prepended_hook_in_front() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    seen: list[Tensor] = []
    with TraceMultiple(model, {"0": add(1.0)}), torch.no_grad():
        handle = model[0].register_forward_hook(
            lambda m, a, o: seen.append(o.clone()), prepend=True
        )
        try:
            run_with_hooks(model, x, {"0": add(0.0)})  # a nested run inserts its edit step
            model(x)
        finally:
            handle.remove()
        plain = model[0](x)
    assert len(seen) == 2  # the nested run's call, then the plain call
    torch.testing.assert_close(seen[1], plain - 1.0)  # still in front of the outer edit
