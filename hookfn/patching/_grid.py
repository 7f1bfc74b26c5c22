"""What a sweep goes over: the axes (`each_position`, `each_head`, `each_index`), and the parts
of a site's activation they cut, as boolean masks.

A part is a mask that broadcasts against the activation ``[pair, *rest]``: each_position's
masks are ``[1, seq, 1, ...]``, each_head's ``[1, ..., d]``, a token mask's ``[pair, seq, 1,
...]``. A cell of the sweep is a (site, part): its patched run takes
``where(mask, source, activation)`` at that site. Masks, not indexing, because they work the
same on stacked rows, under vmap (a bool-mask index would be data-dependent) and in the
attribution sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor
from typing_extensions import TypeAlias

from hookfn import EditError, SpecError

__all__ = [
    "Axis",
    "Over",
    "PartContext",
    "Parts",
    "as_axes",
    "each_head",
    "each_index",
    "each_position",
    "parts_of",
]


@dataclass(frozen=True, slots=True)
class PartContext:
    """What an axis needs to know about one site to cut its activation into parts.

    Attributes:
        site: The layer name (for messages).
        shape: The activation's shape, ``[pair, *rest]``.
        seq: The length of the base prompts (positions are dim 1).
        mapped: ``[seq]`` bool: base positions that have a source position (see ``align``).
        position_labels: One label per base position.
        n_heads: The head count of the site's `Sites` or the model's config, or ``None``.
    """

    site: str
    shape: torch.Size
    seq: int | None
    mapped: Tensor | None
    position_labels: tuple[str, ...]
    n_heads: int | None


@dataclass(frozen=True, slots=True)
class Parts:
    """One axis's parts of one site: their labels and their masks, ``[n, *broadcastable]``."""

    name: str
    labels: tuple[str, ...]
    masks: Tensor


class Axis:
    """Base class of the axes a sweep goes over (`each_position`, `each_head`, `each_index`)."""

    __slots__ = ()
    name = "part"

    def parts(self, context: PartContext) -> Parts:
        raise NotImplementedError


def _unit(shape: torch.Size, dim: int, size: int) -> list[int]:
    view = [1] * len(shape)
    view[dim] = size
    return view


def _check_positions(context: PartContext, what: str) -> int:
    shape, seq = context.shape, context.seq
    if seq is None or len(shape) < 2 or shape[1] != seq:
        raise EditError(
            f"{what}: the activation at {context.site!r} has shape {tuple(shape)}, which has no "
            f"sequence axis at dim 1 (the prompts have {seq} positions); sweep over positions "
            "only at sites shaped [batch, seq, ...], or use each_index(..., dim=...)."
        )
    return seq


@dataclass(frozen=True, slots=True, repr=False)
class Positions(Axis):
    """Every position, or the positions ``which`` (see `each_position`)."""

    which: tuple[int, ...] | None
    name = "position"

    def __repr__(self) -> str:
        return "each_position()" if self.which is None else f"each_position({list(self.which)})"

    def parts(self, context: PartContext) -> Parts:
        seq = _check_positions(context, "each_position()")
        chosen = list(range(seq)) if self.which is None else [p % seq for p in self.which]
        if self.which is not None and not all(-seq <= p < seq for p in self.which):
            raise SpecError(
                f"each_position(which={list(self.which)}) names a position outside the "
                f"{seq} positions of the prompts."
            )
        if context.mapped is not None:
            # Base positions with no source position (prompts of other lengths) are left out.
            chosen = [p for p in chosen if bool(context.mapped[p])]
        masks = torch.zeros(len(chosen), *_unit(context.shape, 1, seq), dtype=torch.bool)
        for i, p in enumerate(chosen):
            masks[i, :, p] = True
        return Parts("position", tuple(context.position_labels[p] for p in chosen), masks)


def each_position(which: int | Sequence[int] | None = None) -> Positions:
    """Sweep over positions: one cell per position (dim 1 of a ``[batch, seq, ...]`` site).

    Args:
        which: Only these positions (negative ones count from the end); every one when
            ``None``. With prompts of different lengths, positions of the base prompt that
            have no source position (see ``align``) are left out.

    Examples:
        >>> each_position()
        each_position()
        >>> each_position([0, -1]).which
        (0, -1)
    """
    return Positions(_int_tuple(which, "each_position(which=...)"))


@dataclass(frozen=True, slots=True, repr=False)
class Heads(Axis):
    """Every head, or the heads ``which`` (see `each_head`)."""

    n_heads: int | None
    which: tuple[int, ...] | None
    name = "head"

    def __repr__(self) -> str:
        which = "" if self.which is None else f", which={list(self.which)}"
        return f"each_head(n_heads={self.n_heads}{which})"

    def parts(self, context: PartContext) -> Parts:
        n = self.n_heads or context.n_heads
        if n is None:
            raise SpecError(
                f"each_head(): the number of heads at {context.site!r} is unknown (the model "
                "has no config with n_head / num_attention_heads); pass each_head(n_heads=...) "
                "or Sites(..., n_heads=...)."
            )
        width = context.shape[-1] if len(context.shape) > 1 else 0
        if width == 0 or width % n:
            raise EditError(
                f"each_head(): the activation at {context.site!r} has shape "
                f"{tuple(context.shape)}, whose last dim {width} does not split into {n} heads; "
                "sweep heads where the last dim is the concatenation of the heads "
                "(head_out(model): the input of the attention output projection), or pass the "
                "right n_heads."
            )
        chosen = list(range(n)) if self.which is None else [h % n for h in self.which]
        if self.which is not None and not all(-n <= h < n for h in self.which):
            raise SpecError(f"each_head(which={list(self.which)}) names a head outside [0, {n}).")
        d_head = width // n
        masks = torch.zeros(len(chosen), *_unit(context.shape, -1, width), dtype=torch.bool)
        for i, h in enumerate(chosen):
            masks[i, ..., h * d_head : (h + 1) * d_head] = True
        return Parts("head", tuple(f"H{h}" for h in chosen), masks)


def each_head(n_heads: int | None = None, which: int | Sequence[int] | None = None) -> Heads:
    """Sweep over attention heads: one cell per head of a ``[..., (heads d_head)]`` site.

    Use it on sites whose last dim is the concatenation of the heads: `head_out` names them
    (GPT-2: the input of ``attn.c_proj``; Llama: the input of ``self_attn.o_proj``;
    TransformerLens: ``attn.hook_z``).

    Args:
        n_heads: The number of heads; from the `Sites` or the model's config when ``None``.
        which: Only these heads; every one when ``None``.

    Examples:
        >>> each_head(12, which=[0, 5])
        each_head(n_heads=12, which=[0, 5])
    """
    if n_heads is not None and (
        isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1
    ):
        raise SpecError(f"each_head(n_heads=...) takes a positive int, got {n_heads!r}.")
    return Heads(n_heads, _int_tuple(which, "each_head(which=...)"))


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Indices(Axis):
    """The user's index sets (see `each_index`)."""

    indices: tuple[Any, ...]
    dim: int
    labels: tuple[str, ...] | None
    name = "index"

    def __repr__(self) -> str:
        shown = ", ".join(self.labels or tuple(_label(i) for i in self.indices))
        return f"each_index([{shown}], dim={self.dim})"

    def parts(self, context: PartContext) -> Parts:
        shape = context.shape
        masks = []
        for index in self.indices:
            masks.append(self._mask(index, shape, context))
        bshape = torch.broadcast_shapes(*(m.shape for m in masks))  # type: ignore[no-untyped-call]
        stacked = torch.stack([m.expand(bshape) for m in masks])
        labels = self.labels or tuple(_label(index) for index in self.indices)
        return Parts("index", labels, stacked)

    def _mask(self, index: Any, shape: torch.Size, context: PartContext) -> Tensor:
        try:
            if isinstance(index, Tensor) and index.dtype == torch.bool and index.dim() >= 2:
                # A token mask over [pair, seq] (or [1, seq]).
                seq = _check_positions(context, "each_index(token mask)")
                if index.shape[-1] != seq or index.shape[0] not in (1, shape[0]):
                    raise EditError(
                        f"each_index(): the token mask of shape {tuple(index.shape)} does not "
                        f"fit {shape[0]} prompt pairs of {seq} positions; pass [pairs, seq] or "
                        "[1, seq] masks."
                    )
                return index.reshape(index.shape[0], seq, *[1] * (len(shape) - 2)).cpu()
            if isinstance(index, tuple):
                mask = torch.zeros(shape, dtype=torch.bool)
                mask[index] = True
                return mask
            dim = self.dim % len(shape)
            if dim == 0:
                raise SpecError("each_index(dim=0) would select prompt pairs; use dim >= 1.")
            line = torch.zeros(shape[dim], dtype=torch.bool)
            line[index] = True
            return line.view(_unit(shape, dim, shape[dim]))
        except (IndexError, RuntimeError, TypeError) as error:
            raise EditError(
                f"each_index(): the index {_label(index)} does not fit the activation at "
                f"{context.site!r} of shape {tuple(shape)}: {error}."
            ) from None


def each_index(
    indices: Sequence[Any], *, dim: int = -1, labels: Sequence[str] | None = None
) -> Indices:
    """Sweep over index sets of your own: one cell per entry of ``indices``.

    Each entry is read as ``at`` reads an index, along ``dim`` (features, the last dim, by
    default): an int, a list of ints, a slice or a 1-D tensor; a bool tensor ``[pairs, seq]``
    (or ``[1, seq]``) is a token mask; a tuple is an index expression over the whole
    ``[pair, *rest]`` activation.

    Args:
        indices: The index sets.
        dim: The dim the non-tuple, non-mask entries select along.
        labels: A label per entry (default: the entries' reprs).

    Examples:
        >>> each_index([[0, 1], [2, 3]], labels=["low", "high"]).labels
        ('low', 'high')
    """
    items = tuple(indices) if not isinstance(indices, Tensor) else tuple(indices.unbind(0))
    if not items:
        raise SpecError("each_index(indices=[]) names no index set; give at least one.")
    if labels is not None and len(labels) != len(items):
        raise SpecError(
            f"each_index(labels=...) has {len(labels)} labels for {len(items)} index sets."
        )
    return Indices(items, dim, None if labels is None else tuple(str(x) for x in labels))


def _int_tuple(value: int | Sequence[int] | None, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, int) else tuple(value)
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise SpecError(f"{where} takes an int or a non-empty list of ints, got {value!r}.")
    return items


def _label(index: object) -> str:
    if isinstance(index, Tensor):
        return f"mask{tuple(index.shape)}" if index.dtype == torch.bool else str(index.tolist())
    if isinstance(index, slice):
        return f"{index.start or ''}:{index.stop or ''}"
    return repr(index)


Over: TypeAlias = Union[Axis, Sequence[Axis], None]
"""What a sweep goes over: an axis, several (their product), or ``None`` (whole sites)."""


def as_axes(over: object) -> tuple[Axis, ...]:
    """The axes of ``over=``, checked."""
    if over is None:
        return ()
    axes = (
        (over,) if isinstance(over, Axis) else tuple(over) if isinstance(over, Sequence) else None
    )
    if axes is None or not all(isinstance(a, Axis) for a in axes):
        raise SpecError(
            f"over= takes None (whole sites), an axis (each_position(), each_head(), "
            f"each_index(...)) or a tuple of them (their product), got {over!r}."
        )
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise SpecError(f"over= names the axis {names} twice; give each axis once.")
    return axes


def parts_of(axes: tuple[Axis, ...], context: PartContext) -> tuple[list[Parts], Tensor]:
    """Each axis's parts of one site, and the masks of their product, ``[cells, ...]``.

    Cells are in row-major order of the axes. With no axis there is one cell: the whole site
    (its mapped positions, when the prompts have different lengths).
    """
    rank = len(context.shape)
    whole = torch.ones([1] * rank, dtype=torch.bool)
    if context.mapped is not None:
        _check_positions(context, "align=")
        whole = context.mapped.view(_unit(context.shape, 1, context.mapped.numel()))
    each = [axis.parts(context) for axis in axes]
    masks = whole[None]
    for parts in each:
        masks = (masks[:, None] & parts.masks[None]).flatten(0, 1)
    return each, masks
