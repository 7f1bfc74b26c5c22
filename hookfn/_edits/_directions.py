"""Directions: `project_out`, `steer`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import SpecError
from .._site import Site
from ._base import _call_repr, _Value
from ._checks import _check_last_dim, _to_like

# -- directions ------------------------------------------------------------------------------


def _unit(vector: Tensor) -> Tensor:
    # As F.normalize: a zero vector stays zero, so the edit then changes nothing.
    norm: Tensor = torch.linalg.vector_norm(vector, dim=-1, keepdim=True)
    return vector / norm.clamp_min(1e-12)


@dataclass(frozen=True, slots=True, eq=False)
class ProjectOut(_Value):
    """Remove the component along a direction (see `project_out`)."""

    direction: Tensor

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        _check_last_dim(self.direction, x, self, site, "direction")
        unit = _unit(self.direction.to(device=x.device, dtype=x.dtype))
        if unit.dim() == 1:
            return x - (x @ unit).unsqueeze(-1) * unit
        return x - (x * unit).sum(dim=-1, keepdim=True) * unit

    def __repr__(self) -> str:
        return _call_repr("project_out", (self.direction,))


def project_out(direction: Tensor) -> ProjectOut:
    """Remove the component of the activation along ``direction`` (on the last dim).

    ``x - (x . u) u`` with ``u = direction / |direction|``. A direction of shape ``[d]``
    applies everywhere; one of shape ``[seq, d]`` (any shape broadcasting to the activation)
    gives one direction per position. A zero direction leaves ``x`` unchanged. Laws:
    idempotent; afterwards ``x . u == 0``.

    Raises:
        EditError: (when applied) the direction's last dim differs from the activation's.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> project_out(torch.tensor([2.0, 0.0]))(torch.tensor([[3.0, 4.0]]), site)
        tensor([[0., 4.]])
    """
    if not isinstance(direction, Tensor) or direction.dim() == 0:
        raise SpecError(
            f"project_out(direction) takes a tensor with a last dimension, got {direction!r}."
        )
    return ProjectOut(direction)


@dataclass(frozen=True, slots=True, eq=False)
class Steer(_Value):
    """Add ``alpha`` times a unit vector (see `steer`)."""

    vector: Tensor
    alpha: Tensor | float

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        _check_last_dim(self.vector, x, self, site, "vector")
        unit = _unit(self.vector.to(device=x.device, dtype=x.dtype))
        return x + _to_like(self.alpha, x) * unit

    def __repr__(self) -> str:
        return _call_repr("steer", (self.vector,), {"alpha": self.alpha})


def steer(vector: Tensor, alpha: Tensor | float) -> Steer:
    """Add ``alpha`` times the unit vector along ``vector`` (on the last dim).

    ``x + alpha * u`` with ``u = vector / |vector|``, so ``alpha`` is the length of the
    added component whatever the norm of ``vector``. To add a vector as it is, use
    ``add(vector)``. Laws: ``steer(v, a) >> steer(v, b)`` equals ``steer(v, a + b)``
    numerically; ``steer(v, 0.0)`` is the identity.

    Raises:
        EditError: (when applied) the vector's last dim differs from the activation's.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> steer(torch.tensor([0.0, 5.0]), 2.0)(torch.zeros(1, 2), site)
        tensor([[0., 2.]])
    """
    if not isinstance(vector, Tensor) or vector.dim() == 0:
        raise SpecError(
            f"steer(vector, alpha) takes a tensor with a last dimension, got {vector!r}."
        )
    return Steer(vector, alpha)
