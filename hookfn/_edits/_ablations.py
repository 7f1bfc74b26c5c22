"""Ablations: `ablate`, `mean_ablate`, `resample_ablate`."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import EditError, SpecError
from .._site import Site
from ._arguments import cache_arg, dim_arg, int_like, is_integer_dtype
from ._base import Cache, Index, ValueEdit, call_repr
from ._cache import cached_part
from ._checks import like_x, needs_float
from ._index import index_along, index_kwargs, replace_features
from ._parts import through_views, whole_shape


@dataclass(frozen=True, slots=True, eq=False)
class Ablate(ValueEdit):
    """Zero the entries ``idx`` along ``dim`` (see `ablate`)."""

    idx: Index
    dim: int

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        return replace_features(x, 0, self.idx, self.dim)

    def __repr__(self) -> str:
        return call_repr("ablate", *index_kwargs(self.idx, self.dim))


def ablate(idx: Index = None, dim: int = -1) -> Ablate:
    """Zero-ablate entries ``idx`` along ``dim`` (by default: features of the last dim).

    ``ablate(17)`` zeroes feature 17; ``ablate([3, 5])``, ``ablate(slice(0, 8))`` or a bool
    mask select several; ``ablate()`` zeroes everything. Entries that are NaN or infinite
    become zero too. Laws: idempotent (``ablate(i) >> ablate(i) == ablate(i)`` as
    functions); ablations of different entries commute.

    Args:
        idx: An int, a list of ints, a slice (positive step), a bool mask (list or 1-D
            tensor) of the dim's length, a 1-D integer tensor, or ``None`` for all entries.
            ``True``/``False``, floats, a uint8 tensor or a tensor of 2 or more dims are
            refused.
        dim: The dimension ``idx`` indexes; ``-1`` (features) by default.

    Raises:
        SpecError: ``idx`` or ``dim`` is not one of the forms above.
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
    return Ablate(index_along(idx, "ablate(idx)"), dim_arg(dim, "ablate(..., dim=...)"))


def _over_arg(over: object) -> tuple[int, ...]:
    single = int_like(over)
    items = [single] if single is not None else over
    if not isinstance(items, (list, tuple, range)):
        raise SpecError(f"mean_ablate(over=...) takes a dim or a list of dims, got {over!r}.")
    dims = tuple(dim_arg(d, "mean_ablate(over=...)") for d in items)
    if not dims:
        raise SpecError(
            f"mean_ablate(over={over!r}) averages over no dimension (torch would read that "
            "as every dimension); pass over=0 for the batch, or over=(0, 1) for the batch "
            "and positions."
        )
    if len(set(dims)) != len(dims):
        raise SpecError(f"mean_ablate(over={over!r}) names a dimension twice; name each once.")
    return dims


def _over_dims(source: Tensor, over: tuple[int, ...], what: str) -> tuple[int, ...]:
    """``over`` as distinct dims in ``[0, source.dim())``."""
    n = source.dim()
    dims = []
    for d in over:
        if not -n <= d < n:
            raise EditError(
                f"dim={d} (in over=...) is out of range for the {what} of shape "
                f"{tuple(source.shape)} ({n} dimensions); pass dims in [{-n}, {n - 1}]."
            )
        dims.append(d % n)
    if len(set(dims)) != len(dims):
        raise EditError(
            f"over={over} names a dimension of the {what} ({n} dimensions) twice; name each once."
        )
    if any(source.shape[d] == 0 for d in dims):
        raise EditError(
            f"the {what} has shape {tuple(source.shape)}: the mean over over={over} is of "
            "no entries."
        )
    return tuple(dims)


@dataclass(frozen=True, slots=True, eq=False)
class MeanAblate(ValueEdit):
    """Replace entries ``idx`` along ``dim`` by a mean (see `mean_ablate`)."""

    idx: Index
    dim: int
    cache: Cache | None
    over: tuple[int, ...]

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        if not (x.is_floating_point() or x.is_complex()):
            needs_float(x, "mean_ablate", "use ablate or resample_ablate on it (token ids?)")
        if self.cache is None:
            mean = x.mean(dim=_over_dims(x, self.over, "activation"), keepdim=True)
        else:
            source = cached_part(self.cache, site)
            dims = _over_dims(source, self.over, "cached activation")
            whole = whole_shape(site, x)
            if source.dim() != len(whole) or any(
                source.shape[d] != whole[d] for d in range(len(whole)) if d not in dims
            ):
                raise EditError(
                    f"the cached activation has shape {tuple(source.shape)}, and its mean over "
                    f"dims {list(dims)} does not fit the activation of shape {tuple(whole)}: "
                    "the ranks must be equal and the dimensions not averaged over (over=...) "
                    "must match (e.g. the same sequence length)."
                )
            # The mean in the cache's own precision, then converted.
            mean = source.mean(dim=dims, keepdim=True)
            mean = like_x(through_views(site, mean.expand(whole)), x, "cached activation")
        return replace_features(x, mean, self.idx, self.dim)

    def __repr__(self) -> str:
        args, kwargs = index_kwargs(self.idx, self.dim)
        if self.cache is not None:
            kwargs["cache"] = self.cache
        if self.over != (0,):
            kwargs["over"] = self.over[0] if len(self.over) == 1 else self.over
        return call_repr("mean_ablate", args, kwargs)


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
    layer (and call), broadcast back to the activation's shape: the cached tensor has the
    activation's rank, and its dims not averaged over match the activation's. Pass
    ``over=(0, 1)`` to average over positions too. Laws: idempotent when ``dim`` is not one
    of the dimensions averaged over (the default: features replaced by their batch mean).

    Args:
        idx: Which entries along ``dim`` to replace (see `ablate`); ``None``: all.
        dim: The dimension ``idx`` indexes; ``-1`` by default.
        cache: Take the mean from this cache instead of from the activation (a dict copied
            when the edit is built).
        over: The dimension(s) averaged over: at least one, each once.

    Raises:
        SpecError: ``idx``, ``dim``, ``cache`` or ``over`` is not of an accepted form
            (``over=()`` and ``over=(0, 0)`` included).
        EditError: (when applied) the activation is not floating-point, the cache lacks the
            layer, or the shapes do not fit (``over=(0, -2)`` naming one dim twice included).

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> mean_ablate()(torch.tensor([[0.0, 2.0], [2.0, 4.0]]), site)
        tensor([[1., 3.],
                [1., 3.]])
    """
    return MeanAblate(
        index_along(idx, "mean_ablate(idx)"),
        dim_arg(dim, "mean_ablate(..., dim=...)"),
        None if cache is None else cache_arg(cache, "mean_ablate(cache=...)"),
        _over_arg(over),
    )


@dataclass(frozen=True, slots=True, eq=False)
class ResampleAblate(ValueEdit):
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
            source = like_x(cached_part(self.cache, site), x, "cached activation")
            whole = whole_shape(site, x)
        if source.dim() == 0 or len(whole) == 0:
            raise EditError(
                "resampling picks rows of dimension 0 (the batch), but the activation is a scalar."
            )
        rows = self._rows(int(source.shape[0]), int(whole[0]))
        picked = source if rows is None else source.index_select(0, rows.to(source.device))
        if self.cache is not None:
            if picked.shape != whole:
                raise EditError(
                    f"the cached activation has shape {tuple(source.shape)}, and the rows "
                    f"picked from it have shape {tuple(picked.shape)}, but the activation has "
                    f"shape {tuple(whole)}; apart from the batch the shapes must match; pass "
                    "perm=[...] with one cached row per row of the batch."
                )
            picked = through_views(site, picked)
        return replace_features(x, picked, self.idx, self.dim)

    def _rows(self, n_source: int, n_rows: int) -> Tensor | None:
        if self.perm is not None:
            if len(self.perm) != n_rows or max(self.perm) >= n_source:
                raise EditError(
                    f"perm has {len(self.perm)} entries in [{min(self.perm)}, "
                    f"{max(self.perm)}], but it needs one per row of the batch ({n_rows}), "
                    f"each in [0, {n_source - 1}] (the rows of the source)."
                )
            return torch.tensor(self.perm, dtype=torch.long)
        if self.cache is not None:
            return None  # row i from the other run's row i
        if n_source < 2:
            raise EditError(
                f"resampling from the same batch needs at least 2 inputs, but the batch has "
                f"{n_source}; pass cache= (another run's captures) to resample from other "
                "inputs."
            )
        return torch.tensor(_derangement(n_source, self.seed), dtype=torch.long)

    def __repr__(self) -> str:
        args, kwargs = index_kwargs(self.idx, self.dim)
        if self.cache is not None:
            kwargs["cache"] = self.cache
        if self.perm is not None:
            kwargs["perm"] = list(self.perm)
        elif self.cache is None:
            kwargs["seed"] = self.seed
        return call_repr("resample_ablate", args, kwargs)


@functools.lru_cache(maxsize=256)
def _derangement(n: int, seed: int) -> tuple[int, ...]:
    """A permutation of ``range(n)`` without fixed points, uniform among all of them.

    Uniform permutations (`random.Random.shuffle`, a Fisher-Yates shuffle) are drawn until
    one has no fixed point: about e ≈ 2.7 draws on average. Python's `random`, not torch's
    generator: the same seed gives the same rows everywhere, and it runs under
    ``torch.func.vmap`` (which rejects torch random ops).
    """
    rng = random.Random(seed)
    rows = list(range(n))
    while True:
        rng.shuffle(rows)
        if all(row != i for i, row in enumerate(rows)):
            return tuple(rows)


def _perm_arg(perm: object) -> tuple[int, ...]:
    what = "resample_ablate(perm=...)"
    if isinstance(perm, Tensor):
        if perm.dim() != 1 or not is_integer_dtype(perm.dtype):
            raise SpecError(
                f"{what} takes a 1-D integer tensor or a list of row indices, got a tensor of "
                f"shape {tuple(perm.shape)} and dtype {perm.dtype}."
            )
        items: list[object] = list(perm.tolist())
    elif isinstance(perm, (list, tuple, range)):
        items = list(perm)
    else:
        raise SpecError(f"{what} takes a list of row indices, got {type(perm).__name__}.")
    if not items:
        raise SpecError(f"{what}: an empty perm names no row; pass one row per row of the batch.")
    rows = []
    for item in items:
        row = int_like(item)
        if row is None or row < 0:
            raise SpecError(
                f"{what}: {item!r} is not a row index; pass ints in [0, n), n the number of "
                "rows of the source (the batch, or the cached run's batch)."
            )
        rows.append(row)
    return tuple(rows)


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
    layer (and call) in another run. Without ``perm``: from the activation itself, a
    permutation without fixed points (a derangement: every input gets another input's
    values) drawn uniformly among all of them from ``seed``, the same rows for the same seed
    and batch size; from a cache, row ``i`` of the cached run (the same shape is then
    required).

    Args:
        idx: Which entries along ``dim`` to replace (see `ablate`); ``None``: all.
        dim: The dimension ``idx`` indexes; ``-1`` by default.
        cache: Resample from this ``{layer: Capture}`` dict of another run (copied when the
            edit is built).
        perm: For each row of the batch, the source row it takes its values from: ints
            ``>= 0`` (a list or a 1-D integer tensor).
        seed: A non-negative int, the seed of the permutation drawn without ``perm`` and
            ``cache`` (with either, no permutation is drawn and a seed is refused).

    Raises:
        SpecError: an argument is not of an accepted form (``perm=[1.7, ...]``,
            ``perm=[-1, ...]``, ``seed=None``, ``seed=1.5``, a seed with ``perm``).
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
    rows = None if perm is None else _perm_arg(perm)
    seed_value = int_like(seed)
    if seed_value is None or seed_value < 0:
        raise SpecError(
            f"resample_ablate(seed=...) takes a non-negative int (the same seed draws the same "
            f"rows), got {seed!r}."
        )
    if seed_value != 0 and (rows is not None or cache is not None):
        raise SpecError(
            "resample_ablate(seed=...) seeds the rows drawn when neither perm= nor cache= is "
            "given; with either, no rows are drawn: drop seed=."
        )
    return ResampleAblate(
        index_along(idx, "resample_ablate(idx)"),
        dim_arg(dim, "resample_ablate(..., dim=...)"),
        None if cache is None else cache_arg(cache, "resample_ablate(cache=...)"),
        rows,
        seed_value,
    )
