"""Edits: small immutable values that map an activation to a new one.

An edit is called as ``edit(x, site)`` and returns a new tensor of the same shape; it never
mutates ``x``. Edits compose left to right with ``>>``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor
from typing_extensions import TypeAlias

from ._errors import SpecError
from ._site import Site

__all__ = [
    "Chain",
    "Edit",
    "EditLike",
    "Function",
    "add",
    "as_edit",
    "chain",
    "identity",
]


class Edit:
    """Base class of all edits.

    Subclasses are frozen dataclasses that implement `__call__(x, site)`. Equality and repr
    come from the dataclass, so a spec that holds edits can be printed and compared.
    """

    __slots__ = ()

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        raise NotImplementedError

    def __rshift__(self, other: EditLike) -> Chain:
        return chain(self, other)

    def __rrshift__(self, other: EditLike) -> Chain:
        return chain(other, self)


EditLike: TypeAlias = Union[Edit, Callable[..., Any]]
"""An `Edit`, or a plain callable ``f(x)`` or ``f(x, site)`` returning a tensor or ``None``."""


@dataclass(frozen=True, slots=True, eq=False)
class Function(Edit):
    """A plain callable adapted to the edit protocol (`as_edit` builds it).

    ``takes_site`` is decided once, from the callable's signature: a callable with one
    positional parameter is called as ``fn(x)``, one with two as ``fn(x, site)``. A ``None``
    result means "unchanged".
    """

    fn: Callable[..., Any]
    takes_site: bool

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        y = self.fn(x, site) if self.takes_site else self.fn(x)
        return x if y is None else y  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Function) and other.fn is self.fn

    def __hash__(self) -> int:
        return hash(self.fn)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"Function({name})"


def _positional_arity(fn: Callable[..., Any]) -> int | None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return 2
        if parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
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
    arity = _positional_arity(fn)
    if arity == 0:
        raise SpecError(
            f"{where}: the callable {fn!r} takes no positional argument; an edit is called "
            "as f(x) or f(x, site)."
        )
    return Function(fn, takes_site=arity is not None and arity >= 2)


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


def _to_like(value: Tensor | float, x: Tensor) -> Tensor | float:
    if isinstance(value, Tensor) and (value.device != x.device or value.dtype != x.dtype):
        return value.to(device=x.device, dtype=x.dtype)
    return value


@dataclass(frozen=True, slots=True)
class Add(Edit):
    """``x + value`` (see `add`)."""

    value: Tensor | float

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        return x + _to_like(self.value, x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Add) and _values_equal(self.value, other.value)

    def __hash__(self) -> int:
        return hash(("add", id(self.value) if isinstance(self.value, Tensor) else self.value))

    def __repr__(self) -> str:
        return f"add({_short_repr(self.value)})"


def add(value: Tensor | float) -> Add:
    """Add a scalar or a tensor (broadcast) to the activation.

    A tensor is moved to the activation's device and dtype. Laws:
    ``add(a) >> add(b)`` equals ``add(a + b)`` numerically.

    Args:
        value: A number, or a tensor that broadcasts against the activation.

    Examples:
        >>> import torch
        >>> site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
        >>> add(1.0)(torch.zeros(2), site)
        tensor([1., 1.])
    """
    return Add(value)


def _values_equal(a: object, b: object) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


def _short_repr(value: object) -> str:
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return f"tensor({value.item():g})"
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return repr(value)
