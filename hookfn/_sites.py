"""Resolving spec keys (names, globs, module objects) to the model's concrete modules."""

from __future__ import annotations

import difflib
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from ._errors import LayerNotFoundError, SpecError

__all__ = ["ModelIndex", "Resolved", "index_of", "resolve_key", "unwrap"]

# Wrappers whose child is the model users think of, with the prefix they add to names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Strip `torch.compile`, DataParallel and DDP wrappers; return the inner model and prefix."""
    prefix = ""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            prefix += "_orig_mod."
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            prefix += "module."
            model = model.module
            continue
        return model, prefix


@dataclass(slots=True)
class ModelIndex:
    """Names of a model's modules in `named_modules()` order, built once and reused."""

    names: list[str]
    modules: dict[str, nn.Module]
    order: dict[int, int]  # id(module) -> position in names
    by_id: dict[int, str]


_INDEX: weakref.WeakKeyDictionary[nn.Module, ModelIndex] = weakref.WeakKeyDictionary()


def _build_index(model: nn.Module) -> ModelIndex:
    names: list[str] = []
    modules: dict[str, nn.Module] = {}
    order: dict[int, int] = {}
    by_id: dict[int, str] = {}
    for name, module in model.named_modules():
        order[id(module)] = len(names)
        by_id[id(module)] = name
        names.append(name)
        modules[name] = module
    index = ModelIndex(names, modules, order, by_id)
    _INDEX[model] = index
    return index


def index_of(model: nn.Module, *, fresh: bool = False) -> ModelIndex:
    """The cached index of ``model``; rebuilt when asked or when it no longer matches."""
    index = None if fresh else _INDEX.get(model)
    return _build_index(model) if index is None else index


def _is_glob(key: str) -> bool:
    return any(ch in key for ch in "*?[")


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    # '*' matches within one dotted segment, '**' any number of whole segments (zero too).
    parts: list[str] = []
    segments = pattern.split(".")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            parts.append(r"(?:[^.]+)(?:\.[^.]+)*" if last else r"(?:[^.]+\.)*")
            continue
        piece = ""
        for ch in segment:
            if ch == "*":
                piece += r"[^.]*"
            elif ch == "?":
                piece += r"[^.]"
            else:
                piece += re.escape(ch)
        parts.append(piece if last else piece + r"\.")
    return re.compile("".join(parts) + r"\Z")


@dataclass(frozen=True, slots=True)
class Resolved:
    """One concrete module a key resolved to."""

    name: str  # the name reported to the user (keeps the user's wrapper prefix)
    module: nn.Module
    order: int  # position in named_modules() order
    explicit: bool  # named exactly (or by object), as opposed to matched by a glob


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, [n for n in names if n], n=5, cutoff=0.6)
    if not close:
        # Fall back to names sharing the key's first segment, then to the top-level children.
        head = key.split(".", 1)[0]
        close = [n for n in names if n.split(".", 1)[0] == head][:5]
    if not close:
        close = [n for n in names if n and "." not in n][:5]
    return ", ".join(repr(n) for n in close) if close else "(the model has no submodules)"


def _strip_prefix(key: str, prefix: str) -> tuple[str, str]:
    """Split the wrapper prefix the user wrote off ``key``: (user_prefix, inner_key)."""
    if prefix and key.startswith(prefix):
        return prefix, key[len(prefix) :]
    user = ""
    rest = key
    stripped = True
    while stripped:
        stripped = False
        for wrapper in _WRAPPER_PREFIXES:
            if rest.startswith(wrapper) and wrapper in prefix:
                user += wrapper
                rest = rest[len(wrapper) :]
                stripped = True
    return user, rest


def resolve_key(model: nn.Module, inner: nn.Module, prefix: str, key: object) -> Iterator[Resolved]:
    """Yield the concrete modules a spec key names, in model order.

    Args:
        model: The model as the user passed it (possibly wrapped).
        inner: The unwrapped model (`unwrap`).
        prefix: The wrapper prefix between them.
        key: A dotted name, a glob, or a module object.

    Raises:
        LayerNotFoundError: No module matches; the message lists the closest names.
        SpecError: The key is neither a string nor a module.
    """
    if isinstance(key, nn.Module):
        index = index_of(inner)
        name = index.by_id.get(id(key))
        if name is None or index.modules.get(name) is not key:
            index = index_of(inner, fresh=True)
            name = index.by_id.get(id(key))
        if name is None:
            raise LayerNotFoundError(
                f"the module {type(key).__name__} given as a spec key is not part of the "
                f"model {type(model).__name__}; pass a module reached from this model "
                "(e.g. model.transformer.h[0]) or its dotted name."
            )
        yield Resolved(name, key, index.order[id(key)], True)
        return
    if not isinstance(key, str):
        raise SpecError(
            f"spec key {key!r} ({type(key).__name__}) is not a layer name; use a dotted "
            "name from model.named_modules() (e.g. 'transformer.h.0'), a glob "
            "('transformer.h.*'), or a module object."
        )
    user_prefix, inner_key = _strip_prefix(key, prefix)
    if not _is_glob(inner_key):
        try:
            module = inner.get_submodule(inner_key)
        except AttributeError:
            module = None
        if module is not None:
            index = index_of(inner)
            position = index.order.get(id(module))
            if position is None or index.modules.get(inner_key) is not module:
                index = index_of(inner, fresh=True)
                position = index.order.get(id(module), len(index.names))
            yield Resolved(user_prefix + inner_key, module, position, True)
            return
        names = index_of(inner, fresh=True).names
        raise LayerNotFoundError(
            f"no layer named {key!r} in {type(model).__name__}; closest names: "
            f"{_suggest(inner_key, names)}. Names come from model.named_modules(); "
            "use a glob such as 'transformer.h.*' to match several."
        )
    regex = _glob_regex(inner_key)
    index = index_of(inner, fresh=True)
    found = False
    for position, name in enumerate(index.names):
        if name and regex.match(name):
            found = True
            yield Resolved(user_prefix + name, index.modules[name], position, False)
    if not found:
        raise LayerNotFoundError(
            f"the glob {key!r} matches no layer of {type(model).__name__} ('*' matches one "
            f"dotted segment, '**' any number); names near it: "
            f"{_suggest(inner_key.replace('*', '0'), index.names)}."
        )
