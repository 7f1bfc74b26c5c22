"""torch.compile on CUDA, inductor in its default mode and in ``"reduce-overhead"`` (CUDA graphs).

As on the CPU (tests/test_compile.py): a hooked run of a compiled model gives the edited
output and the captures of the uncompiled model computed by hand, or raises `CompileError`;
it never returns an output with the hooks silently dropped. The compiled model runs first
without hooks (its graph is compiled, and CUDA graphs are recorded after their warm-up
calls), then hooked, then unhooked again. An output of a CUDA-graph replay is overwritten by
the next replay, so each one is compared (or cloned) before the next call. Which of the two
outcomes each case had is recorded as the JUnit property ``outcome``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from conftest import make_tiny_gpt2
from test_compile import by_hand  # the same three-layer computation, written out
from torch import Tensor, nn

from hookfn import CompileError, TraceMultiple, add, run_with_hooks

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODES = ["default", "reduce-overhead"]
STYLES = ["torch.compile(model)", "model.compile()"]
WARMUP_CALLS = 3  # CUDA graph trees record on a later call than the first


class CudaNet(nn.Module):
    """Three linear layers; a class of its own, so dynamo's caches do not mix with others'."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(self.b(self.a(x)))  # type: ignore[no-any-return]


def compile_as(style: str, model: nn.Module, mode: str) -> nn.Module:
    if style == "torch.compile(model)":
        return torch.compile(model, mode=mode)  # type: ignore[return-value]
    model.compile(mode=mode)  # in place: no wrapper, no _orig_mod
    return model


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x, delta = torch.randn(8, 16, generator=generator), torch.randn(32, generator=generator)
    return x.cuda(), delta.cuda()


def hooked_or_refused(run: Callable[[], Any], record: Callable[[str, object], None]) -> Any:
    """``run()``'s result, or None where it raised `CompileError` (recorded either way)."""
    try:
        result = run()
    except CompileError as error:
        record("outcome", f"refused: {error}")
        return None
    record("outcome", "hooked")
    return result


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("mode", MODES)
def test_hooked_run_of_a_compiled_model_is_right_or_refused(
    mode: str, style: str, data: tuple[Tensor, Tensor], record_property: Any
) -> None:
    x, delta = data
    net = CudaNet().cuda()
    plain, _ = by_hand(net, x)
    edited, edited_b = by_hand(net, x, delta)
    compiled = compile_as(style, net, mode)
    with torch.no_grad():
        for _ in range(WARMUP_CALLS):
            torch.testing.assert_close(compiled(x), plain)
        result = hooked_or_refused(
            lambda: run_with_hooks(compiled, x, {"a": add(delta), "b": "capture"}),
            record_property,
        )
        if result is not None:
            out, caches = result
            torch.testing.assert_close(out, edited)
            torch.testing.assert_close(caches["b"].output, edited_b)
            assert caches["b"].n_calls == 1
        # The hooks are gone with the run: the compiled model runs as before.
        torch.testing.assert_close(compiled(x), plain)


@pytest.mark.parametrize("mode", MODES)
def test_a_block_that_calls_the_compiled_wrapper_is_refused(
    mode: str, data: tuple[Tensor, Tensor]
) -> None:
    # Its hooks would be skipped by the compiled graph: refused, as on the CPU.
    x, delta = data
    net = CudaNet().cuda()
    compiled = torch.compile(net, mode=mode)
    with torch.no_grad():
        for _ in range(WARMUP_CALLS):
            compiled(x)
        block = TraceMultiple(compiled, {"a": add(delta), "b": "capture"})
        with pytest.raises(CompileError), block:
            compiled(x)
        torch.testing.assert_close(compiled(x), by_hand(net, x)[0])


def test_compiled_gpt2_with_cuda_graphs(record_property: Any) -> None:
    model = make_tiny_gpt2().cuda()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 6), generator=generator).cuda()
    vector = torch.randn(32, generator=generator).cuda()
    block = model.get_submodule("transformer.h.0")
    seen: list[Tensor] = []

    def raw_add(module: nn.Module, args: Any, out: Any) -> Any:
        first = out if isinstance(out, Tensor) else out[0]
        new = first + vector
        seen.append(new.detach().clone())
        return new if isinstance(out, Tensor) else (new, *out[1:])

    handle = block.register_forward_hook(raw_add)
    try:
        with torch.no_grad():
            ref_logits = model(ids).logits.clone()  # the eager model, raw hook: the reference
    finally:
        handle.remove()
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        plain = model(ids).logits.clone()
        for _ in range(WARMUP_CALLS):
            torch.testing.assert_close(compiled(ids).logits, plain, rtol=1e-4, atol=1e-4)
        spec = {"transformer.h.0": add(vector), "transformer.h.1": "capture"}
        result = hooked_or_refused(lambda: run_with_hooks(compiled, ids, spec), record_property)
        if result is not None:
            out, caches = result
            torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                caches["transformer.h.0"].output, seen[0], rtol=1e-4, atol=1e-4
            )
        torch.testing.assert_close(compiled(ids).logits, plain, rtol=1e-4, atol=1e-4)
