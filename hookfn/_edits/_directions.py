"""Directions: `project_out`, `steer`.

A direction is normalized robustly when the edit runs: scaled by its largest entry first (no
overflow or underflow of the squares), in its own precision or float32 at least, and only
then cast to the activation's dtype. A zero direction gives a zero unit vector, which leaves
the activation unchanged. A direction with an inf or NaN entry is refused when the edit is
built. The direction tensor is held as it is (not copied), as the other edits hold theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import EditError, SpecError
from .._site import Site
from ._arguments import concrete_value, real_arg
from ._base import ValueEdit, call_repr
from ._checks import broadcast_shape, broadcasts_to, check_last_dim, needs_float


def _direction_arg(direction: object, what: str) -> Tensor:
    if not isinstance(direction, Tensor) or direction.dim() == 0:
        raise SpecError(f"{what} takes a tensor with a last dimension, got {direction!r}.")
    if direction.is_complex() or direction.dtype is torch.bool:
        raise SpecError(f"{what} takes a real tensor, got dtype {direction.dtype}.")
    if (
        direction.is_floating_point()
        and concrete_value(direction)
        and not bool(torch.isfinite(direction).all())
    ):
        raise SpecError(
            f"{what} has inf or NaN entries, so it has no direction to normalize; pass a "
            "finite tensor."
        )
    return direction


def _unit(vector: Tensor, x: Tensor) -> Tensor:
    """``vector / |vector|`` along the last dim, in ``x``'s dtype and on its device; zero
    where ``vector`` is zero."""
    precision = torch.promote_types(vector.dtype, torch.float32)
    v = vector.to(device=x.device, dtype=precision)
    # Scaled by the largest entry first: its entries are then in [-1, 1] and their norm in
    # [1, sqrt(d)], whatever the magnitude of the direction (1e-30 or 1e30).
    largest = v.abs().amax(dim=-1, keepdim=True)
    scaled = v / torch.where(largest > 0, largest, 1.0)
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    unit = scaled / torch.where(norm > 0, norm, 1.0)
    return unit.to(x.dtype)


_FLOAT_FIX = "edit a floating-point activation (token ids have no direction)"


@dataclass(frozen=True, slots=True, eq=False)
class ProjectOut(ValueEdit):
    """Remove the component along a direction (see `project_out`)."""

    direction: Tensor

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        needs_float(x, "project_out", _FLOAT_FIX)
        check_last_dim(self.direction, x, "direction")
        unit = _unit(self.direction, x)
        if unit.dim() == 1:
            return x - (x @ unit).unsqueeze(-1) * unit
        return x - (x * unit).sum(dim=-1, keepdim=True) * unit

    def __repr__(self) -> str:
        return call_repr("project_out", (self.direction,))


def project_out(direction: Tensor) -> ProjectOut:
    """Remove the component of the activation along ``direction`` (on the last dim).

    ``x - (x . u) u`` with ``u = direction / |direction|``, normalized robustly (see the
    module notes: tiny, huge and half-precision directions alike). A direction of shape
    ``[d]`` applies everywhere; one of shape ``[seq, d]`` (any shape broadcasting to the
    activation) gives one direction per position. A zero direction leaves ``x`` unchanged.
    Laws: idempotent; afterwards ``x . u == 0``.

    Raises:
        SpecError: ``direction`` is not a real tensor with a last dimension, or has inf or
            NaN entries.
        EditError: (when applied) the direction's last dim differs from the activation's,
            or the activation is not floating-point.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> project_out(torch.tensor([2.0, 0.0]))(torch.tensor([[3.0, 4.0]]), site)
        tensor([[0., 4.]])
    """
    return ProjectOut(_direction_arg(direction, "project_out(direction)"))


@dataclass(frozen=True, slots=True, eq=False)
class Steer(ValueEdit):
    """Add ``alpha`` times a unit vector (see `steer`)."""

    vector: Tensor
    alpha: Tensor | float

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        needs_float(x, "steer", _FLOAT_FIX)
        check_last_dim(self.vector, x, "vector")
        alpha = self.alpha
        if isinstance(alpha, Tensor):
            shape = broadcast_shape(alpha.shape, self.vector.shape)
            if shape is None or not broadcasts_to(shape, x.shape):
                raise EditError(
                    f"alpha has shape {tuple(alpha.shape)} and the vector "
                    f"{tuple(self.vector.shape)}: alpha * vector does not broadcast to the "
                    f"activation of shape "
                    f"{tuple(x.shape)}; pass a number, or one length per row with the "
                    f"activation's rank (e.g. shape {(x.shape[0],) + (1,) * (x.dim() - 1)})."
                )
            alpha = alpha.to(device=x.device, dtype=x.dtype)
        return x + alpha * _unit(self.vector, x)

    def __repr__(self) -> str:
        return call_repr("steer", (self.vector,), {"alpha": self.alpha})


def steer(vector: Tensor, alpha: Tensor | float) -> Steer:
    """Add ``alpha`` times the unit vector along ``vector`` (on the last dim).

    ``x + alpha * u`` with ``u = vector / |vector|`` (normalized robustly, as in
    `project_out`), so ``alpha`` is the length of the added component whatever the norm of
    ``vector``; a zero vector adds nothing. To add a vector as it is, use ``add(vector)``.
    Laws: ``steer(v, a) >> steer(v, b)`` equals ``steer(v, a + b)`` numerically;
    ``steer(v, 0.0)`` is the identity.

    Args:
        vector: A real tensor whose last dim is the activation's (``[d]``, or ``[seq, d]``
            for one per position).
        alpha: A finite number, or a real tensor of lengths whose last dim is 1 (e.g. shape
            ``[batch, 1, 1]``, one per input), which broadcasts with the vector to the
            activation.

    Raises:
        SpecError: ``vector`` is not a real tensor with a last dimension or is not finite;
            ``alpha`` is not a finite number or a real tensor with a last dim of 1.
        EditError: (when applied) the vector's last dim differs from the activation's,
            ``alpha * vector`` does not broadcast to it, or it is not floating-point.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> steer(torch.tensor([0.0, 5.0]), 2.0)(torch.zeros(1, 2), site)
        tensor([[0., 2.]])
    """
    vector = _direction_arg(vector, "steer(vector, alpha)")
    if alpha is None:
        raise SpecError("steer(vector, alpha) needs alpha, the length to add: a number.")
    length = real_arg(alpha, "steer(vector, alpha)", finite=True)
    if isinstance(length, Tensor) and length.dim() > 0 and length.shape[-1] != 1:
        raise SpecError(
            f"steer(vector, alpha): alpha has shape {tuple(length.shape)}; a tensor alpha holds "
            "lengths, with a last dim of 1 (e.g. shape [batch, 1, 1] for one per input). To "
            "add a different amount per feature, use add(tensor)."
        )
    return Steer(vector, length)
