"""hookfn: look inside any PyTorch model, or change it, while it runs.

``out, caches = run_with_hooks(model, inputs, spec)`` runs a model once with captures and
edits at the layers the spec names, and returns its output with a ``{layer: Capture}`` dict.
"""

from __future__ import annotations

from ._capture import Args, Capture, primary
from ._components import components, register_components
from ._discover import LayerInfo, LayerTable, layers
from ._edits import (
    Chain,
    Edit,
    EditLike,
    Function,
    ablate,
    add,
    as_edit,
    at,
    chain,
    clamp,
    from_step,
    heads,
    identity,
    mean_ablate,
    on_calls,
    on_generated,
    on_prompt,
    patch_from,
    project_out,
    replace,
    resample_ablate,
    scale,
    splice,
    steer,
    when,
)
from ._errors import (
    CaptureError,
    CompileError,
    EditError,
    HookfnError,
    HookfnWarning,
    LayerNotFoundError,
    NotCalledWarning,
    PartialEditWarning,
    SpecError,
    TransformError,
)
from ._gate import StopForward
from ._hook import Hook, SpecValue
from ._plan import Spec
from ._run import run_with_hooks
from ._site import Site, SiteKind
from ._trace import Trace, TraceMultiple, spliced
from ._values import Omitted
from .collection import CollectError, collect

__all__ = [
    "Args",
    "Capture",
    "CaptureError",
    "CompileError",
    "Chain",
    "CollectError",
    "Edit",
    "EditError",
    "EditLike",
    "Function",
    "Hook",
    "HookfnError",
    "HookfnWarning",
    "LayerInfo",
    "LayerNotFoundError",
    "LayerTable",
    "NotCalledWarning",
    "Omitted",
    "PartialEditWarning",
    "Site",
    "SiteKind",
    "Spec",
    "SpecError",
    "SpecValue",
    "StopForward",
    "Trace",
    "TraceMultiple",
    "TransformError",
    "ablate",
    "add",
    "as_edit",
    "at",
    "chain",
    "clamp",
    "collect",
    "components",
    "heads",
    "from_step",
    "identity",
    "layers",
    "mean_ablate",
    "on_calls",
    "on_generated",
    "on_prompt",
    "patch_from",
    "primary",
    "project_out",
    "register_components",
    "replace",
    "resample_ablate",
    "run_with_hooks",
    "scale",
    "splice",
    "spliced",
    "steer",
    "when",
]

__version__ = "0.1.0"
