"""Index forms: each read into one canonical value when an edit is built, and turned into
an index of the activation when it runs.

The forms and their one meaning (docs/edits.md has the table):

- ``None``: everything;
- an int, a numpy integer or a 0-d integer tensor: one position (`at` keeps its dimension);
- a slice of ints with a positive step;
- a list, tuple or range of ints, or a 1-D integer tensor: positions (stored as a list);
- a list of bools or a 1-D bool tensor: a mask of the dimension's length;
- `at` only: a bool tensor of 2 or more dims, a token mask over the leading dims; a tuple,
  an index expression used as it is (``x[index]``).

Refused, with the fix: a bool scalar (torch would read it as a new axis), a uint8 tensor (old
torch read it as a mask), an integer tensor of 2 or more dims, a slice with a negative step,
``None`` inside an index expression, floats.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._errors import EditError, SpecError
from ._arguments import dim_arg, int_like, is_bool, is_integer_dtype
from ._base import Index, short_repr
from ._checks import dim_size
from ._parts import write_out_of_place

_FORMS = (
    "pass an int, a list of ints, a slice, a bool mask of the dim's length (a list or a 1-D "
    "tensor), a 1-D integer tensor, or None for everything"
)


def index_along(idx: object, what: str) -> Index:
    """The canonical form of an index along one dimension (see the module docstring)."""
    if idx is None:
        return None
    if is_bool(idx):
        raise SpecError(
            f"{what}: {idx!r} is a bool, which torch reads as a new axis, not a position; {_FORMS}."
        )
    position = int_like(idx)
    if position is not None:
        return position
    if isinstance(idx, slice):
        return _slice(idx, what)
    if isinstance(idx, Tensor):
        return _tensor_along(idx, what)
    if isinstance(idx, (list, tuple, range)):
        return _list_along(list(idx), what)
    raise SpecError(f"{what}: cannot index with a {type(idx).__name__} ({idx!r}); {_FORMS}.")


def _slice(s: slice, what: str) -> slice:
    bounds = []
    for name in ("start", "stop", "step"):
        value = getattr(s, name)
        if value is not None:
            found = int_like(value)
            if found is None:
                raise SpecError(f"{what}: the {name} of {s!r} is not an int.")
            value = found
        bounds.append(value)
    start, stop, step = bounds
    if step is not None and step <= 0:
        raise SpecError(
            f"{what}: {s!r} has step {step}; torch slices only with a positive step. Select "
            "positions in another order with a list (e.g. list(range(7, -1, -1)))."
        )
    return slice(start, stop, None if step == 1 else step)


def _tensor_along(t: Tensor, what: str) -> Index:
    if t.dtype is torch.uint8:
        raise SpecError(
            f"{what}: a uint8 tensor is ambiguous (older torch read it as a mask); pass "
            "t.bool() for a mask or t.long() for positions."
        )
    if t.dtype is torch.bool:
        if t.dim() == 1:
            return t.detach().cpu().clone()
        raise SpecError(
            f"{what}: a bool tensor of shape {tuple(t.shape)} is not a mask of one dimension; "
            "pass a 1-D mask of the dim's length (at(mask, edit) takes a [batch, seq] token "
            "mask)."
        )
    if is_integer_dtype(t.dtype):
        if t.dim() == 1:
            return [int(i) for i in t.tolist()]
        raise SpecError(
            f"{what}: an integer tensor of shape {tuple(t.shape)} has no one meaning here; "
            "pass a 1-D tensor of positions. For other positions in each row of the batch, "
            "use a bool token mask with at(mask, edit), or an index expression "
            "at((rows[:, None], positions), edit)."
        )
    raise SpecError(f"{what}: a {t.dtype} tensor is not an index; {_FORMS}.")


def _list_along(items: list[Any], what: str) -> list[int] | list[bool]:
    if items and all(is_bool(i) for i in items):
        return [bool(i) for i in items]
    positions = [int_like(i) for i in items]
    for item, position in zip(items, positions, strict=True):
        if position is None:
            raise SpecError(
                f"{what}: {short_repr(items)} holds {item!r}; a list holds ints (positions) "
                "or bools (a mask), not a mix, nor other values."
            )
    return positions  # type: ignore[return-value]


def index_at(index: object, dim: object, what: str) -> tuple[Any, int | None]:
    """The canonical ``(index, dim)`` of `at`: ``dim`` is None where it does not apply."""
    if isinstance(index, tuple):
        if dim is not None:
            raise SpecError(
                f"{what}: a tuple is an index expression over several dims, so dim= does not "
                "apply; drop dim=, or pass a list to select along one dim."
            )
        return tuple(_expression_item(i, what) for i in index), None
    if isinstance(index, Tensor) and index.dtype is torch.bool and index.dim() >= 2:
        if dim is not None:
            raise SpecError(
                f"{what}: a bool mask of {index.dim()} dims selects over the leading dims, so "
                "dim= does not apply; drop dim=."
            )
        return index.detach().clone(), None
    if index is None:
        return None, None
    return index_along(index, what), 1 if dim is None else dim_arg(dim, "at(..., dim=...)")


def _expression_item(item: object, what: str) -> Any:
    """One entry of an index expression, checked and copied (see `index_at`)."""
    if item is Ellipsis:
        return item
    if item is None:
        raise SpecError(
            f"{what}: None in an index expression would insert a new axis; use slice(None) "
            "for everything along a dim."
        )
    if is_bool(item):
        raise SpecError(f"{what}: {item!r} in an index expression would insert a new axis.")
    position = int_like(item)
    if position is not None:
        return position
    if isinstance(item, slice):
        return _slice(item, what)
    if isinstance(item, Tensor):
        if item.dtype is torch.uint8:
            return _tensor_along(item, what)  # raises
        if item.dtype is torch.bool or is_integer_dtype(item.dtype):
            return item.detach().clone()
    if isinstance(item, (list, tuple)):
        return type(item)(_nested_item(i, what) for i in item)
    raise SpecError(f"{what}: {item!r} cannot be part of an index expression.")


def _nested_item(item: object, what: str) -> Any:
    if isinstance(item, (list, tuple)):
        return type(item)(_nested_item(i, what) for i in item)
    if is_bool(item):
        return bool(item)
    position = int_like(item)
    if position is None:
        raise SpecError(f"{what}: {item!r} in an index list is not an int or a bool.")
    return position


def index_kwargs(idx: Index, dim: int) -> tuple[list[object], dict[str, object]]:
    args: list[object] = [] if idx is None else [idx]
    kwargs: dict[str, object] = {} if dim == -1 else {"dim": dim}
    return args, kwargs


# -- when the edit runs ----------------------------------------------------------------------


def make_selector(x: Tensor, idx: Index, dim: int) -> int | slice | Tensor:
    """A canonical index as an index along ``dim`` of ``x``, checked on the CPU.

    Lists and masks become a long tensor of positions on ``x``'s device: checking them on
    the CPU turns a bad index into an `EditError` (on a GPU it would be a device-side assert).
    """
    size = dim_size(x, dim)
    if isinstance(idx, int):
        if -size <= idx < size:
            return idx
        problem = f"index {idx} is out of range"
    elif isinstance(idx, slice):
        return idx
    elif isinstance(idx, list):
        if idx and type(idx[0]) is bool:
            if len(idx) == size:
                positions = [i for i, keep in enumerate(idx) if keep]
                return torch.tensor(positions, dtype=torch.long, device=x.device)
            problem = f"the bool mask has length {len(idx)}"
        else:
            outside = [i for i in idx if not -size <= i < size]
            if not outside:
                return torch.tensor(idx, dtype=torch.long, device=x.device)
            problem = f"index {outside[0]} is out of range"
    else:
        assert isinstance(idx, Tensor)  # a 1-D bool mask
        if idx.shape[0] == size:
            return idx.nonzero().squeeze(1).to(x.device)
        problem = f"the bool mask has length {idx.shape[0]}"
    raise EditError(
        f"the index {short_repr(idx)} does not fit dimension {dim} of the activation of shape "
        f"{tuple(x.shape)} (size {size}): {problem}. Pass indices in [{-size}, {size - 1}] "
        f"or a bool mask of length {size}."
    )


def along_dim(selector: Any, dim: int) -> tuple[Any, ...]:
    if dim >= 0:
        return (*(slice(None),) * dim, selector)
    return (Ellipsis, selector, *(slice(None),) * (-dim - 1))


def replace_features(x: Tensor, values: Tensor | float, idx: Index, dim: int) -> Tensor:
    """A new tensor: ``x`` with the entries that ``idx`` selects along ``dim`` taken from
    ``values`` (which broadcasts to ``x``)."""
    if idx is None:
        if isinstance(values, Tensor):
            return values.expand(x.shape).clone()
        return torch.full_like(x, values)
    index = along_dim(make_selector(x, idx, dim), dim)
    new = values.expand(x.shape)[index] if isinstance(values, Tensor) else values
    y = x.clone()
    try:
        y[index] = new
    except RuntimeError:
        # Under vmap, batched values cannot be written into an unbatched copy in place.
        return write_out_of_place(x, index, new)
    return y
