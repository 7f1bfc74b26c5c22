"""The module-tree utilities of `hookfn.nethook` (baukit's names and signatures): names,
lookups, replacement, ``requires_grad``, copies of nested structures, and sub-sequences of
an ``nn.Sequential``."""

from __future__ import annotations

import contextlib
import copy
import difflib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ._errors import LayerNotFoundError, SpecError

__all__ = [
    "get_module",
    "get_parameter",
    "hierarchical_subsequence",
    "module_names",
    "not_found",
    "recursive_copy",
    "replace_module",
    "set_requires_grad",
    "subsequence",
]


# -- names ----------------------------------------------------------------------------


def module_names(model: nn.Module) -> list[str]:
    """The dotted name of every submodule of ``model`` (``""`` is ``model`` itself)."""
    return [name for name, _ in model.named_modules()]


def not_found(what: str, name: str, names: list[str]) -> LayerNotFoundError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(map(repr, close))}" if close else ""
    return LayerNotFoundError(
        f"the model has no {what} named {name!r}{hint}. "
        f"See model.named_{what.split()[0]}s() for every name."
    )


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule of ``model`` with the dotted name ``name``.

    Raises:
        LayerNotFoundError: (a ``LookupError``) no submodule has that name.
    """
    for candidate, module in model.named_modules():
        if candidate == name:
            found: nn.Module = module
            return found
    raise not_found("module", name, module_names(model))


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter of ``model`` with the dotted name ``name``.

    Raises:
        LayerNotFoundError: (a ``LookupError``) no parameter has that name.
    """
    for candidate, parameter in model.named_parameters():
        if candidate == name:
            return parameter
    raise not_found("parameter", name, [n for n, _ in model.named_parameters()])


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put ``new_module`` in place of the submodule named ``name``."""
    parent_name, _, attribute = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    get_module(model, name)  # an unknown name is an error, not a new attribute
    setattr(parent, attribute, new_module)


def set_requires_grad(requires_grad: bool, *models: nn.Module | Tensor) -> None:
    """Set ``requires_grad`` on every parameter of each module, and on each tensor given."""
    for model in models:
        if isinstance(model, nn.Module):
            for parameter in model.parameters():
                parameter.requires_grad = requires_grad
        elif isinstance(model, Tensor):
            model.requires_grad = requires_grad
        else:
            raise SpecError(
                f"set_requires_grad takes modules and tensors, got a {type(model).__name__}."
            )


# -- copies ---------------------------------------------------------------------------


def recursive_copy(
    x: Any,
    clone: bool | None = None,
    detach: bool | None = None,
    retain_grad: bool | None = None,
) -> Any:
    """``x``, or a copy of it whose tensors are detached and/or cloned.

    Tensors inside dicts, lists and tuples (named tuples, ``ModelOutput``) are copied the same
    way; other objects are passed through. With ``retain_grad`` the original floating-point
    tensors are made to require grad and to keep their ``.grad`` (``detach`` is then
    ignored), and the result is cloned if ``clone``.
    """
    if not clone and not detach and not retain_grad:
        return x
    if isinstance(x, Tensor):
        if retain_grad:
            if x.is_floating_point() or x.is_complex():
                if not x.requires_grad:
                    x.requires_grad_(True)
                x.retain_grad()
        elif detach:
            x = x.detach()
        return x.clone() if clone else x
    if isinstance(x, Mapping):
        items = {k: recursive_copy(v, clone, detach, retain_grad) for k, v in x.items()}
        kind: Any = type(x)
        with contextlib.suppress(TypeError, ValueError):
            return kind(items)
        with contextlib.suppress(TypeError, ValueError):
            return kind(**items)
        return items
    if isinstance(x, (list, tuple)):
        values = [recursive_copy(v, clone, detach, retain_grad) for v in x]
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*values)
        with contextlib.suppress(TypeError):
            return type(x)(values)
        return tuple(values) if isinstance(x, tuple) else values
    return x


# -- subsequence ----------------------------------------------------------------------

_Path = list[str] | None


def subsequence(
    sequential: nn.Module,
    first_layer: str | None = None,
    last_layer: str | None = None,
    after_layer: str | None = None,
    upto_layer: str | None = None,
    single_layer: str | None = None,
    share_weights: bool = False,
) -> nn.Sequential:
    """The layers of an ``nn.Sequential`` from ``first_layer`` to ``last_layer`` (inclusive),
    or between ``after_layer`` and ``upto_layer`` (exclusive), as a new ``nn.Sequential``.

    Dotted names descend into nested ``nn.Sequential`` modules. The layers are copies with
    their parameters unless ``share_weights``; ``single_layer`` is one layer alone.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Tanh())
        >>> subsequence(net, after_layer="0")
        Sequential(
          (1): ReLU()
          (2): Tanh()
        )
    """
    if single_layer is not None:
        if not (first_layer is last_layer is after_layer is upto_layer is None):
            raise SpecError("subsequence: single_layer excludes every other layer argument.")
        first_layer = last_layer = single_layer
    if first_layer is not None and after_layer is not None:
        raise SpecError("subsequence: give first_layer or after_layer, not both.")
    if last_layer is not None and upto_layer is not None:
        raise SpecError("subsequence: give last_layer or upto_layer, not both.")
    first, last, after, upto = (
        None if d is None else d.split(".")
        for d in (first_layer, last_layer, after_layer, upto_layer)
    )
    result = hierarchical_subsequence(sequential, first, last, after, upto, share_weights)
    assert result is not None  # (depth 0 always gives a Sequential)
    return result


def hierarchical_subsequence(
    sequential: nn.Module,
    first: _Path,
    last: _Path,
    after: _Path,
    upto: _Path,
    share_weights: bool = False,
    depth: int = 0,
) -> nn.Sequential | None:
    """`subsequence` on names split at the dots, from level ``depth`` of them; None for an
    empty selection below the top level."""
    if first is None and last is None and after is None and upto is None:
        return sequential if share_weights else copy.deepcopy(sequential)  # type: ignore[return-value]
    if not isinstance(sequential, nn.Sequential):
        path = next(p for p in (first, last, after, upto) if p is not None)
        where = ".".join(path[:depth]) or "the model"
        raise SpecError(
            f"subsequence: {where} is a {type(sequential).__name__}, not an nn.Sequential; "
            "dotted names can only descend into nested nn.Sequential modules."
        )

    def here(path: _Path) -> tuple[str | None, bool]:
        return (None, False) if path is None else (path[depth], len(path) > depth + 1)

    (f, f_deep), (l_, l_deep), (a, a_deep), (u, u_deep) = map(here, (first, last, after, upto))
    found = {"first": f is None, "last": l_ is None, "after": a is None, "upto": u is None}
    including = first is None and after is None
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in sequential.named_children():
        inner: dict[str, _Path] = {"first": None, "last": None, "after": None, "upto": None}
        if name == f:
            found["first"] = including = True
            inner["first"] = first if f_deep else None
        if name == a:
            found["after"] = True
            if a_deep:
                including = True
                inner["after"] = after
        if name == u:
            found["upto"] = True
            if u_deep:
                inner["upto"] = upto
            else:
                including = False
        if name == l_:
            found["last"] = True
            inner["last"] = last if l_deep else None
        if including:
            chosen = hierarchical_subsequence(
                child, inner["first"], inner["last"], inner["after"], inner["upto"],
                share_weights, depth + 1,
            )  # fmt: skip
            if chosen is not None:
                kept[name] = chosen
        if name == l_ or (name == u and u_deep):
            including = False
        if name == a and not a_deep:
            including = True
    missing = [
        ".".join(path)
        for key, path in (("first", first), ("last", last), ("after", after), ("upto", upto))
        if path is not None and not found[key]
    ]
    if missing:
        prefix = next(p for p in (first, last, after, upto) if p is not None)[:depth]
        names = [".".join([*prefix, n]) for n, _ in sequential.named_children()]
        raise not_found("module", missing[0], names)
    if not kept and depth > 0:
        return None
    result = nn.Sequential(kept)
    result.training = sequential.training
    return result
