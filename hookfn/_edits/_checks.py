"""Checks and conversions an edit makes when it runs: operands against the activation's
shape and dtype, dimensions, cached tensors.

Messages say what is wrong and the fix, without the layer: the hook engine adds the edit,
the layer, the kind and the call once, where it catches the error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._errors import EditError
from ._arguments import Operand


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
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


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...] | None:
    """The shape ``a`` and ``b`` broadcast to, or None where they do not."""
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    shape = []
    for i, j in zip(a, b, strict=True):
        if i != j and i != 1 and j != 1:
            return None
        shape.append(j if i == 1 else i)
    return tuple(shape)


def _broadcast_error(what: str, shape: Sequence[int], x: Tensor) -> EditError:
    return EditError(
        f"the {what} has shape {tuple(shape)}, which does not broadcast to the activation of "
        f"shape {tuple(x.shape)}; pass a number or a tensor that broadcasts to "
        f"{tuple(x.shape)} (e.g. shape {tuple(x.shape[-1:])})."
    )


def as_operand(value: Operand, x: Tensor, what: str, *, on_bool: bool = False) -> Operand:
    """``value`` checked to broadcast to ``x`` and converted to its device and dtype: what an
    elementwise edit combines with ``x``.

    The one rule for numbers and tensors alike: a value goes into the activation's dtype.
    For a floating-point (or complex) activation that is a cast; for an integer or bool one
    (token ids, masks) every value must convert exactly (``2.0`` is ``2``; ``0.5`` is an
    `EditError`). Arithmetic on a bool activation is refused unless ``on_bool``.
    """
    if isinstance(value, Tensor):
        # The common case first: x's dtype and device, and x's trailing shape (a vector
        # along the last dimension, or x's own shape).
        if value.dtype is x.dtype and value.device == x.device:
            n = value.dim()
            if n <= x.dim() and (n == 0 or value.shape == x.shape[-n:]):
                return value
        if value.shape != x.shape and not broadcasts_to(value.shape, x.shape):
            raise _broadcast_error(what, value.shape, x)
        if value.dtype is x.dtype and value.device == x.device:
            return value
        return _converted(value, x, what, on_bool)
    if x.is_floating_point():
        if type(value) is complex:
            raise _complex_error(what, x)
        if -448.0 <= value <= 448.0:  # type: ignore[operator]  # in every float dtype's range
            return value
        return _float_like(value, x)  # type: ignore[arg-type]
    return _number_like(value, x, what, on_bool)


def _float_like(value: float, x: Tensor) -> float:
    """A large number as the activation's dtype holds it, as a tensor operand would be cast
    (beyond the dtype's range: ±inf). torch refuses to fill or clamp with a number out of
    its range, and would raise an error of its own."""
    try:
        wide = float(value)
    except OverflowError:  # an int beyond float64
        wide = math.copysign(math.inf, value)
    return float(torch.tensor(wide, dtype=torch.float64).to(x.dtype))


def _complex_error(what: str, x: Tensor) -> EditError:
    return EditError(
        f"the {what} is complex, but the activation is {x.dtype}; pass a real value (a "
        "complex one would drop its imaginary part)."
    )


def _bool_error(what: str) -> EditError:
    return EditError(
        f"arithmetic with a {what} on a bool activation (a mask) would be logic (True + True "
        "is True); use replace(), or a function such as lambda x: x | m."
    )


def _inexact_error(what: str, x: Tensor, shown: str) -> EditError:
    return EditError(
        f"the {what} ({shown}) has values that {x.dtype} cannot hold exactly, and the "
        f"activation is {x.dtype} (token ids?); an integer activation takes whole numbers in "
        "its range (2.0 is 2): pass those, or edit a floating-point activation."
    )


def _converted(value: Tensor, x: Tensor, what: str, on_bool: bool) -> Tensor:
    if value.is_complex() and not x.is_complex():
        raise _complex_error(what, x)
    if x.is_floating_point() or x.is_complex():
        return value.to(device=x.device, dtype=x.dtype)
    if x.dtype is torch.bool and not on_bool:
        raise _bool_error(what)
    converted = value.to(device=x.device, dtype=x.dtype)
    # Exact when converting back gives the same values (NaN, 0.5, an overflow do not).
    if not torch.equal(converted.to(value.dtype), value.to(x.device)):
        raise _inexact_error(what, x, f"a {value.dtype} tensor")
    return converted


def _number_like(value: Operand, x: Tensor, what: str, on_bool: bool) -> Operand:
    """A number for a complex, integer or bool activation (see `as_operand`)."""
    if x.is_complex():
        return value
    if isinstance(value, complex):
        raise _complex_error(what, x)
    if x.dtype is torch.bool:
        if not on_bool:
            raise _bool_error(what)
        low, high = 0, 1
    else:
        info = torch.iinfo(x.dtype)
        low, high = info.min, info.max
    if isinstance(value, float) and not value.is_integer():  # NaN, inf, 0.5
        raise _inexact_error(what, x, repr(value))
    if not low <= value <= high:  # type: ignore[operator]
        raise _inexact_error(what, x, repr(value))
    return int(value)  # type: ignore[arg-type]


def needs_float(x: Tensor, name: str, fix: str) -> None:
    if not x.is_floating_point():
        raise EditError(
            f"{name} needs a floating-point activation, but this one is {x.dtype}; {fix}."
        )


def like_x(tensor: Tensor, x: Tensor, what: str) -> Tensor:
    """A tensor read from a cache, on ``x``'s device and in its dtype (a copy when either
    changes). Another kind of number (a float cache for integer ids) is an `EditError`."""
    if tensor.dtype is x.dtype:
        return tensor if tensor.device == x.device else tensor.to(x.device)
    same_kind = (tensor.is_floating_point() and x.is_floating_point()) or (
        tensor.is_complex() and x.is_complex()
    )
    if not same_kind:
        raise EditError(
            f"the {what} is {tensor.dtype}, but the activation is {x.dtype}; read a cache "
            "recorded at an activation of the same kind of number."
        )
    return tensor.to(device=x.device, dtype=x.dtype)


def check_last_dim(vector: Tensor, x: Tensor, what: str) -> None:
    if x.dim() == 0 or vector.shape[-1] != x.shape[-1]:
        raise EditError(
            f"the {what} has shape {tuple(vector.shape)}, but the activation has shape "
            f"{tuple(x.shape)}; it acts on the last dimension, so it needs "
            f"{x.shape[-1] if x.dim() else 'a'} entries there (shape {tuple(x.shape[-1:])})."
        )
    if not broadcasts_to(vector.shape, x.shape):
        raise _broadcast_error(what, vector.shape, x)


def dim_size(x: Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise EditError(
            f"dim={dim} is out of range for the activation of shape {tuple(x.shape)} "
            f"({x.dim()} dimensions); pass a dim in [{-x.dim()}, {x.dim() - 1}]."
        )
    return int(x.shape[dim])
