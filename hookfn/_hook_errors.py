"""What the hook path says when an edit goes wrong: an edit's error with the site it ran at
in front, a value with no tensor to edit, and the warnings of partial edits and replayed
calls."""

from __future__ import annotations

import warnings
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor

from ._capture import Args
from ._errors import EditError, HookfnError, HookfnWarning, PartialEditWarning
from ._site import Site

__all__ = ["in_context", "no_primary", "warn_if_partial", "warn_replays"]


def warn_if_partial(edit: object, site: Site, value: Any, x: Tensor) -> None:
    """Warn where an edit changed the primary tensor of a structure that holds other
    floating-point tensors the model may read instead (an MoE router's scores beside its
    logits, CLIP's pooled output beside its hidden states): the edit may then have no
    effect. Tensors of more dimensions than the edited one (attention weights beside an
    attention output) are not counted."""
    leaves = value.args + tuple(value.kwargs.values()) if isinstance(value, Args) else value
    others = [
        leaf
        for leaf in pytree.tree_leaves(leaves)
        if isinstance(leaf, Tensor)
        and leaf is not x
        and (leaf.is_floating_point() or leaf.is_complex())
        and leaf.dim() <= x.dim()
    ]
    if others:
        shapes = ", ".join(str(tuple(t.shape)) for t in others[:3])
        warnings.warn(
            f"the edit {edit!r} at layer {site.name!r} changed only the primary tensor of its "
            f"{site.kind} ({type(value).__name__}), which holds other floating-point tensors "
            f"({shapes}); if the model reads those, the edit does not reach it. Edit the whole "
            "structure with Hook(edit, whole=True), or hook the module that computes the "
            "tensor the model reads.",
            PartialEditWarning,
            stacklevel=2,
        )


def warn_replays(name: str) -> None:
    warnings.warn(
        f"activation checkpointing re-runs layer {name!r}, which the run called several "
        "times: its edits are applied again with the Site of the call they replay, matched "
        "in the order backward re-runs checkpointed segments (the last segment first). Two "
        "calls inside one checkpointed segment are replayed in the other order: an edit that "
        "depends on site.call is then applied with the wrong call there.",
        HookfnWarning,
        stacklevel=2,
    )


def in_context(error: HookfnError, edit: object, site: Site) -> HookfnError:
    """``error``, raised inside an edit, with the edit and the site it ran at in front."""
    text = f"the edit {edit!r} at layer {site.name!r} ({site.kind}, call {site.call}): {error}"
    try:
        new = type(error)(text)
    except Exception:
        new = EditError(text)
    return new.with_traceback(error.__traceback__)


def no_primary(name: str, kind: str, value: object) -> EditError:
    return EditError(
        f"cannot edit the {kind} of layer {name!r}: it is a {type(value).__name__} with no "
        "primary tensor (a tensor, or a tuple/list/mapping whose first item is a tensor). "
        "Hook a submodule that produces a tensor instead."
    )
