"""The edit protocol: `Edit`, plain callables (`Function`, `as_edit`), composition (`Chain`,
`chain`, `identity`), and the value semantics (equality, hashing, repr) every edit shares."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FunctionType
from typing import TYPE_CHECKING, Any, ClassVar, Union

import torch
from torch import Tensor
from typing_extensions import TypeAlias

from .._capture import Args, Capture
from .._errors import EditError, SpecError
from .._site import Site

if TYPE_CHECKING:
    from ._restrict import At

Index: TypeAlias = Union[int, slice, Sequence[Any], Tensor, None]
"""What selects along one dimension: an int, a slice, a list of ints (positions) or of bools
(a mask), a 1-D tensor (integer positions or a bool mask), or ``None`` for everything. `at`
also takes a tuple (an index expression over several dimensions, as in ``x[index]``) and a
bool tensor of 2 or more dims (a token mask). docs/edits.md lists each form's one meaning."""

Cache: TypeAlias = Mapping[str, Capture]
"""The ``{layer: Capture}`` dict that `run_with_hooks` returns."""


class Edit:
    """Base class of all edits.

    Subclasses are frozen dataclasses that implement `__call__(x, site)`, which returns ``x``
    itself (meaning "unchanged") or a new tensor that shares no memory with anything else.
    Equality and repr come from the dataclass (or are written out), so a spec that holds
    edits can be printed and compared.
    """

    __slots__ = ()

    # True where the edit's result is always a tensor of x's shape, dtype and device: the
    # hook path then skips `check_result` (every other edit's result is checked).
    result_checked: ClassVar[bool] = False
    # True for an edit of a module's output that reads its input too (a transcoder splice):
    # the hook path then calls ``edit.from_input(input, x, site)`` instead.
    reads_input: ClassVar[bool] = False

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        raise NotImplementedError

    def __rshift__(self, other: EditLike) -> Chain:
        return chain(self, other)

    def __rrshift__(self, other: EditLike) -> Chain:
        return chain(other, self)

    def at(self, index: Index | tuple[Any, ...], *, dim: int | None = None) -> At:
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


def _fresh_refcount() -> int:
    # The reference count of a result nothing else holds, seen the way `Function.__call__`
    # sees its result (a local variable passed to sys.getrefcount).
    y = torch.empty(0)
    return sys.getrefcount(y)


_FRESH = _fresh_refcount()
_getrefcount = sys.getrefcount


@dataclass(frozen=True, slots=True, eq=False)
class Function(Edit):
    """A plain callable adapted to the edit protocol (`as_edit` builds it).

    How it is called is decided once, from the callable's signature: as ``fn(x, site)`` when
    its second positional parameter is required or is named ``site`` or ``layer``, otherwise
    as ``fn(x)`` (``def f(h, negate=False)`` is called ``f(h)``). A callable whose signature
    cannot be read (a builtin such as ``torch.roll``) is called as ``fn(x)``; a `TypeError`
    from that call becomes an `EditError` that says so.

    A ``None`` result, or ``x`` itself, means "unchanged". A result that aliases memory
    something else owns is copied before it goes into the model (which may write into it in
    place): a view (``x[..., :4]``, ``v.expand_as(x)``), a tensor that shares ``x``'s memory
    (``x.detach()``), a leaf that requires grad (a `Parameter`), or a tensor that something
    else still references (a global, a cache). A callable that changes ``x`` in place is an
    `EditError`. A `Function` pickles when its callable does: a function defined at module
    level does, a ``lambda`` or a nested function does not.
    """

    fn: Callable[..., Any]
    takes_site: bool
    signature_known: bool = True

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        try:
            version = x._version
        except RuntimeError:  # an inference tensor keeps no version counter
            version = -1
        if self.takes_site:
            y = self.fn(x, site)
        elif self.signature_known:
            y = self.fn(x)
        else:
            y = self._call_unread(x)
        if version >= 0 and x._version != version:
            raise EditError(
                f"{self!r} changed its input in place; an edit returns a new tensor and never "
                "writes into x: use out-of-place ops (x * 0, not x.mul_(0); "
                "x.clone() first if you must write)."
            )
        if y is None or y is x:
            return x
        if isinstance(y, Tensor):
            # What the model may write into must be the result's alone: a view, a leaf that
            # requires grad (a Parameter) or a tensor referenced elsewhere is copied.
            if _getrefcount(y) > _FRESH or y._base is not None or (y.requires_grad and y.is_leaf):
                return y.clone()
            try:
                if y.data_ptr() == x.data_ptr():  # x.detach(), x.data
                    return y.clone()
            except RuntimeError:  # wrapped by torch.func: no storage of its own to compare
                pass
        return y  # type: ignore[no-any-return]

    def _call_unread(self, x: Tensor) -> Any:
        try:
            return self.fn(x)
        except TypeError as error:
            name = _name_of(self.fn)
            raise EditError(
                f"{name} has no signature hookfn can read, so it is called as f(x), which "
                f"raised TypeError: {error}. Pass the other arguments yourself, e.g. "
                f"lambda x: {name}(x, ...)."
            ) from error

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Function):
            return NotImplemented
        return other.fn is self.fn

    def __hash__(self) -> int:
        return hash(self.fn)

    def __repr__(self) -> str:
        return f"Function({_name_of(self.fn)})"


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


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


_SITE_NAMES = frozenset({"site", "layer"})


def _takes_site(parameters: list[_Parameter]) -> bool | None:
    """Whether a callable with these parameters is called as ``f(x, site)`` (True) or
    ``f(x)`` (False); None when it takes no positional argument at all."""
    positional = [(name, required) for kind, name, required in parameters if kind == "positional"]
    if not positional:
        return False if any(kind == "var" for kind, _, _ in parameters) else None
    if len(positional) < 2:
        return False
    name, required = positional[1]
    return required or name in _SITE_NAMES


def as_edit(fn: EditLike, *, where: str = "edit") -> Edit:
    """Adapt an edit-like value to an `Edit`, once, at plan time.

    A callable is called as ``f(x, site)`` when its second positional parameter is required
    or named ``site`` / ``layer``, and as ``f(x)`` otherwise (see `Function`).

    Args:
        fn: An `Edit`, or a callable ``f(x)`` / ``f(x, site)``.
        where: Where the value came from, for the error message.

    Raises:
        SpecError: ``fn`` is not callable, takes no positional argument, or needs arguments
            that an edit call does not pass.

    Examples:
        >>> import torch
        >>> edit = as_edit(lambda x: x * 2)
        >>> edit(torch.ones(2), Site("fc", call=0, kind="output", module=torch.nn.Identity()))
        tensor([2., 2.])
        >>> def shift(h, by=1.0):  # an optional second parameter: called as shift(h)
        ...     return h + by
        >>> as_edit(shift).takes_site
        False
    """
    if isinstance(fn, Edit):
        return fn
    if not callable(fn):
        raise SpecError(
            f"{where}: expected an edit (a hookfn edit such as add(1.0), or a callable "
            f"f(x) / f(x, site)), got {type(fn).__name__}."
        )
    parameters = _parameters(fn)
    if parameters is None:
        return Function(fn, takes_site=False, signature_known=False)
    takes_site = _takes_site(parameters)
    if takes_site is None:
        raise SpecError(
            f"{where}: the callable {fn!r} takes no positional argument; an edit is called "
            "as f(x) or f(x, site)."
        )
    unfilled = _unfilled_parameters(parameters, 2 if takes_site else 1)
    if unfilled:
        raise SpecError(
            f"{where}: the callable {fn!r} needs the argument(s) {', '.join(unfilled)}, which "
            "an edit call f(x) / f(x, site) does not pass; give them defaults or bind them "
            "first (functools.partial)."
        )
    return Function(fn, takes_site=takes_site)


def _unfilled_parameters(parameters: list[_Parameter], passed: int) -> list[str]:
    """Required parameters that a call with ``passed`` positional arguments misses."""
    missing = []
    position = 0
    for kind, name, required in parameters:
        if kind == "positional":
            position += 1
            if position > passed and required:
                missing.append(name)
        elif kind == "keyword" and required:
            missing.append(name)
    return missing


@dataclass(frozen=True, slots=True, eq=False)
class Chain(Edit):
    """Edits applied left to right: ``Chain((a, b))(x) == b(a(x))``.

    A chain of one edit equals that edit (with the same hash), and the empty chain is
    `identity`: so ``identity() >> a == a`` and ``{a, chain(a)}`` has one element.
    """

    edits: tuple[Edit, ...]

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        for edit in self.edits:
            x = edit(x, site)
        return x

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Chain):
            return self.edits == other.edits
        if len(self.edits) == 1 and isinstance(other, Edit):
            return self.edits[0] == other
        return NotImplemented

    def __hash__(self) -> int:
        if len(self.edits) == 1:
            return hash(self.edits[0])
        return hash(("chain", self.edits))

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
        >>> identity() >> add(1.0) == add(1.0) == add(1.0) >> identity()
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

    It returns ``x`` itself, which every consumer of an edit reads as "unchanged" (nothing is
    copied).

    Examples:
        >>> import torch
        >>> x = torch.randn(3)
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> identity()(x, site) is x
        True
    """
    return Chain(())


# -- values: equality, hashing and repr of edit arguments ---------------------------------


def _tensors_equal(a: Tensor, b: Tensor) -> bool:
    """Equal shape, dtype and values, NaN equal to NaN (so an edit equals its pickled copy)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    if torch.equal(a, b):
        return True
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if not a.is_floating_point():
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _is_nan(value: object) -> bool:
    return isinstance(value, (float, complex)) and value != value


def _values_equal(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and _tensors_equal(a, b)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b  # True is not the index 1
    if _is_nan(a) or _is_nan(b):
        return _is_nan(a) and _is_nan(b) and type(a) is type(b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return len(a) == len(b) and all(k in b and _values_equal(a[k], b[k]) for k in a)
    if isinstance(a, Capture) and isinstance(b, Capture):
        return all(
            _values_equal(getattr(a, field), getattr(b, field))
            for field in ("name", "raw_outputs", "raw_inputs", "grad_outputs", "grad_inputs")
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
    if isinstance(value, bool):
        return ("bool", value)
    if _is_nan(value):
        return ("nan", type(value).__name__)  # hash(nan) is its id: a pickled copy differs
    if isinstance(value, Mapping):
        return ("mapping", frozenset(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hash_key(v) for v in value))
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    return value


def _tensor_repr(value: Tensor) -> str:
    dtype = "" if value.dtype == torch.float32 else f", dtype={value.dtype}"
    if value.dim() <= 1 and value.numel() == 1:
        try:
            number = f"{value.item():g}"
        except RuntimeError:  # a tensor wrapped by torch.func: no value to show
            pass
        else:
            return f"tensor({number}{dtype})" if value.dim() == 0 else f"tensor([{number}]{dtype})"
    return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"


def short_repr(value: object) -> str:
    if isinstance(value, Tensor):
        return _tensor_repr(value)
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
            "(" + ", ".join(short_repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        )
    if isinstance(value, list):
        return "[" + ", ".join(short_repr(v) for v in value) + "]"
    if value is Ellipsis:
        return "..."
    return repr(value)


def call_repr(name: str, args: Sequence[object], kwargs: Mapping[str, object] = {}) -> str:
    parts = [short_repr(a) for a in args]
    parts += [f"{k}={short_repr(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


class ValueEdit(Edit):
    """Field-wise equality (tensors and caches by value, NaN equal to NaN, ``True`` unequal
    to ``1``) and a matching hash."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented  # a one-edit Chain compares itself
        return all(
            _values_equal(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )

    def __hash__(self) -> int:
        keys = tuple(_hash_key(getattr(self, f.name)) for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return hash((type(self).__name__, keys))
