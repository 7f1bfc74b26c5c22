"""The exceptions hookfn raises: one base class, one subclass per distinct cause."""

from __future__ import annotations

__all__ = [
    "CaptureError",
    "CompileError",
    "EditError",
    "HookfnError",
    "HookfnWarning",
    "LayerNotFoundError",
    "NotCalledWarning",
    "PartialEditWarning",
    "SpecError",
    "TransformError",
]


class HookfnError(Exception):
    """Base class of every error hookfn raises on purpose.

    A message names the layer, the shapes or types involved, and the fix.
    """


class LayerNotFoundError(HookfnError, LookupError):
    """A spec key names no module of the model (or a glob matches none)."""


class SpecError(HookfnError, TypeError):
    """A spec, a spec value or a run argument is not of an accepted form."""


class EditError(HookfnError, ValueError):
    """An edit returned something that cannot stand in for the value it edited."""


class CaptureError(HookfnError, LookupError):
    """A capture was asked for something it did not record."""


class TransformError(HookfnError, RuntimeError):
    """A torch.func transform or an autograd mode cannot run through the model.

    Raised in place of the error PyTorch gives deep inside the model, when hookfn can tell
    what it means: forward-mode AD (``torch.func.jvp``, ``jacfwd``) through an op that has no
    forward derivative (CPU ``scaled_dot_product_attention``), activation checkpointing
    inside ``torch.func.grad``/``vjp``, data-dependent control flow under ``vmap``, reentrant
    checkpointing under ``backward=``. The message names the op and the workaround; the
    original error is chained as ``__cause__``.
    """


class CompileError(HookfnError, RuntimeError):
    """A hooked module would run inside code compiled by ``torch.compile``.

    Hooks cannot act inside a compiled graph: it would run without them and return an
    unedited output and empty captures. hookfn runs a compiled model's hooked calls eagerly
    where it can reach the eager module (``torch.compile(model)``, ``model.compile()``), and
    raises this error where it cannot; the message names the compiled module and the fix.
    """


class HookfnWarning(UserWarning):
    """Base class of every warning hookfn issues."""


class NotCalledWarning(HookfnWarning):
    """An edit's layer was never called during the run, so the edit did nothing.

    Pass ``strict=True`` (to `run_with_hooks`, `Trace` or `TraceMultiple`) to make it an
    `EditError`.
    """


class PartialEditWarning(HookfnWarning):
    """An edit changed only the primary tensor of a structured output that holds
    other floating-point tensors, which the model may read instead.

    Examples: an MoE router returns ``(router_logits, router_scores, router_indices)`` and
    the experts read the scores; CLIP's ``text_model`` returns ``last_hidden_state`` first,
    and ``CLIPModel`` reads ``pooler_output``. Edit the whole structure with
    ``Hook(edit, whole=True)``, or hook the module that computes the tensor the model reads.
    """
