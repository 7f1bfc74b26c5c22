"""`run_with_hooks`: run a model once with a spec of captures and edits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._capture import Args, Capture
from ._compile import eager_callable, eager_forward
from ._edits._cache import Captures
from ._errors import HookfnError, SpecError
from ._func import inside_vmap, state_call, transform_error, vmap_backward_error
from ._gate import IN_BACKWARD, StopForward, graph_task
from ._hook import Hook
from ._plan import Spec
from ._trace import TraceMultiple

__all__ = ["call_with", "check_inputs", "run_with_hooks"]


def call_with(fn: Callable[..., Any], inputs: object) -> Any:
    """Call ``fn`` with ``inputs``: `Args` as given, a tuple splatted, a mapping as keywords.

    Anything else is passed as the single positional argument.
    """
    if type(inputs) is Tensor:  # the common case first
        return fn(inputs)
    if isinstance(inputs, Args):
        return fn(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, tuple):
        return fn(*inputs)
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    return fn(inputs)


def run_with_hooks(
    model: nn.Module,
    inputs: object,
    spec: Spec,
    *,
    forward: Callable[..., Any] | None = None,
    stop_early: bool = False,
    backward: Callable[[Any], Tensor] | None = None,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    strict: bool = False,
) -> tuple[Any, dict[str, Capture]]:
    """Run ``model`` once with hooks; return its output and a ``{layer: Capture}`` dict.

    The hooks exist for this call only: they are validated before anything is registered,
    act only in the calling thread / asyncio task, and are removed when the call returns or
    raises.

    Args:
        model: Any ``torch.nn.Module`` (compiled, DataParallel and DDP wrappers included).
        inputs: ``model(inputs)`` for a tensor; ``model(*inputs)`` for a tuple;
            ``model(**inputs)`` for a mapping (a transformers ``BatchEncoding``);
            ``Args(*args, **kwargs)`` for both.
        spec: ``{layer: value}``: layer keys are dotted names from ``named_modules()``,
            globs (``*`` matches one dotted segment, ``**`` any number) or module objects;
            values are ``"capture"``, an edit, the DeepHook tuple
            ``(retain_output, retain_input, edit_fn)``, or a `Hook`. A list of keys captures
            their outputs.
        forward: Call this instead of ``model`` (e.g. ``model.generate``); hooks still act
            on ``model``'s modules.
        stop_early: Stop the forward pass as soon as every requested capture is taken; the
            returned output is then ``None``. A probe of layer 3 of a 48-layer model does not
            pay for the other 45.
        backward: ``metric(output) -> scalar tensor``: after the forward pass, backpropagate
            the metric to the hooked layers, so that ``Hook(grad=True)`` captures and
            ``edit_grad`` edits apply. Parameters' ``.grad`` are left untouched, and the
            output's graph is kept (backpropagate through it again if you like). Forwards
            that activation checkpointing re-runs during this pass apply the edits again
            and record nothing.
        params: ``{name: tensor}`` with names from ``model.named_parameters()``: run the
            model with these tensors in place of its own, for this call only
            (`torch.func.functional_call`; tied weights stay tied). Ablate or swap a
            weight, or differentiate with respect to weights with ``torch.func.grad``.
        buffers: The same for ``model.named_buffers()``.
        strict: An edit whose layer the run never called raises an `EditError`; by default
            it is a `NotCalledWarning`.

    Returns:
        ``(output, captures)``: what the model returned (with the edits applied), and the
        `Capture` of every hooked layer keyed by concrete layer name in model order.

    Raises:
        HookfnError: A bad spec (nothing is registered then), an edit returning a wrong
            shape or type, a metric without a gradient.
        TransformError: A torch.func transform (or ``backward=``) cannot run through the
            model, e.g. ``torch.func.jvp`` through CPU ``scaled_dot_product_attention``; the
            message names the op and the workaround.

    Examples:
        >>> import torch
        >>> from hookfn import run_with_hooks, add
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> x = torch.randn(3, 4)
        >>> out, caches = run_with_hooks(model, x, {"0": add(1.0), "1": "capture"})
        >>> torch.allclose(out, model[1](model[0](x) + 1.0))
        True
        >>> list(caches), caches["1"].output.shape
        (['0', '1'], torch.Size([3, 2]))

        Gradients of a metric at a layer, and a weight swapped for one call:

        >>> from hookfn import Hook
        >>> _, caches = run_with_hooks(model, x, {"0": Hook(grad=True)}, backward=lambda y: y.sum())
        >>> torch.allclose(caches["0"].grad_output, model[1].weight.sum(0).expand(3, 4))
        True
        >>> out, _ = run_with_hooks(model, x, {}, params={"1.weight": torch.zeros(2, 4)})
        >>> torch.equal(out, model[1].bias.expand(3, 2))
        True
    """
    if forward is not None and not callable(forward):
        raise SpecError(f"forward= takes a callable (e.g. model.generate), got {forward!r}.")
    if backward is not None and not callable(backward):
        raise SpecError(
            f"backward= takes a function of the output that returns a scalar tensor, got "
            f"{backward!r}."
        )
    if stop_early and backward is not None:
        raise SpecError(
            "stop_early=True cannot be combined with backward=...: the metric needs the "
            "whole forward pass. Drop one of them."
        )
    # A compiled model runs its hooked call eagerly: hooks cannot act in a compiled graph.
    if forward is None:
        fn, eager_root = eager_callable(model)
        call = None if fn is model else fn
    else:
        fn, eager_root = eager_forward(model, forward)
        call = fn
    if params is not None or buffers is not None:
        fn = state_call(model, call, params, buffers)
    if type(inputs) is not Tensor:  # (a tensor, the common case, needs no check)
        check_inputs(inputs)
    if not spec and type(spec) is dict and backward is None and isinstance(model, nn.Module):
        return _plain_call(fn, inputs), Captures()  # nothing to hook: no run to open
    trace = TraceMultiple(model, spec, stop_early=stop_early, strict=strict, _eager_root=eager_root)
    if not trace.sites and backward is None:  # nothing to hook: nothing to open or close
        return _plain_call(fn, inputs), Captures()
    output: Any = None
    stopped = False
    try:
        trace._open()
        try:
            output = fn(inputs) if type(inputs) is Tensor else call_with(fn, inputs)
            if backward is not None:
                _backpropagate(backward, output, trace)
        except StopForward as stop:
            if stop.token is not trace.token:
                raise
            stopped = True
        except RuntimeError as error:
            explained = transform_error(error)
            if explained is None:
                raise
            raise explained from error
    finally:
        # Idempotent: run again if an interrupt cut it short, nothing stays registered.
        try:
            trace._close()
        except BaseException:
            trace._close()
            raise
    if not stopped:
        trace._report_uncalled(stacklevel=3)
    return output, trace.captures()


def _plain_call(fn: Callable[..., Any], inputs: object) -> Any:
    """``fn`` called with ``inputs``, with no run open; transform errors explained."""
    try:
        return fn(inputs) if type(inputs) is Tensor else call_with(fn, inputs)
    except RuntimeError as error:
        explained = transform_error(error)
        if explained is None:
            raise
        raise explained from error


def check_inputs(inputs: object) -> None:
    """Refuse inputs that cannot be passed to the model, before anything is registered.

    Raises:
        SpecError: A mapping of inputs with a key that is not a string.
    """
    if isinstance(inputs, Mapping):
        bad = [key for key in inputs if not isinstance(key, str)]
        if bad:
            raise SpecError(
                f"the inputs mapping has a key {bad[0]!r} ({type(bad[0]).__name__}) that is not "
                "a string; a mapping is passed as keyword arguments, model(**inputs). Pass "
                "Args(*args, **kwargs) for positional arguments."
            )


def _backpropagate(metric_fn: Callable[[Any], Tensor], output: Any, trace: TraceMultiple) -> None:
    targets = trace.grad_targets
    metric = metric_fn(output)
    if not isinstance(metric, Tensor) or metric.numel() != 1:
        raise SpecError(
            f"backward=metric must return a scalar tensor, got "
            f"{type(metric).__name__}{tuple(metric.shape) if isinstance(metric, Tensor) else ''}."
        )
    if not metric.requires_grad:
        if not targets and not any(_wants_grad(p.hook) for p in trace.sites):
            return  # nothing asked for a gradient
        if inside_vmap():
            raise vmap_backward_error()
        raise HookfnError(
            "the backward metric does not require grad: the forward pass ran without "
            "autograd (torch.no_grad() or inference_mode?) or the metric does not depend on "
            "the hooked layers."
        )
    if not targets:
        return
    # Gradients to the hooked tensors only: tensor hooks fire on the way, and no parameter's
    # .grad is touched (the model is not changed). The graph is kept: the caller may hold the
    # output and backpropagate again, and an enclosing torch.func.grad/vjp needs it. Captured
    # gradients that are not detached stay differentiable (create_graph).
    create_graph = torch.is_grad_enabled() and any(
        (p.hook.grad or p.hook.grad_input) and not p.hook.detach for p in trace.sites
    )
    # Checkpointed forwards re-run during this pass see the run's hooks even in autograd
    # worker threads, which do not inherit the caller's context; only in this pass's graph
    # task, which a hook on a fresh alias of the metric records as the pass starts (the root
    # is the first node the engine runs), so another thread's backward stays unhooked.
    tasks: set[int] = set()
    root = metric.view_as(metric)
    root.register_hook(lambda grad: tasks.add(graph_task()))  # type: ignore[no-untyped-call]
    IN_BACKWARD[trace.token] = tasks
    try:
        torch.autograd.grad(
            root, targets, allow_unused=True, retain_graph=True, create_graph=create_graph
        )
    finally:
        IN_BACKWARD.pop(trace.token, None)


def _wants_grad(hook: Hook) -> bool:
    return hook.grad or hook.grad_input or hook.edit_grad is not None
