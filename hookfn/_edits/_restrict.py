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
from ._arguments import int_like, is_bool, is_integer_dtype
from ._base import Edit, EditLike, Index, ValueEdit, as_edit, short_repr
from ._checks import dim_size
from ._index import along_dim, index_at, make_selector
from ._parts import part_site, write_part
from ._result import check_result


def _on_device(index: Any, device: torch.device) -> Any:
    if isinstance(index, Tensor):
        return index.to(device)
    if isinstance(index, tuple):
        return tuple(_on_device(i, device) for i in index)
    return index


def _positions(x: Tensor, index: Index, dim: int) -> tuple[Any, ...]:
    """The index expression of a one-dimension `at` index (see `at` for the rule)."""
    if isinstance(index, int):
        size = dim_size(x, dim)
        if not -size <= index < size:
            raise EditError(
                f"index {index} is out of range for dimension {dim} of the activation of "
                f"shape {tuple(x.shape)}; pass an index in [{-size}, {size - 1}]."
            )
        # Keep the dimension, so the inner edit sees the same rank; a slice is a view.
        return along_dim(slice(index, index + 1 if index != -1 else None), dim)
    selector = make_selector(x, index, dim)
    if isinstance(index, list) and index and type(index[0]) is not bool:
        size = x.shape[dim]
        if len({i % size for i in index}) != len(index):
            raise EditError(
                f"the positions {index} name a position of dimension {dim} (size {size}) "
                "twice; at() edits each selected entry once: pass distinct positions."
            )
    return along_dim(selector, dim)


def _edit_part(
    x: Tensor,
    index: tuple[Any, ...],
    edit: Edit,
    site: Site,
    whole: torch.Size,
    view: Callable[[Tensor], Tensor],
) -> Tensor:
    """``x`` with ``edit`` applied to ``x[index]``: ``x`` itself when the part is unchanged,
    else a new tensor."""
    try:
        part = x[index]
    except (IndexError, RuntimeError, TypeError) as error:
        raise EditError(
            f"the index {short_repr(index)} does not fit the activation of shape "
            f"{tuple(x.shape)}: {error}."
        ) from None
    new = edit(part, part_site(site, whole, view))
    if new is part:
        return x
    new = _checked_part(part, new, edit, "a part")
    return x if new is part else write_part(x, index, new)


def _checked_part(part: Tensor, new: object, edit: Edit, what: str) -> Tensor:
    try:
        return check_result(part, new)
    except EditError as error:
        raise EditError(
            f"the inner edit {edit!r} was given {what} of shape {tuple(part.shape)}: {error}"
        ) from None


@dataclass(frozen=True, slots=True, eq=False)
class At(ValueEdit):
    """An edit restricted to ``x[index]`` (see `at`)."""

    index: Index | tuple[Any, ...]
    edit: Edit
    dim: int | None

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        index = self.index
        full: tuple[Any, ...]
        if index is None:
            full = (Ellipsis,)
        elif isinstance(index, tuple):
            full = _on_device(index, x.device)
        elif isinstance(index, Tensor) and index.dim() >= 2:
            full = (index.to(x.device),)  # a token mask over the leading dims
        else:
            assert self.dim is not None
            full = _positions(x, index, self.dim)
        return _edit_part(x, full, self.edit, site, x.shape, lambda t: t[full])

    def __repr__(self) -> str:
        extra = "" if self.dim in (None, 1) else f", dim={self.dim!r}"
        return f"at({short_repr(self.index)}, {self.edit!r}{extra})"


def at(index: Index | tuple[Any, ...], edit: EditLike, *, dim: int | None = None) -> At:
    """Apply ``edit`` to ``x[index]`` only; the rest of the activation is unchanged.

    How ``index`` is read (each form has one meaning):

    - ``None``: everything (the inner edit sees all of ``x``);
    - an int (a numpy integer, a 0-d integer tensor): one position along ``dim``, keeping
      its dimension (``x[:, i:i+1]``), so the inner edit sees a tensor of the same rank;
    - a list or 1-D tensor of ints, a range, a slice: distinct positions along ``dim``;
    - a list of bools or a 1-D bool tensor: a mask along ``dim``, of its length;
    - a bool tensor with 2 or more dims: a token mask over the leading dims
      (``[batch, seq]``): the inner edit sees the selected tokens, ``[n_selected, d]``;
    - a tuple: an index expression used as it is, ``x[index]`` (an int in it drops its
      dimension, as in torch; ``None`` in it is refused).

    ``dim`` (default 1: positions of a ``[batch, seq, d]`` activation) applies to the
    one-dimension forms; giving it with a token mask or a tuple is a `SpecError`. Refused
    too: ``True``/``False``, a uint8 tensor, an integer tensor of 2 or more dims (use a token
    mask or an index expression), a slice with a negative step.

    The inner edit gets the part and returns a tensor of the same shape, checked by
    `check_result` (an int, bool or complex result for a float part is an `EditError`, a
    float of another precision is cast), and written back into a copy; if it returns the
    part unchanged, ``x`` itself is returned. An inner edit that reads a cache
    (`patch_from`, `mean_ablate`, `resample_ablate`) reads the same part of the cached
    tensor. ``edit.at(index)`` is the same as ``at(index, edit)``. Laws:
    ``at(i, a) >> at(i, b) == at(i, a >> b)`` numerically; ``at(i, identity())`` is the
    identity.

    Args:
        index: What to edit (see above).
        edit: The edit to apply there.
        dim: The dimension a one-dimension ``index`` selects along (1 when not given).

    Raises:
        SpecError: ``index`` or ``dim`` is not one of the forms above.
        EditError: (when applied) the index does not fit, names a position twice, or the
            inner edit's result cannot stand in for the part.

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
    canonical, canonical_dim = index_at(index, dim, "at(index, ...)")
    return At(canonical, as_edit(edit, where="at(index, edit)"), canonical_dim)


@dataclass(frozen=True, slots=True, eq=False)
class Heads(ValueEdit):
    """An edit of chosen attention heads (see `heads`)."""

    edit: Edit
    n_heads: int
    which: tuple[int, ...] | None

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        n = self.n_heads
        if x.dim() == 0 or x.shape[-1] % n:
            raise EditError(
                f"the activation has shape {tuple(x.shape)}, whose last dimension does not "
                f"split into {n} heads; use heads() where the last dim is the concatenation "
                "of the heads (e.g. the input of the attention output projection), with the "
                "model's number of heads."
            )
        split = self._split(x)
        if self.which is None:
            new = self.edit(split, part_site(site, x.shape, self._split))
            if new is split:
                return x
            new = _checked_part(split, new, self.edit, "heads")
            if new is split:
                return x
        else:
            chosen = self.which
            # A run of consecutive heads is a slice: a view, cheaper than a gather.
            consecutive = chosen == tuple(range(chosen[0], chosen[0] + len(chosen)))
            selector = slice(chosen[0], chosen[0] + len(chosen)) if consecutive else list(chosen)
            index = (Ellipsis, selector, slice(None))
            new = _edit_part(
                split, index, self.edit, site, x.shape, lambda t: self._split(t)[index]
            )
            if new is split:
                return x
        return einops.rearrange(new, "... h d -> ... (h d)")

    def _split(self, t: Tensor) -> Tensor:
        return einops.rearrange(t, "... (h d) -> ... h d", h=self.n_heads)

    def __repr__(self) -> str:
        which = "" if self.which is None else f", which={list(self.which)!r}"
        return f"heads({self.edit!r}, n_heads={self.n_heads}{which})"


def _which_arg(which: object, n_heads: int) -> tuple[int, ...] | None:
    """``which`` as distinct head indices in ``[0, n_heads)`` (negative ones counted from
    the end), checked when the edit is built."""
    if which is None:
        return None
    single = int_like(which)
    if single is not None:
        items: list[object] = [single]
    elif isinstance(which, Tensor) and which.dim() == 1 and is_integer_dtype(which.dtype):
        items = list(which.tolist())
    elif isinstance(which, (list, tuple, range)):
        items = list(which)
    else:
        raise SpecError(
            f"heads(..., which=...) takes a head index or a list of them, got {which!r}."
        )
    if not items:
        raise SpecError("heads(..., which=[]) names no head; pass which=None for every head.")
    chosen: list[int] = []
    for item in items:
        head = None if is_bool(item) else int_like(item)
        if head is None:
            raise SpecError(f"heads(..., which=...): {item!r} is not a head index (an int).")
        if not -n_heads <= head < n_heads:
            raise SpecError(
                f"heads(..., which={short_repr(which)}) names head {head}, outside "
                f"[0, {n_heads - 1}] ({n_heads} heads)."
            )
        if head % n_heads in chosen:
            raise SpecError(
                f"heads(..., which={short_repr(which)}) names head {head % n_heads} twice "
                f"({n_heads} heads); name each head once."
            )
        chosen.append(head % n_heads)
    return tuple(chosen)


def heads(edit: EditLike, *, n_heads: int, which: int | Sequence[int] | None = None) -> Heads:
    """Apply ``edit`` to chosen attention heads of a ``[..., (heads d_head)]`` activation.

    The last dimension is split into heads (``"b s (h d) -> b s h d"``, with einops), the
    inner edit gets the chosen heads, ``[..., len(which), d_head]`` (all heads when ``which``
    is ``None``), and the result is merged back. Use it where the last dim is the
    concatenation of the heads: the input of an attention output projection (GPT-2:
    ``Hook(edit_input=...)`` at ``transformer.h.0.attn.c_proj``), or, in models with
    separate projections, the query / key / value projections' outputs. Inner edits that
    act on the last dim then act per head (``steer`` with a ``[d_head]`` vector);
    cache-reading edits read the same heads of the cached tensor. The inner edit's result is
    checked as in `at`.

    Args:
        edit: The edit to apply to the chosen heads.
        n_heads: The number of heads the last dimension is made of.
        which: A head index or a list of distinct ones (negative ones count from the end,
            numpy integers are taken); ``None`` for every head. Stored as indices in
            ``[0, n_heads)``, so ``which=[-1]`` equals ``which=[n_heads - 1]``.

    Raises:
        SpecError: ``n_heads`` is not a positive int, or ``which`` names no head, a head
            out of range, a head twice, or holds something that is not an int.
        EditError: (when applied) the last dim does not split into ``n_heads``.

    Examples:
        >>> import torch
        >>> from hookfn import scale
        >>> site = Site("fc", call=0, kind="input", module=torch.nn.Identity())
        >>> heads(scale(0.0), n_heads=3, which=[1])(torch.ones(1, 1, 6), site)
        tensor([[[1., 1., 0., 0., 1., 1.]]])
    """
    count = None if is_bool(n_heads) else int_like(n_heads)
    if count is None or count < 1:
        raise SpecError(f"heads(..., n_heads=...) takes a positive int, got {n_heads!r}.")
    return Heads(as_edit(edit, where="heads(edit, ...)"), count, _which_arg(which, count))
