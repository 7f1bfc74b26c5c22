"""What a hook records, copied: the copy of tensors, and of the structures that hold them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._capture import Args
from ._errors import EditError

__all__ = ["PLAIN_COPY", "Omitted", "copy_value", "make_copier", "replace_primary"]


@dataclass(frozen=True, slots=True)
class Omitted:
    """Stands in a capture for an object that cannot be copied faithfully.

    A default capture copies and detaches every tensor of an output or input. An object
    that is neither a tensor, a plain value, nor a container torch can take apart (a
    transformers ``DynamicCache``, a user's own class) would be stored by reference: it could
    change after the run and keep the autograd graph alive. It is left out instead, and this
    placeholder names its type. Capture with ``Hook(clone=False)`` to keep such objects by
    reference (tensors are then references too).

    Examples:
        >>> Omitted("DynamicCache")
        Omitted('DynamicCache')
    """

    type_name: str

    def __repr__(self) -> str:
        return f"Omitted({self.type_name!r})"


_ATOMS = frozenset(
    {bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size}
)


def make_copier(
    detach: bool, clone: bool, device: torch.device | None, dtype: torch.dtype | None
) -> Callable[[Tensor], Tensor]:
    """The copy a hook applies to each tensor it records; made once per combination."""
    return _copier(detach, clone, device, dtype)


@functools.lru_cache(maxsize=64)
def _copier(
    detach: bool, clone: bool, device: torch.device | None, dtype: torch.dtype | None
) -> Callable[[Tensor], Tensor]:
    def copy(t: Tensor) -> Tensor:
        if detach:
            t = t.detach()
        if device is not None or (dtype is not None and t.is_floating_point()):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None, copy=clone)
        return t.clone() if clone else t

    return copy


PLAIN_COPY = make_copier(True, True, None, None)


def copy_value(copy: Callable[[Tensor], Tensor], value: Any, keep_objects: bool) -> Any:
    """``value`` with ``copy`` applied to every tensor in it.

    Plain tuples, lists and dicts (an attention module's ``(out, None)``, a pre-hook's
    arguments) are walked here; other containers torch knows (named tuples, ``ModelOutput``)
    by `torch.utils._pytree`. An object of any other kind becomes `Omitted`, unless
    ``keep_objects`` (a capture of references, ``clone=False``).
    """
    kind = type(value)
    if kind is Tensor or isinstance(value, Tensor):
        return copy(value)
    if kind is tuple:
        return tuple([copy_value(copy, item, keep_objects) for item in value])
    if kind is list:
        return [copy_value(copy, item, keep_objects) for item in value]
    if kind is dict:
        return {key: copy_value(copy, item, keep_objects) for key, item in value.items()}
    if kind in _ATOMS or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, Args):
        return Args(
            *copy_value(copy, value.args, keep_objects),
            **copy_value(copy, value.kwargs, keep_objects),
        )
    leaves, spec = pytree.tree_flatten(value)
    if len(leaves) == 1 and leaves[0] is value:  # not a container torch can take apart
        return value if keep_objects else Omitted(type(value).__name__)
    return pytree.tree_unflatten([copy_value(copy, leaf, keep_objects) for leaf in leaves], spec)


def replace_primary(value: Any, new: Tensor) -> Any:
    """``value`` with its primary tensor (see `primary`) replaced by ``new``.

    Raises:
        EditError: ``value`` has no primary tensor to replace.
    """
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        if hasattr(value, "_replace") and hasattr(value, "_fields"):  # a named tuple
            return value._replace(**{value._fields[0]: new})
        items = (new, *value[1:])
        if type(value) is not tuple:
            # A tuple subclass such as torch.return_types.max keeps its type (and .values).
            try:
                return type(value)(items)
            except TypeError:
                pass
        return items
    if isinstance(value, list):
        return [new, *value[1:]]
    if isinstance(value, Args):
        if value.args:
            return Args(replace_primary(value.args[0], new), *value.args[1:], **value.kwargs)
        first = next(iter(value.kwargs))
        return Args(**{**value.kwargs, first: replace_primary(value.kwargs[first], new)})
    if isinstance(value, Mapping):
        first = next(iter(value))
        try:
            return type(value)(**{**value, first: new})
        except TypeError:
            rebuilt = dict(value)
            rebuilt[first] = new
            return rebuilt
    raise EditError(f"cannot replace the primary tensor of a {type(value).__name__}")
