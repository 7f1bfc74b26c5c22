"""Faults: whatever fails, and wherever a KeyboardInterrupt lands, nothing leaks.

After every failed run the model's hook dictionaries (and PyTorch's global ones) are exactly
as before, the model is bitwise unchanged, no run stays active in the context, and the next
run is correct. The references are hand-written forward passes and raw PyTorch hooks.

Two kinds of fault injection:

- *anywhere*: a tracer (``sys.settrace``) raises ``KeyboardInterrupt`` at the n-th function
  call made in or into hookfn during a run, for every n: everywhere Ctrl-C can land;
- *randomized*: runs that mix edits raising an error or ``KeyboardInterrupt``, a model that
  raises mid-forward, bad specs, wrong edit results and a failing backward metric.
"""

from __future__ import annotations

import gc
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import snapshot_hooks
from reference import raw_run, sequential_by_hand
from test_concurrency import CPUDataParallel, threaded_parallel_apply
from torch import Tensor, nn

import hookfn
from hookfn import (
    EditError,
    Hook,
    HookfnError,
    LayerNotFoundError,
    SpecError,
    Trace,
    TraceMultiple,
    add,
    run_with_hooks,
)
from hookfn._gate import ACTIVE as _ACTIVE
from hookfn._gate import IN_BACKWARD as _IN_BACKWARD
from hookfn._hooks import _HEADS

HOOKFN_DIR = str(Path(hookfn.__file__).resolve().parent)

_ARMED: list[bool] = [False]  # a module-level switch, so that arming never touches the model


class Tripwire(nn.Module):
    """The identity, or a ``RuntimeError`` when armed: a model failing in mid-forward."""

    def forward(self, x: Tensor) -> Tensor:
        if _ARMED[0]:
            raise RuntimeError("tripwire: the model failed in mid-forward")
        return x


def make_model() -> nn.Sequential:
    """Buffers (BatchNorm), an in-place op, a frozen parameter, dropout; in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(inplace=True),
        Tripwire(),
        nn.Linear(8, 8),
        nn.Dropout(0.5),
        nn.Linear(8, 3),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model[4].weight.requires_grad_(False)
    return model


def reference(
    model: nn.Sequential, x: Tensor, edits: dict[int, Callable[[Tensor], Tensor]] | None = None
) -> tuple[Tensor, list[Tensor]]:
    """The forward pass by hand (eval mode; the unarmed Tripwire is the identity): the output
    and each layer's (edited) output."""
    return sequential_by_hand(model, x, edits, ops={3: lambda h: h})


@dataclass
class State:
    """Everything a run must leave exactly as it was."""

    hooks: dict[str, Any]
    tensors: dict[str, Tensor]
    objects: dict[str, int]
    flags: list[tuple[str, bool]]
    active: frozenset[object]
    attributes: list[set[str]]

    @classmethod
    def of(cls, model: nn.Module) -> State:
        named = [*model.named_parameters(), *model.named_buffers()]
        return cls(
            hooks=snapshot_hooks(model),
            tensors={name: t.detach().clone() for name, t in named},
            objects={name: id(t) for name, t in named},
            flags=[(n, m.training) for n, m in model.named_modules()]
            + [(n, p.requires_grad) for n, p in model.named_parameters()],
            active=_ACTIVE.get(),
            attributes=[set(vars(m)) for m in model.modules()],
        )

    def assert_same(self, model: nn.Module, where: str = "") -> None:
        now = State.of(model)
        assert now.hooks == self.hooks, f"hook dictionaries changed {where}"
        assert now.objects == self.objects, "a parameter or buffer was replaced"
        for name, tensor in self.tensors.items():
            assert torch.equal(now.tensors[name], tensor), f"{name} changed"
        assert now.flags == self.flags, "a training or requires_grad flag changed"
        assert now.active == self.active, "a run stayed active in the context"
        assert now.attributes == self.attributes, "a module attribute was left behind"
        assert not _IN_BACKWARD, "a run stayed registered as being in backward"
        assert not _HEADS, "an edit step stayed registered as hookfn's"


def install_user_hooks(model: nn.Sequential) -> list[int]:
    """Hooks a user or a library registered before hookfn ran; they must keep working."""
    calls = [0, 0]

    def count_forward(module: nn.Module, args: Any, output: Any) -> None:
        calls[0] += 1

    def count_pre(module: nn.Module, args: Any, kwargs: Any) -> None:
        calls[1] += 1

    model[0].register_forward_hook(count_forward)
    model[4].register_forward_pre_hook(count_pre, with_kwargs=True)
    return calls


# -- scenarios: each a function of (model, x) covering a different path through hookfn -----

DELTA = torch.linspace(-1, 1, 8)


def scenario_edit_and_capture(model: nn.Sequential, x: Tensor) -> Tensor:
    out, caches = run_with_hooks(model, x, {"0": add(DELTA), "4": Hook(input=True), "6": "capture"})
    torch.testing.assert_close(caches["6"].output, out)
    return out  # type: ignore[no-any-return]


def scenario_stop_early(model: nn.Sequential, x: Tensor) -> Tensor:
    _, caches = run_with_hooks(model, x, {"4": "capture"}, stop_early=True)
    return caches["4"].output


def scenario_backward(model: nn.Sequential, x: Tensor) -> Tensor:
    _, caches = run_with_hooks(
        model,
        x,
        {"0": Hook(grad=True), "6": Hook(edit_grad=lambda g: g * 2, grad=True)},
        backward=lambda out: out.sum(),
    )
    return caches["0"].grad_output


def scenario_trace_multiple(model: nn.Sequential, x: Tensor) -> Tensor:
    with TraceMultiple(model, {"0": add(DELTA), "6": "capture"}) as tm:
        model(x)
    return tm["6"].output


def scenario_trace(model: nn.Sequential, x: Tensor) -> Tensor:
    with Trace(model, "4", edit_output=lambda o: o * 0.5) as t:
        model(x)
    return t.output


def scenario_nested(model: nn.Sequential, x: Tensor) -> Tensor:
    with TraceMultiple(model, {"0": add(DELTA)}):
        out, _ = run_with_hooks(model, x, {"0": add(DELTA), "6": "capture"})
    return out  # type: ignore[no-any-return]


def scenario_compiled_wrapper(model: nn.Sequential, x: Tensor) -> Tensor:
    # The wrapper is never called (nothing is compiled): the hooked run calls the eager
    # module, and guards the wrapper for its duration.
    out, _ = run_with_hooks(_WRAPPER[0], x, {"0": add(DELTA)})
    return out  # type: ignore[no-any-return]


def scenario_data_parallel(model: nn.Sequential, x: Tensor) -> Tensor:
    out, _ = run_with_hooks(_WRAPPER[0], x, {"module.0": add(DELTA)})
    return out  # type: ignore[no-any-return]


_WRAPPER: list[nn.Module] = []  # the wrapper of the scenario that runs one


def expected(model: nn.Sequential, x: Tensor, name: str) -> Tensor:
    """What each scenario returns, by hand."""
    plus = {0: lambda h: h + DELTA}
    if name in ("edit_and_capture", "trace_multiple", "compiled_wrapper", "data_parallel"):
        out, _ = reference(model, x, plus)
        return out
    if name == "nested":
        return reference(model, x, {0: lambda h: h + 2 * DELTA})[0]
    if name == "stop_early":
        return reference(model, x)[1][4]
    if name == "trace":
        return reference(model, x, {4: lambda h: h * 0.5})[1][4]
    # backward: d(sum out)/d(out of layer 0), with the gradient doubled at the last layer
    h0 = F.linear(x, model[0].weight, model[0].bias).detach().requires_grad_(True)
    h = model[1:](h0.clone())
    (grad,) = torch.autograd.grad(h.sum() * 2, h0)
    return grad


SCENARIOS: dict[str, Callable[[nn.Sequential, Tensor], Tensor]] = {
    "edit_and_capture": scenario_edit_and_capture,
    "stop_early": scenario_stop_early,
    "backward": scenario_backward,
    "trace_multiple": scenario_trace_multiple,
    "trace": scenario_trace,
    "nested": scenario_nested,
    "compiled_wrapper": scenario_compiled_wrapper,
    "data_parallel": scenario_data_parallel,
}


class InterruptAt:
    """A tracer that raises ``KeyboardInterrupt`` at the n-th call made in or into hookfn.

    A real ``KeyboardInterrupt`` surfaces where the interpreter checks for signals: when a
    function starts, and at loop back-edges. So the tracer counts every Python function
    that starts from hookfn's code or is hookfn's own (``sys.settrace`` "call" events), and
    raises at the n-th, before the function runs its first line: the caller sees it at its
    call, exactly as with Ctrl-C. ``n=0`` only counts. Python unsets a tracer that raised:
    one interrupt per run.

    (Raising at "line" events instead is not faithful: in CPython 3.11 an exception raised
    there on the first line of a ``with`` or ``try`` body skips that block's handlers, which
    no real interrupt can do.)
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.points = 0
        self.fired = False
        self.where = ""

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        caller = frame.f_back
        from_hookfn = caller is not None and caller.f_code.co_filename.startswith(HOOKFN_DIR)
        if frame.f_code.co_name == "__del__":
            # Python never lets an exception out of a finalizer (it prints it and goes on).
            return
        if event == "call" and (from_hookfn or frame.f_code.co_filename.startswith(HOOKFN_DIR)):
            self.points += 1
            if self.points == self.n:
                self.fired = True
                self.where = f"{frame.f_code.co_qualname} (from line {caller and caller.f_lineno})"
                raise KeyboardInterrupt(f"injected at call {self.n} in or into hookfn")


@contextmanager
def tracing(tracer: InterruptAt) -> Iterator[None]:
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


@pytest.fixture
def data_parallel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    data_parallel_module = sys.modules["torch.nn.parallel.data_parallel"]
    monkeypatch.setattr(data_parallel_module, "parallel_apply", threaded_parallel_apply)
    yield
    _WRAPPER.clear()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_keyboard_interrupt_at_every_call_in_hookfn_leaks_nothing(name: str, data_parallel):
    model = make_model()
    if name == "data_parallel":
        _WRAPPER.append(CPUDataParallel(model))
    if name == "compiled_wrapper":
        _WRAPPER.append(torch.compile(model, backend="eager"))  # (marks the model)
    target = _WRAPPER[0] if _WRAPPER else model
    calls = install_user_hooks(model)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    want = expected(model, x, name)
    scenario = SCENARIOS[name]
    before = State.of(target)

    # The cyclic collector stays off while calls are counted: a collection of earlier tests'
    # garbage would run finalizers (more calls) inside one run and not in another.
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):  # the first run, traced or not, fills caches: count the second
            counter = InterruptAt(0)
            with tracing(counter):
                torch.testing.assert_close(scenario(model, x), want)
        total = counter.points
        assert total > 20  # the tracer saw hookfn's code run
        before.assert_same(target)

        for n in range(1, total + 1):  # every one of them
            tracer = InterruptAt(n)
            with pytest.raises(KeyboardInterrupt), tracing(tracer):
                scenario(model, x)
            assert tracer.fired
            before.assert_same(target, where=f"(interrupt at {tracer.where})")
            # The next run, with no interrupt, is correct.
            torch.testing.assert_close(scenario(model, x), want)
    finally:
        gc.enable()
    assert calls[0] > 0  # the user's hooks kept firing throughout
    assert calls[1] > 0


# -- randomized faults -------------------------------------------------------------------


class Boom(Exception):
    """A user's own error raised inside an edit or a metric."""


def _raising(exc: BaseException, on_call: int) -> Callable[..., Tensor]:
    def edit(x: Tensor, site: Any) -> Tensor:
        if site.call == on_call:
            raise exc
        return x + 1

    return edit


@dataclass
class Fault:
    kind: str
    spec: Any
    raises: type[BaseException]
    armed: bool = False
    backward: Callable[[Any], Tensor] | None = None
    double_call: bool = False


def make_fault(rng: random.Random) -> Fault:
    layer = rng.choice(["0", "1", "2", "4", "6"])
    kind = rng.choice(
        [
            "edit_raises",
            "edit_interrupts",
            "model_raises",
            "model_interrupts",
            "unknown_layer",
            "bad_value",
            "bad_key",
            "two_keys",
            "wrong_shape",
            "not_a_tensor",
            "metric_raises",
            "metric_interrupts",
            "input_edit_raises",
        ]
    )
    capture = {other: "capture" for other in rng.sample(["0", "1", "4", "6"], 2)}
    if kind == "edit_raises":
        return Fault(kind, {**capture, layer: _raising(Boom("edit"), 0)}, Boom)
    if kind == "edit_interrupts":
        return Fault(
            kind,
            {**capture, layer: _raising(KeyboardInterrupt(), 1)},
            KeyboardInterrupt,
            double_call=True,
        )
    if kind == "model_raises":
        return Fault(kind, {**capture, layer: add(1.0)}, RuntimeError, armed=True)
    if kind == "model_interrupts":
        return Fault(
            kind, {**capture, layer: _interrupt_after(2)}, KeyboardInterrupt, double_call=True
        )
    if kind == "unknown_layer":
        return Fault(kind, {**capture, "7": "capture"}, LayerNotFoundError)
    if kind == "bad_value":
        return Fault(kind, {**capture, layer: 3.0}, SpecError)
    if kind == "bad_key":
        return Fault(kind, {**capture, 0: "capture"}, SpecError)
    if kind == "two_keys":
        return Fault(kind, {"*": add(1.0), "**": "capture"}, SpecError)
    if kind == "wrong_shape":
        return Fault(kind, {**capture, layer: lambda x: x[:1]}, EditError)
    if kind == "not_a_tensor":
        return Fault(kind, {**capture, layer: lambda x: x.tolist()}, EditError)
    if kind == "input_edit_raises":
        return Fault(kind, {**capture, layer: Hook(edit_input=_raising(Boom("input"), 0))}, Boom)
    exc: BaseException = Boom("metric") if kind == "metric_raises" else KeyboardInterrupt()

    def metric(out: Tensor) -> Tensor:
        raise exc

    spec = {**capture, layer: Hook(grad=True)}
    return Fault(kind, spec, type(exc), backward=metric)


def _interrupt_after(calls: int) -> Callable[[Tensor], Tensor]:
    # An edit that lets the first forward through and interrupts the second one: the
    # interrupt then arrives in the middle of a model call, with hooks of an earlier
    # complete call recorded.
    counter = [0]

    def edit(x: Tensor) -> Tensor:
        counter[0] += 1
        if counter[0] >= calls:
            raise KeyboardInterrupt
        return x

    return edit


N_RANDOM_FAULTS = 300


def test_randomized_faults_leak_nothing_and_the_next_run_is_right():
    model = make_model()
    calls = install_user_hooks(model)
    rng = random.Random(0)
    kinds: dict[str, int] = {}
    for i in range(N_RANDOM_FAULTS):
        x = torch.randn(rng.randint(2, 4), 6, generator=torch.Generator().manual_seed(i))
        fault = make_fault(rng)
        kinds[fault.kind] = kinds.get(fault.kind, 0) + 1
        before = State.of(model)
        forward = (lambda inp: (model(inp), model(inp))[1]) if fault.double_call else None
        _ARMED[0] = fault.armed
        try:
            with pytest.raises(fault.raises):
                run_with_hooks(model, x, fault.spec, forward=forward, backward=fault.backward)
        finally:
            _ARMED[0] = False
        before.assert_same(model)
        # A clean run after the failed one is right.
        delta = torch.randn(8, generator=torch.Generator().manual_seed(10_000 + i))
        out, caches = run_with_hooks(model, x, {"4": add(delta), "6": "capture"})
        want, acts = reference(model, x, {4: lambda h, delta=delta: h + delta})
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(caches["6"].output, acts[6])
    assert len(kinds) == 13  # every kind of fault was drawn
    assert calls[0] > N_RANDOM_FAULTS  # the user's hooks fired in the runs that got there


def test_hookfn_errors_are_hookfn_errors():
    # The kinds above that hookfn itself raises derive from HookfnError.
    for error in (LayerNotFoundError, SpecError, EditError):
        assert issubclass(error, HookfnError)


# -- faithful captures -------------------------------------------------------------------


def _inplace_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))


def test_capture_is_not_changed_by_a_later_inplace_op():
    model = _inplace_model()
    x = torch.randn(5, 4)
    pre_relu = F.linear(x, model[0].weight, model[0].bias).detach()
    assert (pre_relu < 0).any()  # the in-place ReLU really changes something
    # Reference: a raw hook that copies the output as it is produced.
    _, seen = raw_run(model, x, capture=["0"])
    _, caches = run_with_hooks(model, x, {"0": "capture", "1": Hook(input=True)})
    torch.testing.assert_close(caches["0"].output, seen["0"], rtol=0, atol=0)
    torch.testing.assert_close(caches["0"].output, pre_relu, rtol=0, atol=0)
    # The input of the in-place ReLU, captured before it ran, is the pre-ReLU value too.
    torch.testing.assert_close(caches["1"].input, pre_relu, rtol=0, atol=0)


def test_clone_false_opts_out_and_shares_memory_with_the_model():
    model = _inplace_model()
    x = torch.randn(5, 4)
    pre_relu = F.linear(x, model[0].weight, model[0].bias).detach()
    _, caches = run_with_hooks(model, x, {"0": Hook(clone=False)})
    # The reference the model handed on: ReLU then changed it in place.
    torch.testing.assert_close(caches["0"].output, pre_relu.relu(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "dtype"),
    [
        ({"dtype": torch.float64}, torch.float64),
        ({"dtype": torch.float64, "clone": False}, torch.float64),
    ],
)
def test_converted_captures_are_copies(options: dict[str, Any], dtype: torch.dtype):
    # A dtype conversion copies anyway, so even clone=False is safe from the in-place op.
    model = _inplace_model()
    x = torch.randn(5, 4)
    pre_relu = F.linear(x, model[0].weight, model[0].bias).detach()
    _, caches = run_with_hooks(model, x, {"0": Hook(**options)})
    assert caches["0"].output.dtype is dtype
    torch.testing.assert_close(caches["0"].output, pre_relu.to(dtype))
