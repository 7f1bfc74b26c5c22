"""`run_with_hooks`: run a model once with a spec of captures and edits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._capture import Args, Capture
from ._errors import HookfnError, SpecError
from ._trace import Spec, StopForward, TraceMultiple

__all__ = ["call_with", "run_with_hooks"]


def call_with(fn: Callable[..., Any], inputs: object) -> Any:
    """Call ``fn`` with ``inputs``: `Args` as given, a tuple splatted, a mapping as keywords.

    Anything else is passed as the single positional argument.
    """
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
            ``edit_grad`` edits apply. Parameters' ``.grad`` are left untouched.

    Returns:
        ``(output, captures)``: what the model returned (with the edits applied), and the
        `Capture` of every hooked layer keyed by concrete layer name in model order.

    Raises:
        HookfnError: A bad spec (nothing is registered then), an edit returning a wrong
            shape or type, a metric without a gradient.

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
    """
    if stop_early and backward is not None:
        raise SpecError(
            "stop_early=True cannot be combined with backward=...: the metric needs the "
            "whole forward pass. Drop one of them."
        )
    fn = model if forward is None else forward
    trace = TraceMultiple(model, spec, stop_early=stop_early)
    output: Any = None
    with trace:
        try:
            output = call_with(fn, inputs)
        except StopForward as stop:
            if stop.token is not trace.token:
                raise
        else:
            if backward is not None:
                _backpropagate(backward, output, trace.grad_targets)
    return output, trace.captures()


def _backpropagate(metric_fn: Callable[[Any], Tensor], output: Any, targets: list[Tensor]) -> None:
    metric = metric_fn(output)
    if not isinstance(metric, Tensor) or metric.numel() != 1:
        raise SpecError(
            f"backward=metric must return a scalar tensor, got "
            f"{type(metric).__name__}{tuple(metric.shape) if isinstance(metric, Tensor) else ''}."
        )
    if not targets:
        return
    if not metric.requires_grad:
        raise HookfnError(
            "the backward metric does not require grad: the forward pass ran without "
            "autograd (torch.no_grad() or inference_mode?) or the metric does not depend on "
            "the hooked layers."
        )
    # Gradients to the hooked tensors only: tensor hooks fire on the way, and no parameter's
    # .grad is touched (the model is not changed).
    torch.autograd.grad(metric, targets, allow_unused=True)
