"""Resolving spec keys (names, globs, module objects) to the model's concrete modules."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from torch import nn

from ._errors import LayerNotFoundError, SpecError

__all__ = [
    "Link",
    "Names",
    "Resolved",
    "glob_regex",
    "is_glob",
    "path_to",
    "resolve_key",
    "strip_prefix",
    "submodule",
    "unwrap",
]

# Wrappers whose child is the model users think of, with the prefix they add to names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")

_MODULE_GETATTR = nn.Module.__getattr__
_OBJECT_GETATTRIBUTE = object.__getattribute__


def _lacks(module: nn.Module, name: str) -> bool:
    """Whether ``getattr(module, name)`` surely raises (without raising and catching it).

    True only where attribute lookup ends in `nn.Module.__getattr__` and none of the places
    it and the normal lookup search holds ``name``; any doubt answers False.
    """
    cls = type(module)
    state = module.__dict__
    return (
        cls.__getattribute__ is _OBJECT_GETATTRIBUTE
        and cls.__getattr__ is _MODULE_GETATTR
        and name not in state
        and not hasattr(cls, name)
        and name not in state.get("_parameters", ())
        and name not in state.get("_buffers", ())
        and name not in state.get("_modules", ())
    )


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Strip `torch.compile`, DataParallel and DDP wrappers; return the inner model and prefix."""
    prefix = ""
    while True:
        inner = None if _lacks(model, "_orig_mod") else getattr(model, "_orig_mod", None)
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


class Names:
    """The names of a model's modules in `named_modules()` order, read once per resolution.

    Made afresh for each spec that is resolved (never kept between runs): a kept index of a
    model's submodules would keep them, and through a reference back, the model, alive.

    ``grafts`` are modules spliced into the model for a run (see `hookfn.splice`), each a
    ``(host, name, module)`` triple: ``module`` and its submodules are named
    ``host_name.name...`` and come right after the host's own submodules.
    """

    __slots__ = ("_by_id", "_grafted", "_grafts", "_modules", "_names", "_pairs", "root")

    def __init__(
        self, root: nn.Module, grafts: Sequence[tuple[nn.Module, str, nn.Module]] = ()
    ) -> None:
        self.root = root
        self._grafts = grafts
        self._pairs: list[tuple[str, nn.Module]] | None = None  # the model's own modules
        self._grafted: dict[str, nn.Module] = {}
        self._names: list[str] | None = None
        self._modules: dict[str, nn.Module] = {}
        self._by_id: dict[int, tuple[int, str]] = {}

    def _read(self) -> list[str]:
        names = self._names
        if names is None:
            pairs = list(self.root.named_modules() if self._pairs is None else self._pairs)
            self._pairs = pairs[:]
            # Each host's grafts in the order given: those named '<...' before the host, the
            # others after the host's own submodules.
            places: dict[tuple[int, bool], list[tuple[str, nn.Module]]] = {}
            hosts: dict[int, nn.Module] = {}
            for host, name, module in self._grafts:
                top = self._graft_name(pairs, host, name)
                if top is None:
                    continue  # spliced into another model
                grafted = [(f"{top}.{sub}" if sub else top, m) for sub, m in module.named_modules()]
                self._grafted.update(grafted)
                hosts[id(host)] = host
                places.setdefault((id(host), name.startswith("<")), []).extend(grafted)
            for (host_id, before), grafted in places.items():
                where = next(i for i, (_, m) in enumerate(pairs) if m is hosts[host_id])
                base = pairs[where][0]
                end = where + 1
                while end < len(pairs) and pairs[end][0].startswith(base + "." if base else ""):
                    end += 1
                pairs[where if before else end : where if before else end] = grafted
            names = self._names = []
            for name, module in pairs:
                self._by_id.setdefault(id(module), (len(names), name))
                self._modules[name] = module
                names.append(name)
        return names

    @staticmethod
    def _graft_name(pairs: list[tuple[str, nn.Module]], host: nn.Module, name: str) -> str | None:
        """The whole name of a graft: an op site's (``':op'``) follows its module's name
        directly; a component's (``'/...'``, ``'<...'``) is the name itself; any other
        (a splice's) is a child's name of the module. None where the host is not here."""
        base = next((n for n, m in pairs if m is host), None)
        if base is None:
            return None
        if name[:1] in ("/", "<"):
            return name[1:]
        if base and not name.startswith(":"):
            return f"{base}.{name}"
        return base + name

    def with_grafts(self, grafts: Sequence[tuple[nn.Module, str, nn.Module]]) -> Names:
        """These names with ``grafts`` added (the model's modules are not read again)."""
        if not grafts:
            return self
        names = Names(self.root, grafts)
        self._read()
        names._pairs = self._pairs
        return names

    def grafted(self, name: str) -> nn.Module | None:
        """The spliced module named ``name``, or None."""
        if not self._grafts:
            return None
        self._read()
        return self._grafted.get(name)

    @property
    def names(self) -> list[str]:
        """Every module's name, the root's (``""``) first."""
        return self._read()

    def module(self, name: str) -> nn.Module:
        self._read()
        return self._modules[name]

    def find(self, module: nn.Module) -> tuple[int, str] | None:
        """(position, name) of ``module`` in `named_modules()` order, or None."""
        self._read()
        return self._by_id.get(id(module))

    def order(self, module: nn.Module) -> int:
        """``module``'s position in `named_modules()` order (after every module if none)."""
        found = self.find(module)
        return len(self.names) if found is None else found[0]


def is_glob(key: str) -> bool:
    return "*" in key or "?" in key or "[" in key


class Link(NamedTuple):
    """One step of a name's path through the module tree."""

    parent: nn.Module
    part: str
    child: nn.Module
    alias: bool  # kept as an instance attribute (``__dict__``), not a registered child


def path_to(inner: nn.Module, inner_key: str) -> list[Link] | None:
    """The steps that lead from ``inner`` to ``inner_key``, each as its parent keeps it.

    A step is what ``getattr`` finds (as `get_submodule` does): a registered child
    (``_modules``), or a module kept as an instance attribute (an alias, e.g.
    TransformerLens' ``hook_resid_post``). None where a step is neither, or may not be what
    ``getattr`` finds (a class attribute of the same name), or names no module.
    """
    links: list[Link] = []
    module = inner
    for part in inner_key.split(".") if inner_key else ():
        cls = type(module)
        children = module._modules
        state = module.__dict__
        child = children.get(part)
        if (
            child is not None
            and cls.__getattr__ is _MODULE_GETATTR
            and part not in state
            and not hasattr(cls, part)
        ):
            links.append(Link(module, part, child, False))  # the common case, without getattr
            module = child
            continue
        if hasattr(cls, part):
            return None
        try:
            found = getattr(module, part)
        except AttributeError:
            return None
        if not isinstance(found, nn.Module):
            return None
        if state.get(part) is found:
            alias = True
        elif children.get(part) is found and part not in state:
            alias = False
        else:
            return None
        links.append(Link(module, part, found, alias))
        module = found
    return links


def submodule(inner: nn.Module, inner_key: str) -> nn.Module | None:
    """``inner.get_submodule(inner_key)``, or None where it raises.

    Fast path: follow the steps `_links` finds; anything else takes the slow path.
    """
    links = path_to(inner, inner_key)
    if links is not None:
        return links[-1].child if links else inner
    try:
        return inner.get_submodule(inner_key)
    except AttributeError:
        return None


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a glob key.

    Raises:
        SpecError: The glob is malformed (e.g. a reversed range ``"[z-a]"``).
    """
    try:
        return re.compile(_glob_source(pattern))
    except re.error as error:
        raise SpecError(
            f"the glob {pattern!r} is malformed ({error}); '*' matches one dotted segment, "
            "'**' any number, '?' one character, '[abc]' / '[a-z]' / '[!a]' one of a set."
        ) from None


def _glob_source(pattern: str) -> str:
    # '*' matches within one dotted segment, '**' any number of whole segments (zero too),
    # '?' one character and '[...]' / '[!...]' one character of a set, never a dot.
    parts: list[str] = []
    segments = pattern.split(".")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            parts.append(r"(?:[^.]+)(?:\.[^.]+)*" if last else r"(?:[^.]+\.)*")
            continue
        piece = _segment_regex(segment)
        parts.append(piece if last else piece + r"\.")
    return "".join(parts) + r"\Z"


def _segment_regex(segment: str) -> str:
    piece = ""
    i = 0
    while i < len(segment):
        ch = segment[i]
        close = _class_end(segment, i) if ch == "[" else -1
        # ('*' and '?' stay within a module's name: they never take the ':' of an op site)
        if ch == "*":
            piece += r"[^.:]*"
        elif ch == "?":
            piece += r"[^.:]"
        elif close > 0:
            negate = segment[i + 1] == "!"
            members = segment[i + 2 if negate else i + 1 : close]
            for special in "\\^[]":
                members = members.replace(special, "\\" + special)
            # A segment holds no '.', so only a negated set must be kept off the dot.
            piece += f"[^.{members}]" if negate else f"[{members}]"
            i = close
        else:
            piece += re.escape(ch)
        i += 1
    return piece


def _class_end(segment: str, start: int) -> int:
    """Index of the ']' closing the '[' at ``start`` (fnmatch rules), or -1 if none."""
    i = start + 1
    if i < len(segment) and segment[i] == "!":
        i += 1
    if i < len(segment) and segment[i] == "]":
        i += 1  # a ']' first in the set is a member
    close = segment.find("]", i)
    return close


@dataclass(frozen=True, slots=True)
class Resolved:
    """One concrete module a key resolved to."""

    name: str  # the name reported to the user (keeps the user's wrapper prefix)
    module: nn.Module
    order: int  # position in named_modules() order
    explicit: bool  # named exactly (or by object), as opposed to matched by a glob


# Characters that look alike in most fonts and in typed-in names: O/0, l/1, I/1 (case folded).
_CONFUSABLE = str.maketrans({"o": "0", "l": "1", "i": "1"})


def _fold(text: str) -> str:
    return text.lower().translate(_CONFUSABLE)


def _closest(key: str, names: list[str], n: int = 5, cutoff: float = 0.6) -> list[str]:
    """The ``n`` names most similar to ``key``, best first.

    Similarity is measured on folded text (case and look-alike characters merged), so
    ``"transformer.h.O"`` ranks ``"transformer.h.0"`` first; ties go to the exact-text
    similarity, then to model order.
    """
    folded = _fold(key)
    matcher = difflib.SequenceMatcher(None, b=folded)
    scored: list[tuple[float, int, str]] = []
    for position, name in enumerate(names):
        if not name:
            continue
        matcher.set_seq1(_fold(name))
        if matcher.real_quick_ratio() < cutoff or matcher.quick_ratio() < cutoff:
            continue
        score = matcher.ratio()
        if score >= cutoff:
            scored.append((-score, position, name))
    scored.sort()
    # Break ties on the exact text among the best few only (a second ratio for each is costly).
    exact = difflib.SequenceMatcher(None, b=key)
    best: list[tuple[float, float, int, str]] = []
    for score, position, name in scored[: 4 * n]:
        exact.set_seq1(name)
        best.append((score, -exact.ratio(), position, name))
    best.sort()
    return [name for *_, name in best[:n]]


def _suggest(key: str, names: list[str], prefix: str = "") -> str:
    """The closest names to ``key``, written with the wrapper ``prefix`` the user used."""
    close = _closest(key, names)
    if not close:
        # Fall back to names sharing the key's first segment, then to the top-level children.
        head = key.split(".", 1)[0]
        close = [n for n in names if n.split(".", 1)[0] == head][:5]
    if not close:
        close = [n for n in names if n and "." not in n][:5]
    if not close:
        return "(the model has no submodules)"
    return ", ".join(repr(prefix + n) for n in close)


def strip_prefix(key: str, prefix: str) -> tuple[str, str]:
    """Split the wrapper prefix the user wrote off ``key``: (user_prefix, inner_key)."""
    if not prefix:
        return "", key  # no wrapper: nothing to strip
    if key.startswith(prefix):
        return prefix, key[len(prefix) :]
    user = ""
    rest = key
    stripped = True
    while stripped:
        stripped = False
        for wrapper in _WRAPPER_PREFIXES:
            if wrapper not in prefix:
                continue
            if rest.startswith(wrapper):
                user += wrapper
                rest = rest[len(wrapper) :]
                stripped = True
            elif rest == wrapper[:-1]:
                # The wrapper's own entry in named_modules() ("module", "_orig_mod"): the
                # inner model itself.
                return user + rest, ""
    return user, rest


def resolve_key(model: nn.Module, names: Names, prefix: str, key: object) -> Iterator[Resolved]:
    """Yield the concrete modules a spec key names, in model order.

    Args:
        model: The model as the user passed it (possibly wrapped).
        names: The names of the unwrapped model (`unwrap`), read for this resolution.
        prefix: The wrapper prefix between them.
        key: A dotted name, a glob, or a module object.

    Raises:
        LayerNotFoundError: No module matches; the message lists the closest names.
        SpecError: The key is neither a string nor a module, or a malformed glob.
    """
    inner = names.root
    if isinstance(key, nn.Module):
        found = names.find(key)
        if found is None:
            raise LayerNotFoundError(
                f"the module {type(key).__name__} given as a spec key is not part of the "
                f"model {type(model).__name__}; pass a module reached from this model "
                "(e.g. model.transformer.h[0]) or its dotted name."
            )
        position, name = found
        yield Resolved(name, key, position, True)
        return
    if not isinstance(key, str):
        raise SpecError(
            f"spec key {key!r} ({type(key).__name__}) is not a layer name; use a dotted "
            "name from model.named_modules() (e.g. 'transformer.h.0'), a glob "
            "('transformer.h.*'), or a module object."
        )
    user_prefix, inner_key = strip_prefix(key, prefix)
    if not is_glob(inner_key):
        module = submodule(inner, inner_key)
        if module is None:
            module = names.grafted(inner_key)
        if module is not None:
            yield Resolved(user_prefix + inner_key, module, names.order(module), True)
            return
        raise LayerNotFoundError(
            f"no layer named {key!r} in {type(model).__name__}; closest names: "
            f"{_suggest(inner_key, names.names, user_prefix)}. Names come from "
            "model.named_modules(); use a glob such as 'transformer.h.*' to match several."
            + _bracket_hint(key)
        )
    if re.search(r"\[\d+\]", inner_key) and not any(c in inner_key for c in "*?"):
        dotted = re.sub(r"\[(\d+)\]", r".\1", inner_key)
        if submodule(inner, dotted) is not None:
            raise LayerNotFoundError(
                f"{key!r} indexes with brackets, but layer names use dots: write "
                f"{user_prefix + dotted!r} (or pass the module object itself)."
            )
    regex = glob_regex(inner_key)
    found_any = False
    for position, name in enumerate(names.names):
        if name and regex.match(name):
            found_any = True
            yield Resolved(user_prefix + name, names.module(name), position, False)
    if not found_any:
        raise LayerNotFoundError(
            f"the glob {key!r} matches no layer of {type(model).__name__} ('*' matches one "
            f"dotted segment, '**' any number); names near it: "
            f"{_suggest(inner_key.replace('*', '0'), names.names, user_prefix)}."
            + _bracket_hint(key)
        )


def _bracket_hint(key: str) -> str:
    """A hint for a key written as Python indexing (``"transformer.h[1]"``)."""
    if re.search(r"\[\d+\]", key):
        dotted = re.sub(r"\[(\d+)\]", r".\1", key)
        return f" Write an index with dots: {dotted!r}."
    return ""
