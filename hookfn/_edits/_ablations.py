"""Ablations: `ablate`, `mean_ablate`, `resample_ablate`."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import EditError
from .._site import Site
from ._base import Cache, Edit, Index, _call_repr, _frozen, _Value
from ._cache import _cached
from ._checks import _broadcasts, _dim_size, _kind, _replace_features, _where
from ._parts import _through_views, _whole_shape

# -- ablations -------------------------------------------------------------------------------


def _index_kwargs(idx: Index, dim: int) -> tuple[list[object], dict[str, object]]:
    args: list[object] = [] if idx is None else [idx]
    kwargs: dict[str, object] = {} if dim == -1 else {"dim": dim}
    return args, kwargs


@dataclass(frozen=True, slots=True, eq=False)
class Ablate(_Value):
    """Zero the entries ``idx`` along ``dim`` (see `ablate`)."""

    idx: Index
    dim: int

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        return _replace_features(x, 0.0, self.idx, self.dim, self, site)

    def __repr__(self) -> str:
        return _call_repr("ablate", *_index_kwargs(self.idx, self.dim))


def ablate(idx: Index = None, dim: int = -1) -> Ablate:
    """Zero-ablate entries ``idx`` along ``dim`` (by default: features of the last dim).

    ``ablate(17)`` zeroes feature 17; ``ablate([3, 5])``, ``ablate(slice(0, 8))`` or a bool
    mask select several; ``ablate()`` zeroes everything. Entries that are NaN or infinite
    become zero too. Laws: idempotent (``ablate(i) >> ablate(i) == ablate(i)`` as
    functions); ablations of different entries commute.

    Args:
        idx: An int, a list of ints, a slice, a bool mask (list or tensor) of the dim's
            length, a long tensor, or ``None`` for all entries.
        dim: The dimension ``idx`` indexes; ``-1`` (features) by default.

    Raises:
        EditError: (when applied) ``dim`` or ``idx`` does not fit the activation's shape.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> ablate(1)(torch.ones(2, 3), site)
        tensor([[1., 0., 1.],
                [1., 0., 1.]])
        >>> ablate([0], dim=0)(torch.ones(2, 3), site)
        tensor([[0., 0., 0.],
                [1., 1., 1.]])
    """
    return Ablate(_frozen(idx), dim)


def _over(over: int | Sequence[int]) -> tuple[int, ...]:
    return (over,) if isinstance(over, int) else tuple(over)


@dataclass(frozen=True, slots=True, eq=False)
class MeanAblate(_Value):
    """Replace entries ``idx`` along ``dim`` by a mean (see `mean_ablate`)."""

    idx: Index
    dim: int
    cache: Cache | None
    over: tuple[int, ...]

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        if self.cache is None:
            source = x
        else:
            source = _cached(self.cache, site, self).to(device=x.device, dtype=x.dtype)
        for d in self.over:
            _dim_size(source, d, self, site)
        mean = source.mean(dim=self.over, keepdim=True)
        if self.cache is not None:
            whole = _whole_shape(site, x)
            _check_mean_fits(mean, whole, source, self, site)
            mean = _through_views(site, mean.expand(whole))
        return _replace_features(x, mean, self.idx, self.dim, self, site)

    def __repr__(self) -> str:
        args, kwargs = _index_kwargs(self.idx, self.dim)
        if self.cache is not None:
            kwargs["cache"] = self.cache
        if self.over != (0,):
            kwargs["over"] = self.over[0] if len(self.over) == 1 else self.over
        return _call_repr("mean_ablate", args, kwargs)


def _check_mean_fits(
    mean: Tensor, whole: torch.Size, source: Tensor, edit: Edit, site: Site
) -> None:
    if not _broadcasts(mean.shape, whole):
        raise EditError(
            f"{_where(edit, site)}: the cached {_kind(site)} has shape {tuple(source.shape)}, "
            f"its mean has shape {tuple(mean.shape)}, which does not broadcast to the "
            f"{_kind(site)} of shape {tuple(whole)}; the dimensions that are not averaged "
            "(over=...) must match (e.g. the same sequence length)."
        )


def mean_ablate(
    idx: Index = None,
    dim: int = -1,
    *,
    cache: Cache | None = None,
    over: int | Sequence[int] = 0,
) -> MeanAblate:
    """Replace entries ``idx`` along ``dim`` by their mean over the batch (or a cache).

    Without ``cache`` the mean is taken over dimension ``over`` (the batch, dim 0) of the
    activation itself. With ``cache`` (the ``{layer: Capture}`` dict of an earlier run, for
    instance over a reference dataset) it is the mean of the tensor recorded at the same
    layer (and call), broadcast back to the activation's shape; pass ``over=(0, 1)`` to
    average over positions too. Laws: idempotent when ``dim`` is not one of the dimensions
    averaged over (the default: features replaced by their batch mean).

    Args:
        idx: Which entries along ``dim`` to replace (see `ablate`); ``None``: all.
        dim: The dimension ``idx`` indexes; ``-1`` by default.
        cache: Take the mean from this cache instead of from the activation.
        over: The dimension(s) averaged over.

    Raises:
        EditError: (when applied) the cache lacks the layer, or shapes do not fit.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> mean_ablate()(torch.tensor([[0.0, 2.0], [2.0, 4.0]]), site)
        tensor([[1., 3.],
                [1., 3.]])
    """
    return MeanAblate(_frozen(idx), dim, cache, _over(over))


@dataclass(frozen=True, slots=True, eq=False)
class ResampleAblate(_Value):
    """Replace entries ``idx`` along ``dim`` by those of other inputs (see
    `resample_ablate`)."""

    idx: Index
    dim: int
    cache: Cache | None
    perm: tuple[int, ...] | None
    seed: int

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        if self.cache is None:
            source = x
            whole = x.shape
        else:
            source = _cached(self.cache, site, self).to(device=x.device, dtype=x.dtype)
            whole = _whole_shape(site, x)
        if source.dim() == 0 or len(whole) == 0:
            raise EditError(
                f"{_where(edit=self, site=site)}: resampling picks rows of dimension 0 (the "
                f"batch), but the {_kind(site)} is a scalar."
            )
        rows = self._rows(int(source.shape[0]), int(whole[0]), site)
        picked = source if rows is None else source.index_select(0, rows.to(source.device))
        if self.cache is not None:
            if picked.shape != whole:
                raise EditError(
                    f"{_where(self, site)}: the cached {_kind(site)} has shape "
                    f"{tuple(source.shape)}, and the rows picked from it have shape "
                    f"{tuple(picked.shape)}, but the {_kind(site)} has shape {tuple(whole)}; "
                    "apart from the batch the shapes must match; pass perm=[...] with one "
                    "cached row per row of the batch."
                )
            picked = _through_views(site, picked)
        return _replace_features(x, picked, self.idx, self.dim, self, site)

    def _rows(self, n_source: int, n_rows: int, site: Site) -> Tensor | None:
        if self.perm is not None:
            if len(self.perm) != n_rows or not all(-n_source <= p < n_source for p in self.perm):
                raise EditError(
                    f"{_where(self, site)}: perm has {len(self.perm)} entries in "
                    f"[{min(self.perm, default=0)}, {max(self.perm, default=0)}], but it "
                    f"needs one per row of the batch ({n_rows}), each in [0, {n_source - 1}] "
                    f"(the rows of the source)."
                )
            return torch.tensor(self.perm, dtype=torch.long)
        if self.cache is not None:
            return None  # row i from the other run's row i
        if n_source < 2:
            raise EditError(
                f"{_where(self, site)}: resampling from the same batch needs at least 2 "
                f"inputs, but the batch has {n_source}; pass cache= (another run's "
                "captures) to resample from other inputs."
            )
        return _derangement(n_source, self.seed)

    def __repr__(self) -> str:
        args, kwargs = _index_kwargs(self.idx, self.dim)
        if self.cache is not None:
            kwargs["cache"] = self.cache
        if self.perm is not None:
            kwargs["perm"] = list(self.perm)
        elif self.cache is None:
            kwargs["seed"] = self.seed
        return _call_repr("resample_ablate", args, kwargs)


def _derangement(n: int, seed: int) -> Tensor:
    """A random permutation of ``range(n)`` without fixed points (one ``n``-cycle).

    Drawn with Python's `random`, not torch's generator: the same seed gives the same rows
    everywhere, and it runs under ``torch.func.vmap`` (which rejects torch random ops).
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    rows = [0] * n
    for i, row in enumerate(order):
        rows[row] = order[(i + 1) % n]
    return torch.tensor(rows, dtype=torch.long)


def resample_ablate(
    idx: Index = None,
    dim: int = -1,
    *,
    cache: Cache | None = None,
    perm: Sequence[int] | Tensor | None = None,
    seed: int = 0,
) -> ResampleAblate:
    """Replace entries ``idx`` along ``dim`` by the values another input produced.

    Row ``i`` of the batch (dimension 0) takes its values from row ``perm[i]`` of the
    source: the activation itself, or, with ``cache``, the tensor recorded at the same
    layer (and call) in another run. Without ``perm``: from the activation itself, a random
    permutation without fixed points drawn from ``seed`` (every input gets another input's
    values; the same seed gives the same permutation); from a cache, row ``i`` of the cached
    run (the same shape is then required).

    Args:
        idx: Which entries along ``dim`` to replace (see `ablate`); ``None``: all.
        dim: The dimension ``idx`` indexes; ``-1`` by default.
        cache: Resample from this ``{layer: Capture}`` dict of another run.
        perm: For each row of the batch, the source row it takes its values from.
        seed: The seed of the random permutation used when ``perm`` is not given.

    Raises:
        EditError: (when applied) the cache lacks the layer, shapes do not fit, ``perm`` has
            the wrong length or range, or a batch of one has no other input to draw from.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
        >>> resample_ablate(1, perm=[2, 0, 1])(x, site)
        tensor([[0., 5.],
                [2., 1.],
                [4., 3.]])
    """
    if isinstance(perm, Tensor):
        perm = perm.tolist()
    rows = None if perm is None else tuple(int(p) for p in perm)
    return ResampleAblate(_frozen(idx), dim, cache, rows, seed)
