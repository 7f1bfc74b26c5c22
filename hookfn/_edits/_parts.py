"""The part of an activation an edit sees inside `at` or `heads`, and writing a part back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._site import Site


def whole_shape(site: Site, x: Tensor) -> torch.Size:
    """The shape of the whole activation at the layer (``x`` may be a part of it)."""
    whole: torch.Size | None = getattr(site, "whole_shape", None)
    return x.shape if whole is None else whole


def through_views(site: Site, tensor: Tensor) -> Tensor:
    """Take the same part of a whole-layer tensor as the edit was given (see `at`)."""
    for view in getattr(site, "_views", ()):
        tensor = view(tensor)
    return tensor


class _PartSite(Site):
    """A `Site` whose edit sees part of the activation (inside `at` or `heads`).

    ``whole_shape`` is the layer's whole activation shape and ``_views`` the functions that
    take the part from a whole-layer tensor, so that cache-reading edits read the same part.
    """

    whole_shape: torch.Size
    _views: tuple[Callable[[Tensor], Tensor], ...]


def part_site(site: Site, whole: torch.Size, view: Callable[[Tensor], Tensor]) -> Site:
    part = _PartSite(
        str.__str__(site),
        call=getattr(site, "call", 0),
        kind=getattr(site, "kind", "output"),
        module=getattr(site, "module", None),  # type: ignore[arg-type]
    )
    # (Set past Site.__setattr__, which only guards the read-only fields.)
    object.__setattr__(part, "whole_shape", getattr(site, "whole_shape", whole))
    object.__setattr__(part, "_views", (*getattr(site, "_views", ()), view))
    return part


def write_part(x: Tensor, index: tuple[Any, ...], new: Tensor) -> Tensor:
    """A copy of ``x`` with ``x[index]`` replaced by ``new``."""
    y = x.clone()
    try:
        y[index] = new
    except RuntimeError:
        # Under vmap, a batched part cannot be written into an unbatched copy in place.
        return write_out_of_place(x, index, new)
    return y


def write_out_of_place(x: Tensor, index: tuple[Any, ...], new: Tensor | float) -> Tensor:
    """`write_part` without in-place ops (slower: it builds an index of every entry)."""
    ids = torch.arange(x.numel(), device=x.device).view(x.shape)[index]
    values = new.expand(ids.shape) if isinstance(new, Tensor) else torch.full_like(ids, new)
    flat = x.reshape(-1).index_put((ids.reshape(-1),), values.reshape(-1).to(x.dtype))
    return flat.view(x.shape)
