"""Edits: small immutable values that map an activation to a new one.

An edit is called as ``edit(x, site)`` and returns a new tensor of the same shape; it never
mutates ``x``. Edits are built by factories (`add`, `scale`, `ablate`, `patch_from`, ...),
compose left to right with ``>>``, compare equal when built from equal arguments, print as
the expression that built them, and pickle (except plain lambdas, which Python cannot
pickle).

Restricting an edit to part of the tensor (`at`, `Edit.at`, `heads`) hands the inner edit
that part; an edit that reads a cache (`patch_from`, `mean_ablate`, `resample_ablate`) then
reads the same part of the cached tensor.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import operator
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FunctionType
from typing import Any, Union

import einops
import torch
from torch import Tensor
from typing_extensions import TypeAlias

from ._capture import Args, Capture, primary
from ._errors import EditError, SpecError
from ._site import Site

__all__ = [
    "Ablate",
    "Add",
    "At",
    "Chain",
    "Clamp",
    "Edit",
    "EditLike",
    "Function",
    "Heads",
    "Index",
    "MeanAblate",
    "PatchFrom",
    "ProjectOut",
    "Replace",
    "ResampleAblate",
    "Scale",
    "Steer",
    "ablate",
    "add",
    "as_edit",
    "at",
    "chain",
    "clamp",
    "heads",
    "identity",
    "mean_ablate",
    "patch_from",
    "project_out",
    "replace",
    "resample_ablate",
    "scale",
    "steer",
]

Index: TypeAlias = Union[int, slice, Sequence[Any], Tensor, None]
"""What selects along one dimension: an int, a slice, a list of ints or bools, a tensor
(long indices or a bool mask), or ``None`` for everything. `at` also takes a tuple: an index
expression over several dimensions, as in ``x[index]``."""

Cache: TypeAlias = Mapping[str, Capture]
"""The ``{layer: Capture}`` dict that `run_with_hooks` returns."""


class Edit:
    """Base class of all edits.

    Subclasses are frozen dataclasses that implement `__call__(x, site)`. Equality and repr
    come from the dataclass (or are written out), so a spec that holds edits can be printed
    and compared.
    """

    __slots__ = ()

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        raise NotImplementedError

    def __rshift__(self, other: EditLike) -> Chain:
        return chain(self, other)

    def __rrshift__(self, other: EditLike) -> Chain:
        return chain(other, self)

    def at(self, index: Index | tuple[Any, ...], *, dim: int = 1) -> At:
        """This edit, restricted to ``x[index]``; the same as ``at(index, self, dim=dim)``.

        Examples:
            >>> add(1.0).at([0, 2])
            at([0, 2], add(1.0))
        """
        return at(index, self, dim=dim)


EditLike: TypeAlias = Union[Edit, Callable[..., Any]]
"""An `Edit`, or a plain callable ``f(x)`` or ``f(x, site)`` returning a tensor or ``None``."""


@dataclass(frozen=True, slots=True, eq=False)
class Function(Edit):
    """A plain callable adapted to the edit protocol (`as_edit` builds it).

    ``takes_site`` is decided once, from the callable's signature: a callable with one
    positional parameter is called as ``fn(x)``, one with two as ``fn(x, site)``. A ``None``
    result means "unchanged". A `Function` pickles when its callable does: a function
    defined at module level does, a ``lambda`` or a nested function does not.
    """

    fn: Callable[..., Any]
    takes_site: bool

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        y = self.fn(x, site) if self.takes_site else self.fn(x)
        return x if y is None else y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Function) and other.fn is self.fn

    def __hash__(self) -> int:
        return hash(self.fn)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"Function({name})"


# A parameter as the checks below need it: (kind, name, required), kind one of "positional"
# (positional-only or positional-or-keyword), "var" (*args), "keyword" (keyword-only).
_Parameter = tuple[str, str, bool]


def _parameters(fn: Callable[..., Any]) -> list[_Parameter] | None:
    """The parameters of ``fn`` that matter to an edit call, or None where it has no
    signature. A plain function's are read off its code object: `inspect.signature` costs
    some 10 µs, paid by every run whose spec holds a lambda."""
    state = getattr(fn, "__dict__", {})
    if type(fn) is FunctionType and "__wrapped__" not in state and "__signature__" not in state:
        code = fn.__code__
        n = code.co_argcount  # positional-only included
        names = code.co_varnames
        first_default = n - len(fn.__defaults__ or ())
        found: list[_Parameter] = [("positional", names[i], i < first_default) for i in range(n)]
        if code.co_flags & inspect.CO_VARARGS:
            found.append(("var", "*", False))
        keyword_defaults = fn.__kwdefaults__ or {}
        for name in names[n : n + code.co_kwonlyargcount]:
            found.append(("keyword", name, name not in keyword_defaults))
        return found
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: "positional",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
        inspect.Parameter.VAR_POSITIONAL: "var",
        inspect.Parameter.KEYWORD_ONLY: "keyword",
    }
    return [
        ("var", "*", False)
        if p.kind is inspect.Parameter.VAR_POSITIONAL
        else (kinds[p.kind], p.name, p.default is inspect.Parameter.empty)
        for p in signature.parameters.values()
        if p.kind in kinds
    ]


def _positional_arity(parameters: list[_Parameter] | None) -> int | None:
    if parameters is None:
        return None
    count = 0
    for kind, _, _ in parameters:
        if kind == "var":
            return 2
        if kind == "positional":
            count += 1
    return count


def as_edit(fn: EditLike, *, where: str = "edit") -> Edit:
    """Adapt an edit-like value to an `Edit`, once, at plan time.

    Args:
        fn: An `Edit`, or a callable ``f(x)`` / ``f(x, site)``.
        where: Where the value came from, for the error message.

    Raises:
        SpecError: ``fn`` is not callable, or takes no positional argument.

    Examples:
        >>> import torch
        >>> edit = as_edit(lambda x: x * 2)
        >>> edit(torch.ones(2), Site("fc", call=0, kind="output", module=torch.nn.Identity()))
        tensor([2., 2.])
    """
    if isinstance(fn, Edit):
        return fn
    if not callable(fn):
        raise SpecError(
            f"{where}: expected an edit (a hookfn edit such as add(1.0), or a callable "
            f"f(x) / f(x, site)), got {type(fn).__name__}."
        )
    parameters = _parameters(fn)
    arity = _positional_arity(parameters)
    if arity == 0:
        raise SpecError(
            f"{where}: the callable {fn!r} takes no positional argument; an edit is called "
            "as f(x) or f(x, site)."
        )
    takes_site = arity is not None and arity >= 2
    unfilled = _unfilled_parameters(parameters, 2 if takes_site else 1)
    if unfilled:
        raise SpecError(
            f"{where}: the callable {fn!r} needs the argument(s) {', '.join(unfilled)}, which "
            "an edit call f(x) / f(x, site) does not pass; give them defaults or bind them "
            "first (functools.partial)."
        )
    return Function(fn, takes_site=takes_site)


def _unfilled_parameters(parameters: list[_Parameter] | None, passed: int) -> list[str]:
    """Required parameters that a call with ``passed`` positional arguments misses."""
    missing = []
    position = 0
    for kind, name, required in parameters or ():
        if kind == "positional":
            position += 1
            if position > passed and required:
                missing.append(name)
        elif kind == "keyword" and required:
            missing.append(name)
    return missing


@dataclass(frozen=True, slots=True)
class Chain(Edit):
    """Edits applied left to right: ``Chain((a, b))(x) == b(a(x))``."""

    edits: tuple[Edit, ...]

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        for edit in self.edits:
            x = edit(x, site)
        return x

    def __repr__(self) -> str:
        return " >> ".join(repr(edit) for edit in self.edits) if self.edits else "identity()"


def chain(*edits: EditLike) -> Chain:
    """Compose edits left to right; ``chain(a, b) == a >> b``.

    Nested chains are flattened and identities dropped, so ``>>`` is associative and
    ``identity()`` is neutral on both sides, as values and as functions.

    Examples:
        >>> chain(add(1.0), add(2.0)) == add(1.0) >> add(2.0)
        True
        >>> (add(1.0) >> identity()) == chain(add(1.0))
        True
    """
    flat: list[Edit] = []
    for item in edits:
        edit = as_edit(item)
        if isinstance(edit, Chain):
            flat.extend(edit.edits)
        else:
            flat.append(edit)
    return Chain(tuple(flat))


def identity() -> Chain:
    """The edit that changes nothing; neutral on both sides of ``>>``.

    Examples:
        >>> import torch
        >>> x = torch.randn(3)
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> torch.equal(identity()(x, site), x)
        True
    """
    return Chain(())


# -- values: equality, hashing and repr of edit arguments ---------------------------------


def _values_equal(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return len(a) == len(b) and all(k in b and _values_equal(a[k], b[k]) for k in a)
    if isinstance(a, Capture) and isinstance(b, Capture):
        return all(
            _values_equal(getattr(a, f.name), getattr(b, f.name))
            for f in dataclasses.fields(Capture)
        )
    if isinstance(a, Args) and isinstance(b, Args):
        return _values_equal(a.args, b.args) and _values_equal(dict(a.kwargs), dict(b.kwargs))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_values_equal(i, j) for i, j in zip(a, b, strict=True))
        )
    return bool(a == b)


def _hash_key(value: object) -> object:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, Mapping):
        return ("mapping", frozenset(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hash_key(v) for v in value))
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    return value


def _short_repr(value: object) -> str:
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return f"tensor({value.item():g})"
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, Mapping):
        names = list(value)
        shown = ", ".join(repr(n) for n in names[:2])
        more = f", +{len(names) - 2}" if len(names) > 2 else ""
        return f"<cache: {shown}{more}>" if names else "<empty cache>"
    if isinstance(value, slice):
        if value.step is not None:
            return f"slice({value.start!r}, {value.stop!r}, {value.step!r})"
        if value.start is None:
            return f"slice({value.stop!r})"
        return f"slice({value.start!r}, {value.stop!r})"
    if isinstance(value, tuple):
        return (
            "(" + ", ".join(_short_repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_short_repr(v) for v in value) + "]"
    if value is Ellipsis:
        return "..."
    return repr(value)


def _call_repr(name: str, args: Sequence[object], kwargs: Mapping[str, object] = {}) -> str:
    parts = [_short_repr(a) for a in args]
    parts += [f"{k}={_short_repr(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


class _Value(Edit):
    """Field-wise equality (tensors and caches by value) and a matching hash."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return False
        return all(
            _values_equal(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )

    def __hash__(self) -> int:
        keys = tuple(_hash_key(getattr(self, f.name)) for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return hash((type(self).__name__, keys))


def _frozen(value: Any) -> Any:
    """A private copy of a list argument, so that changing the caller's list later does not
    change the edit."""
    return list(value) if isinstance(value, list) else value


# -- shared checks ---------------------------------------------------------------------------


def _where(edit: Edit, site: Site) -> str:
    kind = getattr(site, "kind", "output")
    call = getattr(site, "call", 0)
    return f"{edit!r} at layer {str.__str__(site)!r} ({kind}, call {call})"


def _kind(site: Site) -> str:
    return str(getattr(site, "kind", "output"))


def _to_like(value: Tensor | float, x: Tensor) -> Tensor | float:
    if isinstance(value, Tensor) and (value.dtype is not x.dtype or value.device != x.device):
        return value.to(device=x.device, dtype=x.dtype)
    return value


def _broadcasts(shape: Sequence[int], target: Sequence[int]) -> bool:
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


def _check_broadcast(
    value: Tensor | float | None, x: Tensor, edit: Edit, site: Site, what: str
) -> None:
    if isinstance(value, Tensor) and not (
        value.shape == x.shape or _broadcasts(value.shape, x.shape)
    ):
        raise EditError(
            f"{_where(edit, site)}: the {what} has shape {tuple(value.shape)}, which does not "
            f"broadcast to the {_kind(site)} of shape {tuple(x.shape)}; pass a scalar or a "
            f"tensor that broadcasts to {tuple(x.shape)} (e.g. shape {tuple(x.shape[-1:])})."
        )


def _operand(value: Tensor | float, x: Tensor, edit: Edit, site: Site, what: str) -> Tensor | float:
    """``value`` checked to broadcast to ``x`` and moved to its device and dtype: what an
    elementwise edit combines with ``x`` (`_check_broadcast`, then `_to_like`, in one step)."""
    if not isinstance(value, Tensor):
        return value
    if value.shape != x.shape and not _broadcasts(value.shape, x.shape):
        _check_broadcast(value, x, edit, site, what)  # raises
    if value.dtype is not x.dtype or value.device != x.device:
        return value.to(device=x.device, dtype=x.dtype)
    return value


def _check_last_dim(vector: Tensor, x: Tensor, edit: Edit, site: Site, what: str) -> None:
    if vector.dim() == 0 or vector.shape[-1] != x.shape[-1] or x.dim() == 0:
        raise EditError(
            f"{_where(edit, site)}: the {what} has shape {tuple(vector.shape)}, but the "
            f"{_kind(site)} has shape {tuple(x.shape)}; it acts on the last dimension, so it "
            f"needs {x.shape[-1] if x.dim() else 'a'} entries there (shape "
            f"{tuple(x.shape[-1:])})."
        )
    _check_broadcast(vector, x, edit, site, what)


def _dim_size(x: Tensor, dim: int, edit: Edit, site: Site) -> int:
    if not -x.dim() <= dim < x.dim():
        raise EditError(
            f"{_where(edit, site)}: dim={dim} is out of range for the {_kind(site)} of shape "
            f"{tuple(x.shape)} ({x.dim()} dimensions); pass a dim in [{-x.dim()}, {x.dim() - 1}]."
        )
    return int(x.shape[dim])


def _selector(x: Tensor, idx: Index, dim: int, edit: Edit, site: Site) -> int | slice | Tensor:
    """``idx`` as an index along ``dim`` of ``x``, checked on the CPU.

    Lists, bool masks and tensors become a long tensor of positions on ``x``'s device:
    checking them on the CPU turns a bad index into an `EditError` (on a GPU it would be a
    device-side assert).
    """
    size = _dim_size(x, dim, edit, site)
    try:
        if isinstance(idx, slice):
            return idx
        if isinstance(idx, int):
            if not -size <= idx < size:
                raise IndexError(f"index {idx} is out of range")
            return idx
        if isinstance(idx, (list, tuple)):
            # A tuple lists indices along the one dim, as a list does (not an expression).
            if idx and all(isinstance(i, bool) for i in idx):
                if len(idx) != size:
                    raise IndexError(f"the bool mask has length {len(idx)}")
                positions = [i for i, keep in enumerate(idx) if keep]
            else:
                positions = [operator.index(i) for i in idx]
                if not all(-size <= i < size for i in positions):
                    raise IndexError(f"an index of {list(positions)} is out of range")
            return torch.tensor(positions, dtype=torch.long, device=x.device)
        mask = torch.zeros(size, dtype=torch.bool)
        mask[idx.cpu() if isinstance(idx, Tensor) else idx] = True
    except (IndexError, RuntimeError, TypeError) as error:
        raise EditError(
            f"{_where(edit, site)}: the index {_short_repr(idx)} does not fit dimension {dim} "
            f"of the {_kind(site)} of shape {tuple(x.shape)} (size {size}): {error}. Pass "
            f"indices in [{-size}, {size - 1}] or a bool mask of length {size}."
        ) from None
    return mask.nonzero().squeeze(1).to(x.device)


def _along(selector: Any, dim: int) -> tuple[Any, ...]:
    if dim >= 0:
        return (*(slice(None),) * dim, selector)
    return (Ellipsis, selector, *(slice(None),) * (-dim - 1))


def _replace_features(
    x: Tensor, values: Tensor | float, idx: Index, dim: int, edit: Edit, site: Site
) -> Tensor:
    """``x`` with the entries that ``idx`` selects along ``dim`` taken from ``values``."""
    if idx is None:
        if isinstance(values, Tensor):
            return values.expand(x.shape).clone()
        return torch.full_like(x, values)
    index = _along(_selector(x, idx, dim, edit, site), dim)
    new = values.expand(x.shape)[index] if isinstance(values, Tensor) else values
    y = x.clone()
    try:
        y[index] = new
    except RuntimeError:
        # Under vmap, batched values cannot be written into an unbatched copy in place.
        return _write_out_of_place(x, index, new)
    return y


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


# -- patching from a cache -------------------------------------------------------------------


def _cached(cache: Cache, site: Site, edit: Edit) -> Tensor:
    """The tensor recorded at ``site`` (same layer, call and kind) in ``cache``."""
    name = str.__str__(site)
    kind = _kind(site)
    call = int(getattr(site, "call", 0))
    capture = cache.get(name)
    if capture is None:
        names = list(cache)
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (closest: {', '.join(map(repr, close))})" if close else ""
        raise EditError(
            f"{_where(edit, site)}: the cache has no layer {name!r}{hint}; it has "
            f"{len(names)} layer(s): {names[:6]}. Capture {name!r} in the run that made the "
            f"cache, e.g. run_with_hooks(model, clean_inputs, [{name!r}, ...])."
        )
    if not isinstance(capture, Capture):
        raise EditError(
            f"{_where(edit, site)}: cache[{name!r}] is a {type(capture).__name__}; a cache is "
            "the {layer: Capture} dict that run_with_hooks returns."
        )
    records: tuple[Any, ...]
    if kind == "output":
        records = capture.raw_outputs
    elif kind == "input":
        records = capture.raw_inputs
    elif kind == "grad_output":
        records = capture.grad_outputs
    else:
        records = capture.grad_inputs
    if call >= len(records):
        raise EditError(
            f"{_where(edit, site)}: the cache recorded {len(records)} {kind}(s) of layer "
            f"{name!r}, but this is call {call}. Record the {kind} in the run that made the "
            f"cache ({_HOW[kind]}), with the same calls of the module as this run."
        )
    tensor = primary(records[call])
    if tensor is None:
        raise EditError(
            f"{_where(edit, site)}: the cached {kind} of layer {name!r} (call {call}) has no "
            f"tensor ({type(records[call]).__name__}); {_HOW[kind]}."
        )
    return tensor


_HOW = {
    "output": "capture it: 'capture' or Hook(output=True)",
    "input": "capture it with Hook(input=True)",
    "grad_output": "capture it with Hook(grad=True) and backward=...",
    "grad_input": "capture it with Hook(grad_input=True) and backward=...",
}


def _whole_shape(site: Site, x: Tensor) -> torch.Size:
    """The shape of the whole activation at the layer (``x`` may be a part of it)."""
    whole: torch.Size | None = getattr(site, "_whole_shape", None)
    return x.shape if whole is None else whole


def _through_views(site: Site, tensor: Tensor) -> Tensor:
    """Take the same part of a whole-layer tensor as the edit was given (see `at`)."""
    for view in getattr(site, "_views", ()):
        tensor = view(tensor)
    return tensor


class _PartSite(Site):
    """A `Site` whose edit sees part of the activation (inside `at` or `heads`).

    ``_whole_shape`` is the layer's whole activation shape and ``_views`` the functions that
    take the part from a whole-layer tensor, so that cache-reading edits read the same part.
    """

    _whole_shape: torch.Size
    _views: tuple[Callable[[Tensor], Tensor], ...]


def _part_site(site: Site, whole: torch.Size, view: Callable[[Tensor], Tensor]) -> Site:
    part = _PartSite(
        str.__str__(site),
        call=getattr(site, "call", 0),
        kind=getattr(site, "kind", "output"),
        module=getattr(site, "module", None),  # type: ignore[arg-type]
    )
    # (Set past Site.__setattr__, which only guards the read-only fields.)
    object.__setattr__(part, "_whole_shape", getattr(site, "_whole_shape", whole))
    object.__setattr__(part, "_views", (*getattr(site, "_views", ()), view))
    return part


@dataclass(frozen=True, slots=True, eq=False)
class PatchFrom(_Value):
    """The activation recorded at the same layer and call in a cache (see `patch_from`)."""

    cache: Cache

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        source = _cached(self.cache, site, self)
        whole = _whole_shape(site, x)
        if source.shape != whole:
            raise EditError(
                f"{_where(self, site)}: the cached {_kind(site)} has shape "
                f"{tuple(source.shape)}, but this run's has shape {tuple(whole)}; patch "
                "from a run on inputs of the same shape (same batch size and sequence "
                "length)."
            )
        # The part the edit is given (inside `at`/`heads`), then a copy of it alone: the model
        # may change the patched tensor in place, never the cache.
        part = _through_views(site, source)
        if part.dtype is x.dtype and part.device == x.device:
            return part.clone()
        return part.to(device=x.device, dtype=x.dtype)  # converted: a copy

    def __repr__(self) -> str:
        return _call_repr("patch_from", (self.cache,))


def patch_from(cache: Cache) -> PatchFrom:
    """Replace the activation by the one recorded at the same layer in an earlier run.

    ``cache`` is the ``{layer: Capture}`` dict `run_with_hooks` returned; the recorded tensor
    is looked up by the site's layer name and call index (a module called several times is
    patched call by call), and by what is edited (output, input or gradient). Restrict the
    patch to positions, a token mask or heads by composition:
    ``patch_from(clean).at([3, 4])``, ``heads(patch_from(clean), n_heads=12, which=[5])``.
    Laws: patching a run from its own cache changes nothing; idempotent.

    Raises:
        EditError: (when applied) the cache lacks the layer or the call, or the recorded
            shape differs from the activation's; the message names the layer and shapes.

    Examples:
        >>> import torch
        >>> from hookfn import run_with_hooks
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> clean, corrupt = torch.randn(3, 4), torch.randn(3, 4)
        >>> clean_out, cache = run_with_hooks(model, clean, ["0"])
        >>> out, _ = run_with_hooks(model, corrupt, {"0": patch_from(cache)})
        >>> torch.allclose(out, clean_out)
        True
    """
    if not isinstance(cache, Mapping):
        raise SpecError(
            f"patch_from(cache) takes the {{layer: Capture}} dict of an earlier run, got "
            f"{type(cache).__name__}; use replace(tensor) to put in a tensor of your own."
        )
    return PatchFrom(cache)


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


def _write(x: Tensor, index: tuple[Any, ...], new: Tensor) -> Tensor:
    """A copy of ``x`` with ``x[index]`` replaced by ``new``."""
    y = x.clone()
    try:
        y[index] = new
    except RuntimeError:
        # Under vmap, a batched part cannot be written into an unbatched copy in place.
        return _write_out_of_place(x, index, new)
    return y


def _write_out_of_place(x: Tensor, index: tuple[Any, ...], new: Tensor | float) -> Tensor:
    """`_write` without in-place ops (slower: it builds an index of every entry)."""
    ids = torch.arange(x.numel(), device=x.device).view(x.shape)[index]
    values = new.expand(ids.shape) if isinstance(new, Tensor) else torch.full_like(ids, new)
    flat = x.reshape(-1).index_put((ids.reshape(-1),), values.reshape(-1).to(x.dtype))
    return flat.view(x.shape)


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
