"""The plan: a spec normalized and its keys resolved to the model's modules, as a value.

`make_plan` turns ``(model, spec)`` into a `Plan`: every site with its `Hook`, in model
order, and the modules a call passes through on the way to them. Later stages read a plan
and never write into it.

Resolving keys walks the module tree; a run that repeats the keys of an earlier one reuses
that resolution while it still holds. A kept resolution holds only weak references, and no
spec values (edits, the caches and tensors they hold): hooks are made from each run's own
spec. It still holds while every parent on the way to every site has the same children
under the same names, in the same order, as when it was made (for a glob, every module of
the model), which each run checks before using it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Union

from torch import nn
from typing_extensions import TypeAlias

from ._capture import Capture
from ._compile import compiler_loaded, enclosing
from ._components import component_grafts, looks_like_component
from ._edits import Splice, Spliced, SpliceFromInput
from ._errors import SpecError
from ._gate import active_grafts
from ._hook import CAPTURE, Hook, SpecValue, to_hook
from ._keys import (
    Names,
    Resolved,
    glob_regex,
    is_glob,
    path_to,
    resolve_key,
    strip_prefix,
    submodule,
    unwrap,
)
from ._ops import Operand, OpSite, Pattern, parse_op
from ._site import Site

__all__ = ["Plan", "Planned", "Spec", "make_plan", "plan"]

# Keys are `str | nn.Module`, typed `Any`: Mapping is invariant in its key type, so a precise
# key type would reject a plain `dict[str, ...]` literal. Keys are checked when planned.
Spec: TypeAlias = Union[
    Mapping[Any, SpecValue],
    Sequence[Union[str, nn.Module]],
    str,
    nn.Module,
]
"""A spec: a mapping from layer keys to spec values, or keys alone (capture only)."""


class Planned(NamedTuple):
    """One site of a plan: a concrete module, its name, and what to do there."""

    name: str
    module: nn.Module
    hook: Hook
    order: int  # position in `named_modules()` order
    # The `Site` objects edits receive, by kind (every kind of call the module has: "output"
    # and "input"; the gradients' kinds where gradients are edited), one per call: kept with
    # a kept resolution, so made once for the runs of a spec (they refer to the module
    # weakly).
    sites: dict[str, list[Site]]
    # A weak reference to the module, for the captures of a run (`Captures.modules`): kept
    # with a kept resolution too.
    ref: weakref.ref[nn.Module]
    # The capture of a site whose hook records nothing (an edit alone): one value, the same
    # in every run (captures are immutable), kept too.
    blank: Capture


class Plan(NamedTuple):
    """A resolved spec: its sites in model order, and the modules around them.

    ``around`` lists ``(label, module, is_site)`` for the modules a call of the model passes
    through on its way to the sites, outermost first (see `hookfn._compile.enclosing`).
    ``grafts`` are the modules the spec splices in (`hookfn.splice`), as ``(host, name,
    module)``: their parts are sites of this run and of the runs nested in it.
    ``parallels`` are the ``DataParallel`` modules of ``around`` (their threads must see the
    run).
    """

    sites: tuple[Planned, ...]
    around: tuple[tuple[str, nn.Module, bool], ...]
    grafts: tuple[tuple[nn.Module, str, nn.Module], ...] = ()
    parallels: tuple[nn.Module, ...] = ()


def _parallels(around: Iterable[tuple[str, nn.Module, bool]]) -> tuple[nn.Module, ...]:
    return tuple(m for _, m, _ in around if isinstance(m, nn.DataParallel))


EMPTY = Plan((), ())


def plan(model: nn.Module, spec: object) -> tuple[Planned, ...]:
    """The sites of ``spec`` on ``model``, resolved and validated, in model order.

    Exact names (and module objects) win over globs that match the same module; two globs,
    or two exact keys, that reach the same module are an error.

    Raises:
        HookfnError: A key names no module, a value is not understood, or two keys clash.
    """
    return make_plan(model, spec).sites


def _items(spec: object) -> list[tuple[object, object]]:
    if isinstance(spec, Mapping):
        return list(spec.items())
    if isinstance(spec, (str, nn.Module)):
        return [(spec, "capture")]
    if isinstance(spec, (list, tuple, set, frozenset)):
        return [(key, "capture") for key in spec]
    raise SpecError(
        f"the spec is a {type(spec).__name__}; pass a mapping {{layer: value}} "
        "(e.g. {'transformer.h.0': 'capture'}) or a list of layer names to capture."
    )


def make_plan(model: nn.Module, spec: object) -> Plan:
    """Resolve and validate a whole spec before anything is registered (see `plan`)."""
    if not isinstance(model, nn.Module):
        raise SpecError(f"expected a torch.nn.Module as the model, got {type(model).__name__}.")
    kind = type(spec)
    if kind is dict or kind is list or kind is tuple:
        given: Any = spec
        if not given:
            return EMPTY
        keys = tuple(given)
        grafts = active_grafts()
        kept = _kept(model, keys) if not grafts or _apart(keys, grafts) else None
        if kept is not None:
            values = list(given.values()) if kind is dict else None
            found = kept.plan(values, keys)
            if found is not None:
                return found
        items = list(given.items()) if kind is dict else [(key, "capture") for key in given]
    else:
        items = _items(spec)
        if not items:
            return EMPTY
        keys = tuple(key for key, _ in items)
    return _resolve(model, items, keys)


def _resolve(
    model: nn.Module, items: list[tuple[object, object]], keys: tuple[object, ...]
) -> Plan:
    inner, prefix = unwrap(model)
    hooks = [
        to_hook(value, key if isinstance(key, str) else type(key).__name__) for key, value in items
    ]
    plain = Names(inner)
    op_sites: dict[int, list[nn.Module]] = {}
    own = _grafts(model, plain, prefix, items, hooks, op_sites)
    active = [graft for graft in active_grafts() if all(graft[2] is not g[2] for g in own)]
    names = plain.with_grafts(own + active)
    # id(module) -> (name, module, order, explicit, hook, key, position of the key)
    chosen: dict[int, tuple[str, nn.Module, int, bool, Hook, object, int]] = {}
    # Kept only when every key is a name or a glob of an unwrapped model (a module object
    # as a key would be held by the kept entry), and nothing is spliced in.
    keep = not prefix and not own and (not active or _apart(keys, active))
    globbed = False
    for position, ((key, _), hook) in enumerate(zip(items, hooks, strict=True)):
        if type(key) is not str or not key:
            keep = False
        elif is_glob(key):
            globbed = True
        if position in op_sites:  # (its probes, made for it: a glob over the module key)
            explicit = not is_glob(str(key).partition(":")[0])
            user_prefix = strip_prefix(str(key), prefix)[0]  # (as the user wrote the key)
            resolved: Any = [
                Resolved(user_prefix + place[1], probe, place[0], explicit)
                for probe in op_sites[position]
                if (place := names.find(probe)) is not None
            ]
        else:
            resolved = resolve_key(model, names, prefix, key)
        for found in resolved:
            previous = chosen.get(id(found.module))
            if previous is not None:
                if previous[3] == found.explicit:
                    raise SpecError(
                        f"layer {found.name!r} is named by two spec keys, "
                        f"{_key_label(previous[5])} and {_key_label(key)}; give it one entry "
                        "(combine edits with >>)."
                    )
                if previous[3]:
                    continue  # an exact name wins over a glob's match
            chosen[id(found.module)] = (
                found.name,
                found.module,
                found.order,
                found.explicit,
                hook,
                key,
                position,
            )
    picked = sorted(chosen.values(), key=lambda entry: entry[2])
    sites = tuple(
        Planned(
            name,
            module,
            hook,
            order,
            {"output": [], "input": []},
            weakref.ref(module),
            Capture(name),
        )
        for name, module, order, _, hook, *_ in picked
    )
    hooked = [(p.name, p.module) for p in sites]
    for host, *_ in own:  # a probe's host runs the hooks that call it
        place = names.find(host)
        if place is not None:
            hooked.append((prefix + place[1], host))
    around = tuple(enclosing(model, hooked))
    if keep and all(p.module is not model for p in sites):
        entries = [
            (position, p.name, p.ref, p.order, p.sites, p.blank)
            for p, (*_, position) in zip(sites, picked, strict=True)
        ]
        kept = _Kept.make(inner, entries, around, globbed)
        if kept is not None:
            _keep(model, keys, kept)
    return Plan(sites, around, tuple(own), _parallels(around))


_SPLICES = (Splice, SpliceFromInput)


def _names_a_module(names: Names, key: str) -> bool:
    if is_glob(key):
        regex = glob_regex(key)
        return any(regex.match(name) for name in names.names)
    return submodule(names.root, key) is not None


def op_grafts(
    model: nn.Module, names: Names, prefix: str, key: str
) -> list[tuple[nn.Module, str, nn.Module]]:
    """The probes an op key (``"module:op"``) puts into the modules it names."""
    module_key, _, op = key.partition(":")
    kind, _, index = op.partition(".")
    if kind in ("q", "k", "v", "pattern"):
        if index:
            raise SpecError(
                f"op site {key!r}: ':{kind}' is the attention's {kind}, one per call of the "
                f"module; it takes no call index (write '{module_key}:{kind}')."
            )
        make: Any = Pattern if kind == "pattern" else lambda: Operand(kind)
    else:
        name, number = parse_op(op, key)
        make = lambda: OpSite(name, number)  # noqa: E731
    if not module_key:
        return [(names.root, ":" + op, make())]
    return [
        (found.module, ":" + op, make()) for found in resolve_key(model, names, prefix, module_key)
    ]


def _apart(keys: tuple[object, ...], grafts: list[tuple[nn.Module, str, nn.Module]]) -> bool:
    """Whether ``keys`` surely name no part of ``grafts``: exact names without a splice's
    name as a segment (a kept resolution of them holds where modules are spliced in)."""
    for key in keys:
        if type(key) is not str or is_glob(key):
            return False
        segments = key.split(".")
        if any(name in segments for _, name, _ in grafts):
            return False
    return True


def _probe_site(name: str, probe: nn.Module) -> str:
    """What a probe reads, whatever the spelling (``:sdpa`` and
    ``:scaled_dot_product_attention`` are one site)."""
    if isinstance(probe, OpSite):
        return f":{probe.op}.{probe.index}"
    return f":{type(probe).__name__}.{getattr(probe, 'which', '')}" if name[:1] == ":" else name


def _grafts(
    model: nn.Module,
    names: Names,
    prefix: str,
    items: list[tuple[object, object]],
    hooks: list[Hook],
    op_sites: dict[int, list[nn.Module]] | None = None,
) -> list[tuple[nn.Module, str, nn.Module]]:
    """The modules this spec splices in, as ``(host, name, module)`` (see `Names`); the
    probes each op key names go into ``op_sites`` by the key's position."""
    grafts: list[tuple[nn.Module, str, nn.Module]] = []
    # One probe per site, whatever keys (a glob and an exact key) name it.
    probes: dict[tuple[int, str], tuple[str, nn.Module]] = {}
    for position, ((key, _), hook) in enumerate(zip(items, hooks, strict=True)):
        found_probes: list[tuple[nn.Module, str, nn.Module]] = []
        if type(key) is str and ":" in key:
            found_probes = op_grafts(model, names, prefix, key)
        elif type(key) is str and looks_like_component(key) and not _names_a_module(names, key):
            found_probes = component_grafts(names.root, names, key)
        for host, name, probe in found_probes:
            site = (id(host), _probe_site(name, probe))
            if site in probes:
                if probes[site][0] != name:
                    raise SpecError(
                        f"{_key_label(key)} names an op site another key names as "
                        f"{probes[site][0]!r}: the same calls under two spellings; use one."
                    )
                probe = probes[site][1]
            else:
                probes[site] = (name, probe)
                grafts.append((host, name, probe))
            if op_sites is not None and ":" in str(key):
                op_sites.setdefault(position, []).append(probe)
        edit = hook.edit
        if not isinstance(edit, Splice):
            continue
        found = list(resolve_key(model, names, prefix, key))
        if len(found) != 1:
            raise SpecError(
                f"{edit!r} at {_key_label(key)}: a splice goes at one layer, and this key "
                f"names {len(found)}; splice a module of its own at each (one per key)."
            )
        host, name = found[0].module, edit.name
        if hasattr(host, name):
            raise SpecError(
                f"{edit!r} at {found[0].name!r}: the layer already has an attribute "
                f"{name!r}, so the spliced module's parts cannot be named "
                f"'{found[0].name}.{name}...'; pass splice(..., name='another_name')."
            )
        for other_host, other_name, other in [*grafts, *active_grafts()]:
            if other is edit.spliced or (
                isinstance(other, Spliced)
                and other.module is edit.spliced.module
                and next(other.module.children(), None) is not None
            ):
                raise SpecError(
                    f"{edit!r} at {found[0].name!r}: this module is spliced at another layer "
                    "of the run too, and its submodules, which are sites, would be both "
                    "layers' at once; splice a copy (copy.deepcopy(module)) at each layer."
                )
            if other_host is host and other_name == name:
                raise SpecError(
                    f"{edit!r} at {found[0].name!r}: another splice named {name!r} is at this "
                    "layer already (an enclosing spliced(...) block); name this one "
                    "apart: splice(..., name='another_name')."
                )
        edit.check_host(host, found[0].name)
        grafts.append((host, name, edit.spliced))
    return grafts


def _key_label(key: object) -> str:
    """A spec key as a message shows it: a name quoted, a module object by its class."""
    return repr(key) if isinstance(key, str) else f"a {type(key).__name__} module object"


# A kept site: its key's position in the spec, then the fields of its `Planned` that stay.
_Entry: TypeAlias = tuple[int, str, weakref.ref[nn.Module], int, dict[str, list[Site]], Capture]


class _Kept:
    """A resolution of one tuple of keys on one model, kept for later runs (weakly)."""

    __slots__ = ("around", "checks", "entries", "parallel")

    def __init__(
        self,
        entries: tuple[_Entry, ...],
        around: tuple[tuple[str, weakref.ref[nn.Module], bool], ...],
        checks: tuple[_Check, ...],
    ) -> None:
        self.entries = entries
        self.around = around
        self.checks = checks
        self.parallel = any(isinstance(ref(), nn.DataParallel) for _, ref, _ in around)

    @classmethod
    def make(
        cls,
        inner: nn.Module,
        entries: list[_Entry],
        around: tuple[tuple[str, nn.Module, bool], ...],
        globbed: bool,
    ) -> _Kept | None:
        """The kept form of a resolution; None where a name's path cannot be followed
        through registered children and instance attributes (a property, a class's own
        ``__getattr__``): nothing could tell when it changes, so it is resolved each run."""
        ref = weakref.ref
        if globbed:  # a glob's matches depend on every module of the model
            checks = tuple(_Check.of(module, module._modules, False) for module in inner.modules())
        else:
            steps: dict[tuple[int, bool], dict[str, nn.Module]] = {}
            parents: dict[int, nn.Module] = {}
            for _, name, *_ in entries:
                path = path_to(inner, name)
                if path is None:
                    return None
                for link in path:
                    parents[id(link.parent)] = link.parent
                    steps.setdefault((id(link.parent), link.alias), {})[link.part] = link.child
            checks = tuple(
                _Check.of(parents[parent], children, alias)
                for (parent, alias), children in steps.items()
            )
        return cls(
            tuple(entries),
            tuple((label, ref(module), is_site) for label, module, is_site in around),
            checks,
        )

    def plan(self, values: list[object] | None, keys: tuple[object, ...]) -> Plan | None:
        """The plan of this run's spec values (``None``: capture every site) on the kept
        resolution, or None where the model changed since it was made."""
        for check in self.checks:
            if not check.holds():
                return None
        made: dict[int, Hook] = {}  # a glob's hook, made once for all its matches
        sites = []
        new = tuple.__new__  # (`Planned` without its Python-level `__new__`)
        for position, name, ref, order, kept_sites, blank in self.entries:
            module = ref()
            if module is None:
                return None
            if values is None:
                hook = CAPTURE
            else:
                value = values[position]
                found = value if type(value) is Hook else made.get(position)
                if found is None:
                    found = made[position] = to_hook(value, str(keys[position]))
                hook = found
                if type(hook.edit) in _SPLICES:
                    return None  # its parts are named in this run: resolved with them
            sites.append(new(Planned, (name, module, hook, order, kept_sites, ref, blank)))
        if not self.parallel and not compiler_loaded():
            # What is around the sites matters only for compiled code (none can exist before
            # torch.compile is loaded) and DataParallel threads.
            return Plan(tuple(sites), ())
        around = []
        for label, ref, is_site in self.around:
            module = ref()
            if module is None:
                return None
            around.append((label, module, is_site))
        # (the DataParallel modules looked for only where the resolution found some)
        return Plan(tuple(sites), tuple(around), (), _parallels(around) if self.parallel else ())


class _Check:
    """One parent's children as they were: its names in order, and the children on a path."""

    __slots__ = ("alias", "children", "names", "parent")

    def __init__(
        self,
        parent: weakref.ref[nn.Module],
        names: tuple[str, ...] | None,
        children: tuple[tuple[str, weakref.ref[nn.Module] | None], ...],
        alias: bool,
    ) -> None:
        self.parent = parent
        self.names = names
        self.children = children
        self.alias = alias

    @classmethod
    def of(cls, parent: nn.Module, children: Mapping[str, Any], alias: bool) -> _Check:
        return cls(
            weakref.ref(parent),
            None if alias else tuple(parent._modules),
            tuple(
                (part, None if child is None else weakref.ref(child))
                for part, child in children.items()
            ),
            alias,
        )

    def holds(self) -> bool:
        parent = self.parent()
        if parent is None:
            return False
        if self.alias:
            where: Mapping[str, Any] = parent.__dict__
        else:
            where = parent._modules
            if tuple(where) != self.names:  # a child added, removed, renamed or moved
                return False
        state = parent.__dict__
        for part, child in self.children:
            if where.get(part) is not (None if child is None else child()):
                return False  # (a None slot filled, or a child replaced or freed)
            if not self.alias and part in state:
                return False  # an instance attribute now shadows the registered child
        return True


# id(model) -> (a weak reference to the model, its kept resolutions by tuple of keys). Keyed
# by id, with a weak reference whose callback drops the entry when the model is freed.
_KEPT: dict[int, tuple[weakref.ref[nn.Module], dict[tuple[object, ...], _Kept]]] = {}
_KEPT_LOCK = threading.Lock()
_MAX_KEPT = 256  # per model; the oldest half is dropped beyond it


def _kept(model: nn.Module, keys: tuple[object, ...]) -> _Kept | None:
    entry = _KEPT.get(id(model))
    if entry is None or entry[0]() is not model:
        return None
    try:
        return entry[1].get(keys)
    except TypeError:  # an unhashable key: the general path reports it
        return None


def _keep(model: nn.Module, keys: tuple[object, ...], kept: _Kept) -> None:
    key = id(model)
    with _KEPT_LOCK:
        entry = _KEPT.get(key)
        if entry is None or entry[0]() is not model:

            def forget(ref: weakref.ref[nn.Module], table: dict[int, Any] = _KEPT) -> None:
                # (everything it uses is bound here: at exit, module globals may be gone)
                found = table.get(key)
                if found is not None and found[0] is ref:
                    del table[key]

            entry = _KEPT[key] = (weakref.ref(model, forget), {})
        plans = entry[1]
        if len(plans) >= _MAX_KEPT:
            for old in list(plans)[: _MAX_KEPT // 2]:
                del plans[old]
        with contextlib.suppress(TypeError):  # an unhashable key is not kept
            plans[keys] = kept
