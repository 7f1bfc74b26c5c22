"""Checks of an edit's arguments when it is built: wrong whatever the activation means a
`SpecError` there, not a torch error deep inside a run."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Union

import torch
from torch import Tensor
from typing_extensions import TypeAlias

from .._capture import Capture
from .._errors import SpecError

Number: TypeAlias = Union[int, float, complex]
Operand: TypeAlias = Union[Tensor, int, float, complex]


def is_bool(value: object) -> bool:
    """A Python or numpy bool (numpy's is no subclass of `bool`)."""
    return isinstance(value, bool) or (
        type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")
    )


def is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype is not torch.bool


def int_like(value: object) -> int | None:
    """``value`` as an int when it is an integer (an int, a numpy integer, a 0-d integer
    tensor), else None. A bool is not an integer here: as an index it means something else."""
    if is_bool(value):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, Tensor):
        if value.dim() == 0 and is_integer_dtype(value.dtype):
            return int(value.item())
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return None


def dim_arg(dim: object, what: str) -> int:
    found = int_like(dim)
    if found is None:
        raise SpecError(f"{what} takes an int (a dimension), got {dim!r}.")
    return found


def _number(value: object) -> Number | None:
    """A real or complex number (numpy's included) as a Python number; None for anything
    else, bools included."""
    if is_bool(value) or isinstance(value, Tensor):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, numbers.Complex):
        return complex(value)
    return None


def operand_arg(value: object, what: str) -> Operand:
    """A number or a tensor to combine with the activation (``add(value)``, ...)."""
    number = _number(value)
    if number is not None:
        return number
    if isinstance(value, Tensor):
        if value.dtype is torch.bool:
            raise SpecError(
                f"{what} is a bool tensor; pass numbers (mask.float()), or restrict an edit "
                "to the masked entries with at(mask, edit) / ablate(mask)."
            )
        return value
    hint = (
        " A list is not taken: pass torch.tensor([...])."
        if isinstance(value, (list, tuple))
        else ""
    )
    raise SpecError(f"{what} takes a number or a tensor, got {type(value).__name__}.{hint}")


def real_arg(value: object, what: str, *, finite: bool = False) -> Tensor | int | float:
    """A real number or a real tensor (a bound, a steering length); NaN refused, and ±inf
    too when ``finite``."""
    operand = operand_arg(value, what)
    if isinstance(operand, complex) or (isinstance(operand, Tensor) and operand.is_complex()):
        raise SpecError(f"{what} takes a real number or a real tensor, got {value!r}.")
    if isinstance(operand, Tensor):
        if concrete_value(operand):
            bad = ~torch.isfinite(operand) if finite else torch.isnan(operand)
            if bool(bad.any()):
                raise SpecError(
                    f"{what} holds {'inf or NaN' if finite else 'NaN'} entries, which would "
                    f"make entries NaN; pass {'finite values' if finite else 'numbers'}."
                )
        return operand
    if operand != operand:
        raise SpecError(f"{what} is NaN, which would make every entry NaN; pass a number.")
    if finite and operand in (float("inf"), float("-inf")):
        raise SpecError(f"{what} is {operand!r}; pass a finite number.")
    return operand


def concrete_value(tensor: Tensor) -> bool:
    """Whether ``tensor``'s values can be read now: not while torch.func transforms it (a
    batched or grad-tracking wrapper), where a check on them would be data-dependent."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return tensor.device.type != "meta" and not (wrapped is not None and wrapped(tensor))


def cache_arg(cache: object, what: str) -> dict[str, Capture]:
    """A private copy of a ``{layer: Capture}`` dict: changing the caller's dict later does
    not change the edit (the captures themselves are immutable)."""
    if isinstance(cache, Capture):
        raise SpecError(
            f"{what} takes the {{layer: Capture}} dict of an earlier run, got one Capture; "
            f"pass {{{cache.name!r}: capture}} (or the whole dict run_with_hooks returned)."
        )
    if isinstance(cache, Tensor):
        raise SpecError(
            f"{what} takes the {{layer: Capture}} dict of an earlier run, got a tensor; use "
            "replace(tensor) to put in a tensor of your own."
        )
    if not isinstance(cache, Mapping):
        raise SpecError(
            f"{what} takes the {{layer: Capture}} dict that run_with_hooks returns, got "
            f"{type(cache).__name__}."
        )
    for name, capture in cache.items():
        if not isinstance(name, str) or not isinstance(capture, Capture):
            raise SpecError(
                f"{what}: the cache maps {name!r} to a {type(capture).__name__}; a cache is the "
                "{layer: Capture} dict that run_with_hooks returns."
            )
    return dict(cache)
