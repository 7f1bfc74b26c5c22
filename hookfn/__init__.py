"""hookfn: look inside any PyTorch model, or change it, while it runs.

``out, caches = run_with_hooks(model, inputs, spec)`` runs a model once with captures and
edits at the layers the spec names, and returns its output with a ``{layer: Capture}`` dict.
"""

from __future__ import annotations

from ._capture import Args, Capture, primary
from ._edits import Chain, Edit, EditLike, Function, add, as_edit, chain, identity
from ._errors import CaptureError, EditError, HookfnError, LayerNotFoundError, SpecError
from ._hook import Hook, SpecValue
from ._run import run_with_hooks
from ._site import Site, SiteKind
from ._trace import Spec, Trace, TraceMultiple

__all__ = [
    "Args",
    "Capture",
    "CaptureError",
    "Chain",
    "Edit",
    "EditError",
    "EditLike",
    "Function",
    "Hook",
    "HookfnError",
    "LayerNotFoundError",
    "Site",
    "SiteKind",
    "Spec",
    "SpecError",
    "SpecValue",
    "Trace",
    "TraceMultiple",
    "add",
    "as_edit",
    "chain",
    "identity",
    "primary",
    "run_with_hooks",
]

__version__ = "0.1.0"
