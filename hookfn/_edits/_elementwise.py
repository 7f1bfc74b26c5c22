"""Elementwise edits: `add`, `scale`, `replace`, `clamp`.

Operands follow one rule (`as_operand`): they go into the activation's dtype, exactly for an
integer activation. A tensor operand is held as it is, not copied: an edit built from a
tensor that is later changed in place (a steering vector trained by an optimizer) follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import EditError, SpecError
from .._site import Site
from ._arguments import Operand, concrete_value, operand_arg, real_arg
from ._base import ValueEdit, call_repr, short_repr
from ._checks import as_operand, broadcast_shape


@dataclass(frozen=True, slots=True, eq=False)
class Add(ValueEdit):
    """``x + value`` (see `add`)."""

    value: Operand

    result_checked = True  # x's dtype and device, and x's shape (checked below)

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        value = self.value
        if type(value) is Tensor and value.dtype is x.dtype:
            # The common case: the sum's own shape tells whether value broadcast to x. Its
            # device is x's where x has a dimension: torch adds a tensor of another device
            # only if it is a 0-dim CPU one, and then puts the sum on x's device (as
            # `as_operand` would).
            try:
                y = x + value
            except RuntimeError:
                pass  # the checked path below raises the error that explains it
            else:
                if y.shape == x.shape and (x.dim() or y.device == x.device):
                    return y
        return x + as_operand(value, x, "value")

    def __repr__(self) -> str:
        return f"add({short_repr(self.value)})"


def add(value: Tensor | float) -> Add:
    """Add a number or a tensor (broadcast) to the activation.

    A tensor is moved to the activation's device and dtype. On an integer activation (token
    ids edited with ``Hook(edit_input=...)``) the value must be a whole number, as a number
    or in a tensor (``add(2.0)`` adds 2; ``add(0.5)`` is an `EditError`). Laws:
    ``add(a) >> add(b)`` equals ``add(a + b)`` numerically; ``add(0.0)`` is the identity.

    Args:
        value: A number, or a tensor that broadcasts against the activation (not a list:
            pass ``torch.tensor([...])``).

    Raises:
        SpecError: ``value`` is not a number or a tensor (or is a bool tensor).
        EditError: (when applied) the tensor does not broadcast to the activation, or an
            integer activation cannot hold the value exactly.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> add(1.0)(torch.zeros(2), site)
        tensor([1., 1.])
        >>> add(torch.tensor(2.0))(torch.tensor([3, 4]), site)  # token ids stay integers
        tensor([5, 6])
    """
    return Add(operand_arg(value, "add(value)"))


def _zero_of(x: Tensor) -> Tensor:
    """``x * 0`` with the NaN that ``inf * 0`` and ``nan * 0`` give made 0: zero
    everywhere, with a gradient path (of zeros) back to ``x``."""
    zero = x * 0
    if x.is_floating_point() or x.is_complex():
        return torch.nan_to_num(zero, nan=0.0)
    return zero


@dataclass(frozen=True, slots=True, eq=False)
class Scale(ValueEdit):
    """``x * factor`` (see `scale`)."""

    factor: Operand

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        factor = self.factor
        if not isinstance(factor, Tensor) and factor == 0:
            if x.dtype is torch.bool:
                as_operand(factor, x, "factor")  # raises
            return _zero_of(x)
        return x * as_operand(factor, x, "factor")

    def __repr__(self) -> str:
        return f"scale({short_repr(self.factor)})"


def scale(factor: Tensor | float) -> Scale:
    """Multiply the activation by a number or a tensor (broadcast).

    A tensor is moved to the activation's device and dtype (on an integer activation, the
    factor must be whole, as in `add`). Laws: ``scale(a) >> scale(b)`` equals
    ``scale(a * b)`` numerically; ``scale(1.0)`` is the identity; ``scale(0.0)`` (the
    number) zeroes everything, entries that are inf or NaN included, keeping a gradient path
    of zeros. A tensor factor multiplies as torch does, ``x * factor``, so that the gradient
    with respect to the factor stays ``x``: where it holds a 0, an inf or NaN entry gives
    NaN (use `ablate` to zero entries whatever they hold).

    Args:
        factor: A number, or a tensor that broadcasts against the activation (e.g. one
            factor per feature, shape ``[d]``).

    Raises:
        SpecError: ``factor`` is not a number or a tensor (or is a bool tensor).
        EditError: (when applied) as for `add`.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> scale(torch.tensor([1.0, 0.0, 2.0]))(torch.ones(2, 3), site)
        tensor([[1., 0., 2.],
                [1., 0., 2.]])
        >>> scale(0.0)(torch.tensor([1.0, float("inf"), float("nan")]), site)
        tensor([0., 0., 0.])
    """
    return Scale(operand_arg(factor, "scale(factor)"))


@dataclass(frozen=True, slots=True, eq=False)
class Replace(ValueEdit):
    """A new tensor of the activation's shape filled from ``value`` (see `replace`)."""

    value: Operand

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        value = as_operand(self.value, x, "value", on_bool=True)
        if isinstance(value, Tensor):
            return value.expand(x.shape).clone()
        return torch.full_like(x, value)

    def __repr__(self) -> str:
        return f"replace({short_repr(self.value)})"


def replace(value: Tensor | float) -> Replace:
    """Replace the activation by a constant: a number, or a tensor broadcast to its shape.

    The result is a fresh tensor (never ``value`` itself, so the model cannot change
    ``value`` in place); it does not depend on ``x``, so no gradient flows back through it.
    On an integer or bool activation the value must convert exactly. Laws:
    ``a >> replace(v)`` equals ``replace(v)`` for any edit ``a`` (that keeps the shape);
    ``replace(v)`` is idempotent.

    Args:
        value: A number, or a tensor that broadcasts to the activation's shape. NaN is
            taken as it is (replacing by NaN shows what depends on an activation).

    Raises:
        SpecError: ``value`` is not a number or a tensor (or is a bool tensor).

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> replace(torch.tensor([1.0, 2.0]))(torch.zeros(2, 2), site)
        tensor([[1., 2.],
                [1., 2.]])
    """
    return Replace(operand_arg(value, "replace(value)"))


@dataclass(frozen=True, slots=True, eq=False)
class Clamp(ValueEdit):
    """``x`` clamped to ``[lo, hi]`` (see `clamp`)."""

    lo: Tensor | float | None
    hi: Tensor | float | None

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        if x.is_complex():
            raise EditError(f"clamp needs a real activation, but this one is {x.dtype}.")
        y = x
        if self.lo is not None:
            y = torch.clamp_min(y, as_operand(self.lo, x, "lower bound"))
        if self.hi is not None:
            y = torch.clamp_max(y, as_operand(self.hi, x, "upper bound"))
        return y

    def __repr__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return call_repr("clamp", (self.lo, self.hi))
        if self.lo is not None:
            return call_repr("clamp", (), {"lo": self.lo})
        return call_repr("clamp", (), {"hi": self.hi})


def clamp(lo: Tensor | float | None = None, hi: Tensor | float | None = None) -> Clamp:
    """Clamp the activation to ``[lo, hi]``; either bound may be left out.

    Bounds are real numbers or tensors that broadcast against the activation (e.g.
    per-feature bounds, shape ``[d]``); ``±inf`` leaves that side open. A NaN entry of the
    activation stays NaN. Laws: ``clamp(lo, hi)`` is idempotent.

    Raises:
        SpecError: Both bounds are missing, a bound is NaN (it would make every entry NaN)
            or not a real number or tensor, or ``lo > hi`` somewhere (numbers or tensors),
            or tensor bounds do not broadcast against each other.
        EditError: (when applied) a bound does not broadcast to the activation, or does
            not fit an integer activation exactly.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> clamp(-1.0, 1.0)(torch.tensor([-3.0, 0.5, 3.0]), site)
        tensor([-1.0000,  0.5000,  1.0000])
    """
    if lo is None and hi is None:
        raise SpecError("clamp() needs a lower bound, an upper bound or both: clamp(lo, hi).")
    low = None if lo is None else real_arg(lo, "clamp(lo=...)")
    high = None if hi is None else real_arg(hi, "clamp(hi=...)")
    if low is not None and high is not None:
        _check_order(low, high)
    return Clamp(low, high)


def _check_order(lo: Tensor | float, hi: Tensor | float) -> None:
    if not isinstance(lo, Tensor) and not isinstance(hi, Tensor):
        if lo > hi:
            raise SpecError(f"clamp({lo!r}, {hi!r}): the lower bound is above the upper bound.")
        return
    shapes = [tuple(b.shape) for b in (lo, hi) if isinstance(b, Tensor)]
    if len(shapes) == 2 and broadcast_shape(*shapes) is None:
        raise SpecError(
            f"clamp(lo, hi): the bounds have shapes {shapes[0]} and {shapes[1]}, which do not "
            "broadcast against each other."
        )
    if not all(concrete_value(b) for b in (lo, hi) if isinstance(b, Tensor)):
        return  # values not readable under a torch.func transform
    low = lo if isinstance(lo, Tensor) else torch.tensor(lo)
    high = hi if isinstance(hi, Tensor) else torch.tensor(hi)
    above = low.detach().cpu() > high.detach().cpu()
    if bool(above.any()):
        raise SpecError(
            "clamp(lo, hi): the lower bound is above the upper bound at "
            f"{int(above.sum())} entr{'y' if int(above.sum()) == 1 else 'ies'}."
        )
