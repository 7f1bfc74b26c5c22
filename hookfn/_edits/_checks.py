"""Checks and conversions shared by the edits: operands, dimensions, indices."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._errors import EditError
from .._site import Site
from ._base import Edit, Index, _short_repr
from ._parts import _write_out_of_place

# -- shared checks ---------------------------------------------------------------------------


def _where(edit: Edit, site: Site) -> str:
    kind = getattr(site, "kind", "output")
    call = getattr(site, "call", 0)
    return f"{edit!r} at layer {str.__str__(site)!r} ({kind}, call {call})"


def _kind(site: Site) -> str:
    return str(getattr(site, "kind", "output"))


def _to_like(value: Tensor | float, x: Tensor) -> Tensor | float:
    if isinstance(value, Tensor) and (value.dtype is not x.dtype or value.device != x.device):
        return value.to(device=x.device, dtype=x.dtype)
    return value


def _broadcasts(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (without changing ``target``)."""
    n = len(shape)
    if n > len(target):
        return False
    # A loop over negative indices: edits run this on every call, a generator costs more.
    for i in range(1, n + 1):
        size = shape[-i]
        if size != 1 and size != target[-i]:
            return False
    return True


def _check_broadcast(
    value: Tensor | float | None, x: Tensor, edit: Edit, site: Site, what: str
) -> None:
    if isinstance(value, Tensor) and not (
        value.shape == x.shape or _broadcasts(value.shape, x.shape)
    ):
        raise EditError(
            f"{_where(edit, site)}: the {what} has shape {tuple(value.shape)}, which does not "
            f"broadcast to the {_kind(site)} of shape {tuple(x.shape)}; pass a scalar or a "
            f"tensor that broadcasts to {tuple(x.shape)} (e.g. shape {tuple(x.shape[-1:])})."
        )


def _operand(value: Tensor | float, x: Tensor, edit: Edit, site: Site, what: str) -> Tensor | float:
    """``value`` checked to broadcast to ``x`` and moved to its device and dtype: what an
    elementwise edit combines with ``x`` (`_check_broadcast`, then `_to_like`, in one step)."""
    if not isinstance(value, Tensor):
        return value
    if value.shape != x.shape and not _broadcasts(value.shape, x.shape):
        _check_broadcast(value, x, edit, site, what)  # raises
    if value.dtype is not x.dtype or value.device != x.device:
        return value.to(device=x.device, dtype=x.dtype)
    return value


def _check_last_dim(vector: Tensor, x: Tensor, edit: Edit, site: Site, what: str) -> None:
    if vector.dim() == 0 or vector.shape[-1] != x.shape[-1] or x.dim() == 0:
        raise EditError(
            f"{_where(edit, site)}: the {what} has shape {tuple(vector.shape)}, but the "
            f"{_kind(site)} has shape {tuple(x.shape)}; it acts on the last dimension, so it "
            f"needs {x.shape[-1] if x.dim() else 'a'} entries there (shape "
            f"{tuple(x.shape[-1:])})."
        )
    _check_broadcast(vector, x, edit, site, what)


def _dim_size(x: Tensor, dim: int, edit: Edit, site: Site) -> int:
    if not -x.dim() <= dim < x.dim():
        raise EditError(
            f"{_where(edit, site)}: dim={dim} is out of range for the {_kind(site)} of shape "
            f"{tuple(x.shape)} ({x.dim()} dimensions); pass a dim in [{-x.dim()}, {x.dim() - 1}]."
        )
    return int(x.shape[dim])


def _selector(x: Tensor, idx: Index, dim: int, edit: Edit, site: Site) -> int | slice | Tensor:
    """``idx`` as an index along ``dim`` of ``x``, checked on the CPU.

    Lists, bool masks and tensors become a long tensor of positions on ``x``'s device:
    checking them on the CPU turns a bad index into an `EditError` (on a GPU it would be a
    device-side assert).
    """
    size = _dim_size(x, dim, edit, site)
    try:
        if isinstance(idx, slice):
            return idx
        if isinstance(idx, int):
            if not -size <= idx < size:
                raise IndexError(f"index {idx} is out of range")
            return idx
        if isinstance(idx, (list, tuple)):
            # A tuple lists indices along the one dim, as a list does (not an expression).
            if idx and all(isinstance(i, bool) for i in idx):
                if len(idx) != size:
                    raise IndexError(f"the bool mask has length {len(idx)}")
                positions = [i for i, keep in enumerate(idx) if keep]
            else:
                positions = [operator.index(i) for i in idx]
                if not all(-size <= i < size for i in positions):
                    raise IndexError(f"an index of {list(positions)} is out of range")
            return torch.tensor(positions, dtype=torch.long, device=x.device)
        mask = torch.zeros(size, dtype=torch.bool)
        mask[idx.cpu() if isinstance(idx, Tensor) else idx] = True
    except (IndexError, RuntimeError, TypeError) as error:
        raise EditError(
            f"{_where(edit, site)}: the index {_short_repr(idx)} does not fit dimension {dim} "
            f"of the {_kind(site)} of shape {tuple(x.shape)} (size {size}): {error}. Pass "
            f"indices in [{-size}, {size - 1}] or a bool mask of length {size}."
        ) from None
    return mask.nonzero().squeeze(1).to(x.device)


def _along(selector: Any, dim: int) -> tuple[Any, ...]:
    if dim >= 0:
        return (*(slice(None),) * dim, selector)
    return (Ellipsis, selector, *(slice(None),) * (-dim - 1))


def _replace_features(
    x: Tensor, values: Tensor | float, idx: Index, dim: int, edit: Edit, site: Site
) -> Tensor:
    """``x`` with the entries that ``idx`` selects along ``dim`` taken from ``values``."""
    if idx is None:
        if isinstance(values, Tensor):
            return values.expand(x.shape).clone()
        return torch.full_like(x, values)
    index = _along(_selector(x, idx, dim, edit, site), dim)
    new = values.expand(x.shape)[index] if isinstance(values, Tensor) else values
    y = x.clone()
    try:
        y[index] = new
    except RuntimeError:
        # Under vmap, batched values cannot be written into an unbatched copy in place.
        return _write_out_of_place(x, index, new)
    return y
