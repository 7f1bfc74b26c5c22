"""torch.compile: a hooked run of a compiled model is right, or a `CompileError`; never silent.

A compiled graph skips module hooks added after it was compiled, so a naive run returns an
unedited output and empty captures. Every case here first runs the compiled model without
hooks (the graph is compiled and cached), then hooks it, and compares with the uncompiled
model computed by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn

from hookfn import CompileError, HookfnError, Trace, TraceMultiple, add, run_with_hooks

BACKENDS = ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
STYLES = ["torch.compile(model)", "model.compile()"]


class Net(nn.Module):
    """Three linear layers (inductor compiles them without a C++ kernel: fast).

    A class of its own, so that dynamo's per-code caches do not mix with other tests'.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(self.b(self.a(x)))


def by_hand(net: Net, x: Tensor, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The uncompiled forward pass, with ``delta`` added to ``a``'s output: (out, b's out)."""
    with torch.no_grad():
        h = F.linear(x, net.a.weight, net.a.bias)
        if delta is not None:
            h = h + delta
        h = F.linear(h, net.b.weight, net.b.bias)
        return F.linear(h, net.c.weight, net.c.bias), h


def compile_as(style: str, net: nn.Module, backend: str) -> nn.Module:
    if style == "torch.compile(model)":
        return torch.compile(net, backend=backend)  # type: ignore[return-value]
    net.compile(backend=backend)  # in place: no wrapper, no _orig_mod
    return net


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, generator=generator), torch.randn(8, generator=generator)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hooked_run_of_a_compiled_model_equals_the_uncompiled_model(
    backend: str, style: str, data: tuple[Tensor, Tensor]
) -> None:
    x, delta = data
    net = Net()
    plain, _ = by_hand(net, x)
    edited, edited_b = by_hand(net, x, delta)
    compiled = compile_as(style, net, backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain)  # compiles, and caches the graph
        compiled_graphs = graphs()
        assert compiled_graphs >= 1

        out, caches = run_with_hooks(compiled, x, {"a": add(delta), "b": "capture"})

        torch.testing.assert_close(out, edited)
        torch.testing.assert_close(caches["b"].output, edited_b)
        assert caches["b"].n_calls == 1
        # The compiled model is as it was: its graph still runs, unhooked, with no recompile.
        torch.testing.assert_close(compiled(x), plain)
        assert graphs() == compiled_graphs


@pytest.mark.parametrize("style", STYLES)
def test_hooked_run_before_the_first_compiled_call(style: str, data: tuple[Tensor, Tensor]):
    # The run's hooks never reach dynamo, so the graph compiled afterwards has none in it.
    x, delta = data
    net = Net()
    compiled = compile_as(style, net, "eager")
    with torch.no_grad():
        out, caches = run_with_hooks(compiled, x, {"a": add(delta), "b": "capture"})
        torch.testing.assert_close(out, by_hand(net, x, delta)[0])
        torch.testing.assert_close(caches["b"].output, by_hand(net, x, delta)[1])
        torch.testing.assert_close(compiled(x), by_hand(net, x)[0])


def test_wrapper_prefix_names_work_too(data: tuple[Tensor, Tensor]):
    x, delta = data
    net = Net()
    compiled = torch.compile(net, backend="eager")
    with torch.no_grad():
        compiled(x)
        out, caches = run_with_hooks(
            compiled, x, {"_orig_mod.a": add(delta), "_orig_mod.b": "capture"}
        )
    torch.testing.assert_close(out, by_hand(net, x, delta)[0])
    torch.testing.assert_close(caches["_orig_mod.b"].output, by_hand(net, x, delta)[1])


def test_calling_the_compiled_wrapper_inside_a_block_is_an_error(data: tuple[Tensor, Tensor]):
    x, delta = data
    net = Net()
    compiled = torch.compile(net, backend="eager")
    with torch.no_grad():
        compiled(x)
        block = TraceMultiple(compiled, {"a": add(delta), "b": "capture"})
        with pytest.raises(CompileError, match=r"_orig_mod"), block:
            compiled(x)
        with pytest.raises(CompileError), Trace(compiled, "a", edit_output=add(delta)):
            compiled(x)
        # The fix the message gives: call the eager module inside the block.
        with TraceMultiple(compiled, {"a": add(delta), "b": "capture"}) as tm:
            out = compiled._orig_mod(x)
        torch.testing.assert_close(out, by_hand(net, x, delta)[0])
        torch.testing.assert_close(tm["b"].output, by_hand(net, x, delta)[1])
        # The guard is gone with the block: the compiled model runs as before.
        torch.testing.assert_close(compiled(x), by_hand(net, x)[0])
    assert not compiled._forward_pre_hooks


def test_forward_callables_are_run_eagerly_or_refused(data: tuple[Tensor, Tensor]):
    x, delta = data
    net = Net()
    compiled = torch.compile(net, backend="eager")
    edited, _ = by_hand(net, x, delta)
    spec = {"a": add(delta)}
    with torch.no_grad():
        compiled(x)
        # The compiled model itself, or a function compiled with torch.compile: run eagerly.
        out, _ = run_with_hooks(compiled, x, spec, forward=compiled)
        torch.testing.assert_close(out, edited)
        compiled_fn = torch.compile(lambda inp: net(inp) * 2, backend="eager")
        compiled_fn(x)
        out, _ = run_with_hooks(compiled, x, spec, forward=compiled_fn)
        torch.testing.assert_close(out, edited * 2)
        # An opaque function that calls the compiled wrapper: the guard refuses it.
        with pytest.raises(CompileError):
            run_with_hooks(compiled, x, spec, forward=lambda inp: compiled(inp))
        # ... and one that calls the eager module is fine.
        out, _ = run_with_hooks(compiled, x, spec, forward=lambda inp: compiled._orig_mod(inp))
        torch.testing.assert_close(out, edited)


def test_model_compiled_in_place_refuses_what_it_cannot_run_eagerly(data: tuple[Tensor, Tensor]):
    x, delta = data
    net = Net()
    net.compile(backend="eager")
    with torch.no_grad():
        net(x)
        # A Trace block would call net(x): compiled, hooks skipped. Refused up front.
        with pytest.raises(CompileError, match=r"compiled in place"):
            TraceMultiple(net, {"a": add(delta)})
        with pytest.raises(CompileError):
            Trace(net, "a")
        # forward= would call net(...) too.
        with pytest.raises(CompileError):
            run_with_hooks(net, x, {"a": add(delta)}, forward=lambda inp: net(inp))


@pytest.mark.parametrize(
    ("key", "works"),
    [("b", True), ("a", True), ("b._orig_mod", False)],
)
def test_compiled_submodule(key: str, works: bool, data: tuple[Tensor, Tensor]):
    # net.b = torch.compile(net.b): hooks on the wrapper itself run eagerly, around the
    # graph; a hook inside it (its _orig_mod) cannot act, and is refused.
    x, delta = data
    net = Net()
    reference = by_hand(net, x)
    net.b = torch.compile(net.b, backend="eager")  # type: ignore[assignment]
    edited: dict[str, Any] = {
        "a": by_hand(net_like(net), x, delta)[0],
        "b": F.linear(reference[1] + delta, net.c.weight, net.c.bias).detach(),
    }
    with torch.no_grad():
        net(x)
        if not works:
            with pytest.raises(CompileError, match=r"'b'"):
                run_with_hooks(net, x, {key: add(delta)})
            return
        out, _ = run_with_hooks(net, x, {key: add(delta)})
    torch.testing.assert_close(out, edited[key])


def net_like(net: Net) -> Net:
    """A `Net` with ``net``'s weights and no compiled parts (for `by_hand`)."""
    plain = Net()
    plain.a, plain.c = net.a, net.c
    plain.b = getattr(net.b, "_orig_mod", net.b)
    return plain


def test_submodule_compiled_in_place(data: tuple[Tensor, Tensor]):
    x, delta = data
    net = Net()
    edited_a, _ = by_hand(net, x, delta)
    net.b.compile(backend="eager")
    with torch.no_grad():
        net(x)
        with pytest.raises(CompileError, match=r"'b' was compiled in place"):
            run_with_hooks(net, x, {"b": add(delta)})
        # A layer outside the compiled one runs eagerly: fine.
        out, _ = run_with_hooks(net, x, {"a": add(delta)})
    torch.testing.assert_close(out, edited_a)


def test_compile_error_is_a_hookfn_error():
    assert issubclass(CompileError, HookfnError)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()))


@pytest.mark.parametrize("where", ["root", "ancestor", "site"])
def test_a_forward_replaced_by_a_compiled_function_is_refused(where: str) -> None:
    model = _net()
    target = {"root": model, "ancestor": model[1], "site": model[1][0]}[where]
    target.forward = torch.compile(target.forward, backend="eager")  # type: ignore[method-assign]
    x = torch.randn(2, 4)
    with pytest.raises(CompileError, match="compiled function"):
        run_with_hooks(model, x, {"1.0": add(1.0)})
    with pytest.raises(CompileError, match="compiled function"):
        TraceMultiple(model, {"1.0": add(1.0)})
    assert all(not m._forward_hooks for m in model.modules())
    del target.forward  # the eager forward is back: the edit acts
    out, _ = run_with_hooks(model, x, {"1.0": add(1.0)})
    with torch.no_grad():
        torch.testing.assert_close(out, model[1][1](model[1][0](model[0](x)) + 1.0))


def test_layers_accepts_a_compiled_model() -> None:
    from hookfn import layers

    model = _net()
    table = layers(torch.compile(model, backend="eager"), torch.randn(2, 4))
    assert table.names == ["0", "1", "1.0", "1.1"]
    assert table[0].shape == (2, 4)
