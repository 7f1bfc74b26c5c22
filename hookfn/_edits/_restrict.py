"""Restricting an edit to part of the activation: `at`, `heads`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
from torch import Tensor

from .._errors import EditError, SpecError
from .._site import Site
from ._base import Edit, EditLike, Index, _frozen, _short_repr, _Value, as_edit
from ._checks import _along, _dim_size, _kind, _where
from ._parts import _part_site, _write

# -- restricting an edit to part of the tensor -----------------------------------------------


def _on_device(index: Any, device: torch.device) -> Any:
    if isinstance(index, Tensor):
        return index.to(device)
    if isinstance(index, tuple):
        return tuple(_on_device(i, device) for i in index)
    return index


def _full_index(
    index: Index | tuple[Any, ...], dim: int, x: Tensor, edit: Edit, site: Site
) -> tuple[Any, ...]:
    """The index expression ``at`` applies: see `at` for the rule."""
    if isinstance(index, tuple):
        return index
    if isinstance(index, Tensor) and index.dtype == torch.bool and index.dim() >= 2:
        return (index,)  # a token mask over the leading dims
    if isinstance(index, int) and not isinstance(index, bool):
        size = _dim_size(x, dim, edit, site)
        if not -size <= index < size:
            raise EditError(
                f"{_where(edit, site)}: index {index} is out of range for dimension {dim} of "
                f"the {_kind(site)} of shape {tuple(x.shape)}; pass an index in "
                f"[{-size}, {size - 1}]."
            )
        # Keep the dimension, so the inner edit sees the same rank; a slice is a view.
        index = slice(index, index + 1 if index != -1 else None)
    return _along(index, dim)


def _edit_part(
    x: Tensor,
    index: tuple[Any, ...],
    edit: Edit,
    site: Site,
    owner: Edit,
    whole: torch.Size,
    view: Callable[[Tensor], Tensor],
) -> Tensor:
    try:
        part = x[index]
    except (IndexError, RuntimeError, TypeError) as error:
        raise EditError(
            f"{_where(owner, site)}: the index {_short_repr(index)} does not fit the "
            f"{_kind(site)} of shape {tuple(x.shape)}: {error}."
        ) from None
    new = edit(part, _part_site(site, whole, view))
    if not isinstance(new, Tensor) or new.shape != part.shape:
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise EditError(
            f"{_where(owner, site)}: the inner edit {edit!r} was given the part of shape "
            f"{tuple(part.shape)} and returned {got}; it must keep the shape."
        )
    return _write(x, index, new)


@dataclass(frozen=True, slots=True, eq=False)
class At(_Value):
    """An edit restricted to ``x[index]`` (see `at`)."""

    index: Index | tuple[Any, ...]
    edit: Edit
    dim: int

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        index = _full_index(self.index, self.dim, x, self, site)
        if not isinstance(self.index, int):  # an int becomes slices: nothing to move
            index = _on_device(index, x.device)
        return _edit_part(x, index, self.edit, site, self, x.shape, lambda t: t[index])

    def __repr__(self) -> str:
        kwargs = {} if self.dim == 1 else {"dim": self.dim}
        index = _short_repr(self.index)
        extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        return f"at({index}, {self.edit!r}{extra})"


def at(index: Index | tuple[Any, ...], edit: EditLike, *, dim: int = 1) -> At:
    """Apply ``edit`` to ``x[index]`` only; the rest of the activation is unchanged.

    How ``index`` is read:

    - an int, a list, a slice or a 1-D tensor selects along ``dim``: positions (dim 1 of a
      ``[batch, seq, d]`` activation) by default. An int keeps its dimension
      (``x[:, i:i+1]``), so the inner edit sees a tensor of the same rank;
    - a bool tensor with 2 or more dims is a token mask over the leading dims
      (``[batch, seq]``): the inner edit sees the selected tokens, ``[n_selected, d]``;
    - a tuple is an index expression used as it is, ``x[index]``
      (e.g. ``(slice(None), slice(0, 4), 7)``).

    The inner edit gets the part and returns a tensor of the same shape, written back into a
    copy. An inner edit that reads a cache (`patch_from`, `mean_ablate`, `resample_ablate`)
    reads the same part of the cached tensor. ``edit.at(index)`` is the same as
    ``at(index, edit)``. Laws: ``at(i, a) >> at(i, b) == at(i, a >> b)`` numerically;
    ``at(i, identity())`` is the identity.

    Args:
        index: What to edit (see above).
        edit: The edit to apply there.
        dim: The dimension a non-tuple ``index`` selects along.

    Raises:
        EditError: (when applied) the index does not fit, or the inner edit changed the
            part's shape.

    Examples:
        >>> import torch
        >>> from hookfn import add, scale
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> at([0, 2], add(1.0))(torch.zeros(1, 3, 2), site)
        tensor([[[1., 1.],
                 [0., 0.],
                 [1., 1.]]])
        >>> mask = torch.tensor([[False, True, False]])
        >>> scale(0.0).at(mask)(torch.ones(1, 3, 2), site)
        tensor([[[1., 1.],
                 [0., 0.],
                 [1., 1.]]])
    """
    return At(_frozen(index), as_edit(edit, where="at(index, edit)"), dim)


@dataclass(frozen=True, slots=True, eq=False)
class Heads(_Value):
    """An edit of chosen attention heads (see `heads`)."""

    edit: Edit
    n_heads: int
    which: tuple[int, ...] | None

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        n = self.n_heads
        if x.dim() == 0 or x.shape[-1] % n:
            raise EditError(
                f"{_where(self, site)}: the {_kind(site)} has shape {tuple(x.shape)}, whose "
                f"last dimension does not split into {n} heads; use heads() where the last "
                "dim is the concatenation of the heads (e.g. the input of the attention "
                "output projection), with the model's number of heads."
            )
        if self.which is not None and not all(-n <= h < n for h in self.which):
            raise EditError(
                f"{_where(self, site)}: which={list(self.which)} names a head outside "
                f"[0, {n - 1}] ({n} heads)."
            )
        split = einops.rearrange(x, "... (h d) -> ... h d", h=n)
        part_site: Site
        if self.which is None:
            part_site = _part_site(site, x.shape, self._split)
            new = self.edit(split, part_site)
            if not isinstance(new, Tensor) or new.shape != split.shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise EditError(
                    f"{_where(self, site)}: the inner edit {self.edit!r} was given heads of "
                    f"shape {tuple(split.shape)} and returned {got}; it must keep the shape."
                )
        else:
            chosen = [h % n for h in self.which]
            # A run of consecutive heads is a slice: a view, cheaper than a gather.
            consecutive = chosen == list(range(chosen[0], chosen[0] + len(chosen)))
            selector = slice(chosen[0], chosen[0] + len(chosen)) if consecutive else chosen
            index = (Ellipsis, selector, slice(None))
            new = _edit_part(
                split, index, self.edit, site, self, x.shape, lambda t: self._split(t)[index]
            )
        return einops.rearrange(new, "... h d -> ... (h d)")

    def _split(self, t: Tensor) -> Tensor:
        return einops.rearrange(t, "... (h d) -> ... h d", h=self.n_heads)

    def __repr__(self) -> str:
        which = "" if self.which is None else f", which={list(self.which)!r}"
        return f"heads({self.edit!r}, n_heads={self.n_heads}{which})"


def heads(edit: EditLike, *, n_heads: int, which: int | Sequence[int] | None = None) -> Heads:
    """Apply ``edit`` to chosen attention heads of a ``[..., (heads d_head)]`` activation.

    The last dimension is split into heads (``"b s (h d) -> b s h d"``, with einops), the
    inner edit gets the chosen heads, ``[..., len(which), d_head]`` (all heads when ``which``
    is ``None``), and the result is merged back. Use it where the last dim is the
    concatenation of the heads: the input of an attention output projection (GPT-2:
    ``Hook(edit_input=...)`` at ``transformer.h.0.attn.c_proj``), or, in models with
    separate projections, the query / key / value projections' outputs. Inner edits that
    act on the last dim then act per head (``steer`` with a ``[d_head]`` vector);
    cache-reading edits read the same heads of the cached tensor.

    Args:
        edit: The edit to apply to the chosen heads.
        n_heads: The number of heads the last dimension is made of.
        which: A head index or a list of them; ``None`` for every head.

    Raises:
        EditError: (when applied) the last dim does not split into ``n_heads``, or a head
            index is out of range.

    Examples:
        >>> import torch
        >>> from hookfn import scale
        >>> site = Site("fc", call=0, kind="input", module=torch.nn.Identity())
        >>> heads(scale(0.0), n_heads=3, which=[1])(torch.ones(1, 1, 6), site)
        tensor([[[1., 1., 0., 0., 1., 1.]]])
    """
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise SpecError(f"heads(..., n_heads=...) takes a positive int, got {n_heads!r}.")
    chosen = None if which is None else (which,) if isinstance(which, int) else tuple(which)
    if chosen is not None and not chosen:
        raise SpecError("heads(..., which=[]) names no head; pass which=None for every head.")
    return Heads(as_edit(edit, where="heads(edit, ...)"), n_heads, chosen)
