"""Edits: small immutable values that map an activation to a new one.

An edit is called as ``edit(x, site)`` and returns a new tensor of the same shape; it never
mutates ``x``. Edits are built by factories (`add`, `scale`, `ablate`, `patch_from`, ...),
compose left to right with ``>>``, compare equal when built from equal arguments, print as
the expression that built them, and pickle (except plain lambdas, which Python cannot
pickle).

Restricting an edit to part of the tensor (`at`, `Edit.at`, `heads`) hands the inner edit
that part; an edit that reads a cache (`patch_from`, `mean_ablate`, `resample_ablate`) then
reads the same part of the cached tensor.

The modules, in the order they build on each other: `_base` (the protocol, plain
callables, composition and value semantics), `_arguments` (checks when an edit is built),
`_result` (`check_result`), `_parts` (the part an edit sees), `_checks` (checks when it
runs), `_index` (index forms), `_elementwise`, `_cache`, `_ablations`, `_directions`,
`_restrict` (`at`, `heads`), `_splice` (`splice`: a module in place of an activation),
`_steps` (`on_prompt`, `from_step`, ...: edits on chosen calls).
"""

from __future__ import annotations

from ._ablations import Ablate, MeanAblate, ResampleAblate, ablate, mean_ablate, resample_ablate
from ._base import Cache, Chain, Edit, EditLike, Function, Index, as_edit, chain, identity
from ._cache import PatchFrom, patch_from
from ._directions import ProjectOut, Steer, project_out, steer
from ._elementwise import Add, Clamp, Replace, Scale, add, clamp, replace, scale
from ._restrict import At, Heads, at, heads
from ._result import check_result
from ._splice import Splice, Spliced, SpliceFromInput, splice
from ._steps import OnCalls, When, from_step, on_calls, on_generated, on_prompt, when

__all__ = [
    "Ablate",
    "Add",
    "At",
    "Cache",
    "Chain",
    "Clamp",
    "Edit",
    "EditLike",
    "Function",
    "Heads",
    "Index",
    "MeanAblate",
    "OnCalls",
    "PatchFrom",
    "ProjectOut",
    "Replace",
    "ResampleAblate",
    "Scale",
    "Splice",
    "SpliceFromInput",
    "Spliced",
    "Steer",
    "When",
    "ablate",
    "add",
    "as_edit",
    "at",
    "chain",
    "check_result",
    "clamp",
    "from_step",
    "heads",
    "identity",
    "mean_ablate",
    "on_calls",
    "on_generated",
    "on_prompt",
    "patch_from",
    "project_out",
    "replace",
    "resample_ablate",
    "scale",
    "splice",
    "steer",
    "when",
]
