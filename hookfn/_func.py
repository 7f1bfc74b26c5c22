"""torch.func support: a run with swapped parameters, and errors that say what a transform needs.

`run_with_hooks(..., params=..., buffers=...)` calls the model through
`torch.func.functional_call`, so a weight can be ablated, swapped or differentiated for one call
while the hooks, which live on the model's modules, capture and edit as usual.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import HookfnError, SpecError, TransformError
from ._keys import unwrap

__all__ = ["inside_vmap", "state_call", "transform_error", "vmap_backward_error"]


def _check_state(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    buffers: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """Validate ``params`` / ``buffers`` against the model's own names and shapes."""
    named: dict[str, dict[str, Tensor]] = {
        "params": {n: p for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: b for n, b in model.named_buffers(remove_duplicate=False)},
    }
    _, prefix = unwrap(model)
    state: dict[str, Tensor] = {}
    for what, given in (("params", params), ("buffers", buffers)):
        if given is None:
            continue
        if not isinstance(given, Mapping):
            raise SpecError(
                f"{what}= takes a mapping {{name: tensor}} with names from "
                f"model.named_{'parameters' if what == 'params' else 'buffers'}(), got "
                f"{type(given).__name__}."
            )
        known = named[what]
        for name, value in given.items():
            full = name
            if full not in known and prefix and prefix + name in known:
                full = prefix + name  # names of the wrapped model work too (compile, DDP)
            if full not in known:
                raise SpecError(_unknown_name(what, name, known, named))
            if not isinstance(value, Tensor):
                raise SpecError(
                    f"{what}[{name!r}] is a {type(value).__name__}; pass a tensor of shape "
                    f"{tuple(known[full].shape)}."
                )
            if value.shape != known[full].shape:
                raise SpecError(
                    f"{what}[{name!r}] has shape {tuple(value.shape)}, but the model's "
                    f"{'parameter' if what == 'params' else 'buffer'} has shape "
                    f"{tuple(known[full].shape)}; pass a tensor of the same shape."
                )
            if value.dtype != known[full].dtype and not (
                value.is_floating_point() and known[full].is_floating_point()
            ):
                raise SpecError(
                    f"{what}[{name!r}] has dtype {value.dtype}, but the model's "
                    f"{'parameter' if what == 'params' else 'buffer'} is {known[full].dtype}; "
                    f"pass value.to({known[full].dtype})."
                )
            state[full] = value
    _check_tied(state, named)
    return state


def _check_tied(state: Mapping[str, Tensor], named: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Refuse two different tensors for names that share one tensor in the model (tied
    weights, e.g. GPT-2's embedding and output layer): which one would win is unclear."""
    owners: dict[int, tuple[str, Tensor]] = {}
    for table in named.values():
        for name, tensor in table.items():
            if name not in state:
                continue
            seen = owners.get(id(tensor))
            if seen is None:
                owners[id(tensor)] = (name, state[name])
            elif seen[1] is not state[name]:
                raise SpecError(
                    f"{seen[0]!r} and {name!r} are one tied tensor in the model, but two "
                    "different tensors were given for them; pass one tensor under one of "
                    "the names (the tie is kept), or the same tensor under both."
                )


def _unknown_name(
    what: str, name: str, known: Mapping[str, Tensor], named: Mapping[str, Mapping[str, Tensor]]
) -> str:
    other = "buffers" if what == "params" else "params"
    if name in named[other]:
        return f"{what}[{name!r}]: {name!r} is one of the model's {other}; pass it in {other}=."
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    kind = "parameters" if what == "params" else "buffers"
    return (
        f"{what}[{name!r}] names none of the model's {kind} (names as in "
        f"model.named_{kind}()).{hint}"
    )


class _Bound(nn.Module):
    """Holds the model as its only child, so ``functional_call`` can run any callable."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def state_call(
    model: nn.Module,
    fn: Callable[..., Any] | None,
    params: Mapping[str, Tensor] | None,
    buffers: Mapping[str, Tensor] | None,
) -> Callable[..., Any]:
    """A callable that runs ``fn`` (default: the model) with ``params`` and ``buffers`` swapped in.

    The names are checked now, before any hook is registered; the swap lasts for the call
    only (`torch.func.functional_call` puts the model's own tensors back, also on errors).
    Tied weights stay tied: a new ``transformer.wte.weight`` also stands in for a tied
    ``lm_head.weight``. Missing names keep the model's own tensors.

    Raises:
        SpecError: A name is not one of the model's parameters / buffers, or a shape differs.
    """
    state = _check_state(model, params, buffers)
    functional_call = torch.func.functional_call
    if fn is None:

        def call_model(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, state, args, kwargs)

        return call_model
    bound = _Bound(model, fn)
    bound_state = {f"model.{name}": value for name, value in state.items()}

    def call_fn(*args: Any, **kwargs: Any) -> Any:
        return functional_call(bound, bound_state, args, kwargs)

    return call_fn


_FORWARD_AD = re.compile(r"Trying to use forward AD with (\S+) that does not support it")
_EAGER = (
    'For a transformers model, use eager attention: model.set_attn_implementation("eager"), '
    'or attn_implementation="eager" in its config / from_pretrained(...)'
)


def transform_error(error: BaseException) -> TransformError | None:
    """The `TransformError` that explains ``error``, or ``None`` when it is not recognised.

    Only errors whose cause is certain are translated; everything else propagates unchanged.
    """
    if isinstance(error, HookfnError) or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    match = _FORWARD_AD.search(text)
    if match is not None:
        op = match.group(1)
        hint = f"{_EAGER}, or use" if "scaled_dot_product" in op or "attention" in op else "Use"
        return TransformError(
            f"forward-mode AD (torch.func.jvp, jacfwd, hessian) cannot run through the model: "
            f"the op {op} has no forward-mode derivative. {hint} reverse mode instead "
            "(torch.func.vjp, grad, jacrev)."
        )
    if "is not differentiable with respect to argument 'attn_mask'" in text:
        return TransformError(
            "gradients cannot flow through the model's attention mask: "
            "scaled_dot_product_attention has no derivative with respect to attn_mask, and "
            "the model builds its mask (T5's position bias, for one) from tensors that "
            f"require grad inside the transform. {_EAGER}. PyTorch said: {text.splitlines()[0]}"
        )
    if "don't yet support saved tensor hooks" in text or (
        "requires_grad_()" in text and "functorch transform" in text
    ):
        return TransformError(
            "the model cannot run inside torch.func.grad / vjp / jacrev: it uses saved-tensor "
            "hooks or calls requires_grad_() in its forward, which activation checkpointing "
            "does (torch.utils.checkpoint; transformers' gradient_checkpointing_enable()). "
            "Disable checkpointing for transformed calls (model.gradient_checkpointing_disable()"
            "), or take gradients with run_with_hooks(..., backward=metric) outside the "
            f"transform. PyTorch said: {text.splitlines()[0]}"
        )
    if text.startswith("vmap: It looks like you're"):
        return TransformError(
            "torch.func.vmap cannot run through the model: it branches in Python on a tensor's "
            "value (data-dependent control flow or .item()). For a transformers model pass an "
            "explicit attention_mask (a mask of ones if nothing is padded), so it skips its "
            "padding checks; otherwise loop in Python instead of vmap. PyTorch said: "
            f"{text.splitlines()[0]}"
        )
    if "compatible with .grad()" in text and "checkpoint" in text.lower():
        return TransformError(
            "run_with_hooks(..., backward=metric) takes gradients with torch.autograd.grad, "
            "which reentrant activation checkpointing (use_reentrant=True) does not support. "
            "Use non-reentrant checkpointing: torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=False), or for transformers model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})."
        )
    return None


def inside_vmap() -> bool:
    """Whether the innermost torch.func transform running now is ``vmap``."""
    try:
        from torch._C._functorch import TransformType, peek_interpreter_stack
    except ImportError:  # pragma: no cover - older or newer PyTorch without these names
        return False
    interpreter = peek_interpreter_stack()
    return interpreter is not None and interpreter.key() == TransformType.Vmap


def vmap_backward_error() -> TransformError:
    """The error for ``backward=`` directly inside ``vmap``, where autograd sees no graph."""
    return TransformError(
        "run_with_hooks(..., backward=metric) cannot run directly inside torch.func.vmap: "
        "autograd does not see through vmap's batched tensors, so no gradient would reach "
        "the hooks. Put a torch.func.grad between them (vmap(grad(f)), with the run inside "
        "f), or loop over the batch in Python."
    )
