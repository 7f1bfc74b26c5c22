"""Reading a cache of an earlier run: `patch_from`, and the lookup that cache-reading edits
share."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .._capture import primary
from .._errors import EditError
from .._site import Site
from ._arguments import cache_arg
from ._base import Cache, ValueEdit, call_repr
from ._checks import like_x
from ._parts import through_views, whole_shape


def cached_part(cache: Cache, site: Site) -> Tensor:
    """The tensor recorded at ``site`` (same layer, call and kind) in ``cache``; the
    message of a missing one names the layer, since that is what is missing."""
    name = str.__str__(site)
    kind = str(getattr(site, "kind", "output"))
    call = int(getattr(site, "call", 0))
    capture = cache.get(name)
    if capture is None:
        names = list(cache)
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (closest: {', '.join(map(repr, close))})" if close else ""
        raise EditError(
            f"the cache has no layer {name!r}{hint}; it has "
            f"{len(names)} layer(s): {names[:6]}. Capture {name!r} in the run that made the "
            f"cache, e.g. run_with_hooks(model, clean_inputs, [{name!r}, ...])."
        )
    records: tuple[Any, ...]
    if kind == "output":
        records = capture.raw_outputs
    elif kind == "input":
        records = capture.raw_inputs
    elif kind == "grad_output":
        records = capture.grad_outputs
    else:
        records = capture.grad_inputs
    if call >= len(records):
        raise EditError(
            f"the cache recorded {len(records)} {kind}(s) of layer "
            f"{name!r}, but this is call {call}. Record the {kind} in the run that made the "
            f"cache ({_HOW[kind]}), with the same calls of the module as this run."
        )
    tensor = primary(records[call])
    if tensor is None:
        raise EditError(
            f"the cached {kind} of layer {name!r} (call {call}) has no "
            f"tensor ({type(records[call]).__name__}); {_HOW[kind]}."
        )
    return tensor


_HOW = {
    "output": "capture it: 'capture' or Hook(output=True)",
    "input": "capture it with Hook(input=True)",
    "grad_output": "capture it with Hook(grad=True) and backward=...",
    "grad_input": "capture it with Hook(grad_input=True) and backward=...",
}


@dataclass(frozen=True, slots=True, eq=False)
class PatchFrom(ValueEdit):
    """The activation recorded at the same layer and call in a cache (see `patch_from`)."""

    cache: Cache

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        source = cached_part(self.cache, site)
        whole = whole_shape(site, x)
        if source.shape != whole:
            raise EditError(
                f"the cached activation has shape {tuple(source.shape)}, but this run's has "
                f"shape {tuple(whole)}; patch from a run on inputs of the same shape (same "
                "batch size and sequence length)."
            )
        # The part the edit is given (inside `at`/`heads`), then a copy of it alone: the model
        # may change the patched tensor in place, never the cache.
        part = through_views(site, source)
        if part.dtype is x.dtype and part.device == x.device:
            return part.clone()
        return like_x(part, x, "cached activation")  # converted: a copy

    def __repr__(self) -> str:
        return call_repr("patch_from", (self.cache,))


def patch_from(cache: Cache) -> PatchFrom:
    """Replace the activation by the one recorded at the same layer in an earlier run.

    ``cache`` is the ``{layer: Capture}`` dict `run_with_hooks` returned; the recorded tensor
    is looked up by the site's layer name and call index (a module called several times is
    patched call by call), and by what is edited (output, input or gradient). Restrict the
    patch to positions, a token mask or heads by composition:
    ``patch_from(clean).at([3, 4])``, ``heads(patch_from(clean), n_heads=12, which=[5])``.
    Laws: patching a run from its own cache changes nothing; idempotent.

    The dict is copied when the edit is built (the captures in it are immutable): putting
    another capture into the caller's dict later does not change the edit.

    Raises:
        SpecError: ``cache`` is not a ``{layer: Capture}`` dict.
        EditError: (when applied) the cache lacks the layer or the call, or the recorded
            shape differs from the activation's, or it holds another kind of number.

    Examples:
        >>> import torch
        >>> from hookfn import run_with_hooks
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> clean, corrupt = torch.randn(3, 4), torch.randn(3, 4)
        >>> clean_out, cache = run_with_hooks(model, clean, ["0"])
        >>> out, _ = run_with_hooks(model, corrupt, {"0": patch_from(cache)})
        >>> torch.allclose(out, clean_out)
        True
    """
    return PatchFrom(cache_arg(cache, "patch_from(cache)"))
