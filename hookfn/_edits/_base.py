"""The edit protocol: `Edit`, plain callables (`Function`, `as_edit`), composition (`Chain`,
`chain`, `identity`), and the value semantics (equality, hashing, repr) every edit shares."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FunctionType
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor
from typing_extensions import TypeAlias

from .._capture import Args, Capture
from .._errors import SpecError
from .._site import Site

if TYPE_CHECKING:
    from ._restrict import At

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
            >>> from hookfn import add
        >>> add(1.0).at([0, 2])
            at([0, 2], add(1.0))
        """
        from ._restrict import at

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
        >>> from hookfn import add
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
