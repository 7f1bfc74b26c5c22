"""Elementwise edits: `add`, `scale`, `replace`, `clamp`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import SpecError
from .._site import Site
from ._base import _call_repr, _short_repr, _Value
from ._checks import _operand

# -- elementwise edits -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Add(_Value):
    """``x + value`` (see `add`)."""

    value: Tensor | float

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        return x + _operand(self.value, x, self, site, "value")

    def __repr__(self) -> str:
        return f"add({_short_repr(self.value)})"


def add(value: Tensor | float) -> Add:
    """Add a scalar or a tensor (broadcast) to the activation.

    A tensor is moved to the activation's device and dtype. Laws:
    ``add(a) >> add(b)`` equals ``add(a + b)`` numerically; ``add(0.0)`` is the identity.

    Args:
        value: A number, or a tensor that broadcasts against the activation.

    Raises:
        EditError: (when applied) the tensor does not broadcast to the activation.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> add(1.0)(torch.zeros(2), site)
        tensor([1., 1.])
    """
    return Add(value)


@dataclass(frozen=True, slots=True, eq=False)
class Scale(_Value):
    """``x * factor`` (see `scale`)."""

    factor: Tensor | float

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        return x * _operand(self.factor, x, self, site, "factor")

    def __repr__(self) -> str:
        return f"scale({_short_repr(self.factor)})"


def scale(factor: Tensor | float) -> Scale:
    """Multiply the activation by a scalar or a tensor (broadcast).

    A tensor is moved to the activation's device and dtype. Laws:
    ``scale(a) >> scale(b)`` equals ``scale(a * b)`` numerically; ``scale(1.0)`` is the
    identity; ``scale(0.0)`` zeroes everything (keeping the gradient path at zero).

    Args:
        factor: A number, or a tensor that broadcasts against the activation (e.g. one
            factor per feature, shape ``[d]``).

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> scale(torch.tensor([1.0, 0.0, 2.0]))(torch.ones(2, 3), site)
        tensor([[1., 0., 2.],
                [1., 0., 2.]])
    """
    return Scale(factor)


@dataclass(frozen=True, slots=True, eq=False)
class Replace(_Value):
    """A new tensor of the activation's shape filled from ``value`` (see `replace`)."""

    value: Tensor | float

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        value = _operand(self.value, x, self, site, "value")
        if isinstance(value, Tensor):
            return value.expand(x.shape).clone()
        return torch.full_like(x, value)

    def __repr__(self) -> str:
        return f"replace({_short_repr(self.value)})"


def replace(value: Tensor | float) -> Replace:
    """Replace the activation by a constant: a number, or a tensor broadcast to its shape.

    The result is a fresh tensor (never ``value`` itself, so the model cannot change
    ``value`` in place); it does not depend on ``x``, so no gradient flows back through it.
    Laws: ``a >> replace(v)`` equals ``replace(v)`` for any edit ``a`` (that keeps the
    shape); ``replace(v)`` is idempotent.

    Args:
        value: A number, or a tensor that broadcasts to the activation's shape.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> replace(torch.tensor([1.0, 2.0]))(torch.zeros(2, 2), site)
        tensor([[1., 2.],
                [1., 2.]])
    """
    return Replace(value)


@dataclass(frozen=True, slots=True, eq=False)
class Clamp(_Value):
    """``x`` clamped to ``[lo, hi]`` (see `clamp`)."""

    lo: Tensor | float | None
    hi: Tensor | float | None

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        if self.lo is not None:
            x = torch.clamp_min(x, _operand(self.lo, x, self, site, "lower bound"))
        if self.hi is not None:
            x = torch.clamp_max(x, _operand(self.hi, x, self, site, "upper bound"))
        return x

    def __repr__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return _call_repr("clamp", (self.lo, self.hi))
        if self.lo is not None:
            return _call_repr("clamp", (), {"lo": self.lo})
        return _call_repr("clamp", (), {"hi": self.hi})


def clamp(lo: Tensor | float | None = None, hi: Tensor | float | None = None) -> Clamp:
    """Clamp the activation to ``[lo, hi]``; either bound may be left out.

    Bounds are numbers or tensors that broadcast against the activation (e.g. per-feature
    bounds, shape ``[d]``). Laws: ``clamp(lo, hi)`` is idempotent.

    Raises:
        SpecError: Both bounds are missing, or ``lo > hi`` (numbers).

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> clamp(-1.0, 1.0)(torch.tensor([-3.0, 0.5, 3.0]), site)
        tensor([-1.0000,  0.5000,  1.0000])
    """
    if lo is None and hi is None:
        raise SpecError("clamp() needs a lower bound, an upper bound or both: clamp(lo, hi).")
    if (
        lo is not None
        and hi is not None
        and not isinstance(lo, Tensor)
        and not isinstance(hi, Tensor)
        and lo > hi
    ):
        raise SpecError(f"clamp({lo!r}, {hi!r}): the lower bound is above the upper bound.")
    return Clamp(lo, hi)
