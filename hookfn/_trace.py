"""`Trace` and `TraceMultiple`: the context managers that register, gate and remove hooks."""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.autograd.graph import get_gradient_edge as gradient_edge
from torch.utils.hooks import RemovableHandle
from typing_extensions import Self, TypeAlias

from ._capture import Args, Capture, make_capture, primary
from ._compile import CompileGuard, check_compiled, enclosing
from ._edits import Edit, EditLike
from ._errors import CaptureError, EditError, HookfnError, SpecError
from ._hook import _CAPTURE, Hook, SpecValue, to_hook
from ._parallel import ParallelContext
from ._site import Site, SiteKind
from ._sites import (
    Link,
    ModelIndex,
    _is_glob,
    _links,
    cached_index,
    index_of,
    resolve_key,
    unwrap,
)

__all__ = ["Spec", "StopForward", "Trace", "TraceMultiple", "plan"]

# Keys are `str | nn.Module`, typed `Any`: Mapping is invariant in its key type, so a precise
# key type would reject a plain `dict[str, ...]` literal, and a union of Mappings defeats
# type inference of dict literals. Keys are checked at plan time instead.
Spec: TypeAlias = Union[
    Mapping[Any, SpecValue],
    Sequence[Union[str, nn.Module]],
    str,
    nn.Module,
]
"""A spec: a mapping from layer keys to spec values, or keys alone (capture only)."""

# The run tokens whose hooks may act in the current context. Hooks of a run fire only where
# its token is active, so a concurrent call on the same model (another thread or asyncio
# task) never sees them.
_ACTIVE: contextvars.ContextVar[frozenset[object]] = contextvars.ContextVar(
    "hookfn_active", default=frozenset()
)

# Serializes hook registration and removal across threads: two threads registering on one
# module at once could otherwise draw the same handle id (PyTorch's counter is not atomic) or
# reorder a hook dictionary another registration is reading. Never taken on the hook path.
_REGISTRY = threading.RLock()

# Tokens of the runs whose ``backward=`` pass is in progress. Activation checkpointing re-runs
# forwards during backward; on accelerators the autograd engine runs them in its own worker
# threads, which do not see the run's context, so there the hooks look here instead.
#
# Each token maps to the ids of the autograd graph tasks of its own backward pass (recorded
# when the pass starts, see `_run._backpropagate`): a concurrent backward pass of another
# thread runs in a different graph task, so its re-runs never see this run's edits.
_IN_BACKWARD: dict[object, set[int]] = {}

_graph_task = torch._C._current_graph_task_id


class _Replays:
    """Maps a forward that activation checkpointing re-runs during backward to its first run.

    A hook fires in a re-run when the autograd graph task differs from the one its run's
    forward ran in (``-1``: none). The re-run applies the edits again, with the `Site` of the
    call it replays, and records nothing. A module called once per forward replays call 0; a
    module called several times is matched in the order backward re-runs checkpointed
    segments, the last one first (one call per checkpointed layer, e.g. a shared layer).
    """

    __slots__ = ("base", "seen")

    def __init__(self, base: int) -> None:
        self.base = base
        self.seen: dict[int, int] = {}

    def call(self, calls: int) -> int:
        if calls <= 1:
            return 0
        task = _graph_task()
        replayed = self.seen.get(task, 0)
        self.seen[task] = replayed + 1
        return calls - 1 - replayed % calls


_NO_REPLAYS = _Replays(-1)  # for a hook without an edit, which never replays a call


class StopForward(BaseException):
    """Raised inside the forward pass once every requested capture is taken (``stop_early``).

    It derives from `BaseException` so that a model's own ``except Exception`` cannot swallow
    it; `run_with_hooks` catches the one its run raised.
    """

    def __init__(self, token: object) -> None:
        super().__init__("hookfn: every requested capture was taken; forward stopped early")
        self.token = token


class _Stopper:
    """Counts the sites that still have to record their first call."""

    __slots__ = ("pending", "token")

    def __init__(self, token: object, sites: int) -> None:
        self.token = token
        self.pending = sites

    def site_done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            raise StopForward(self.token)


class _Planned(NamedTuple):
    name: str
    module: nn.Module
    hook: Hook
    order: int


class _CachedPlan:
    """A spec's resolved keys, kept on the model's index for the next run with the same keys.

    Only specs whose keys are all names or globs (no module objects) on an unwrapped model
    are kept. A later run reuses the entry while it is `valid`: for exact names, while every
    registered child on the way to every site is still the one it was (a module replaced
    anywhere on those paths resolves the spec anew); with a glob, whose matches depend on the
    whole model, while no module of the model changed its children (`ModelIndex.unchanged`).
    The entry holds the model's submodules, never the model itself (see `ModelIndex`).
    """

    __slots__ = (
        "by_tree",
        "captures",
        "entries",
        "last",
        "links",
        "parallels",
        "path",
        "shared",
        "sites",
    )

    def __init__(
        self,
        entries: list[tuple[int, str, nn.Module, int]],
        links: list[Link],
        by_tree: bool,
    ) -> None:
        self.entries = entries  # (position in the spec, name, module, order), in model order
        self.links = links  # every step of every exact name's path, each once
        self.by_tree = by_tree  # a glob: valid while the whole module tree is unchanged
        # Whether a key has several entries (a glob's matches share its hook).
        self.shared = len({position for position, *_ in entries}) < len(entries)
        # The plan of these keys captured (a list spec), and the plan of the latest run.
        self.captures = tuple(
            _Planned(name, module, _CAPTURE, order) for _, name, module, order in entries
        )
        self.last: list[_Planned] = list(self.captures)
        # The modules around the sites (`enclosing`, the model itself left out) and the
        # DataParallel ones among them: filled by the first `_Around` of this plan.
        self.path: list[tuple[str, nn.Module, bool]] | None = None
        self.parallels: list[nn.Module] = []
        # The `Site` objects edits receive, by (name, kind): made once for every run.
        self.sites: dict[tuple[str, str], _Sites] = {}


_MAX_CACHED_PLANS = 256  # per model; the oldest half is dropped beyond it


def _normalize_spec(spec: object) -> list[tuple[object, object]]:
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


def plan(model: nn.Module, spec: object) -> list[_Planned]:
    """Resolve and validate a whole spec before anything is registered.

    Exact names (and module objects) win over globs that match the same module; two globs,
    or two exact keys, that reach the same module are an error.

    Raises:
        HookfnError: A key names no module, a value is not understood, or two keys clash.
    """
    return _plan(model, spec)[0]


def _plan(model: nn.Module, spec: object) -> tuple[list[_Planned], _CachedPlan | None]:
    """`plan`, and the cache entry it came from or went into (None where none applies)."""
    if not isinstance(model, nn.Module):
        raise SpecError(f"expected a torch.nn.Module as the model, got {type(model).__name__}.")
    kind = type(spec)
    if kind is dict or kind is list or kind is tuple:
        # A plain dict or list: its keys, without building (key, value) pairs first.
        given: dict[object, object] | list[object] = spec  # type: ignore[assignment]
        if not given:
            return [], None
        keys = tuple(given)
        index = cached_index(model)
        if index is not None:
            try:
                entry = index.plans.get(keys)
            except TypeError:  # an unhashable key: the general path reports it
                entry = None
            if isinstance(entry, _CachedPlan):
                # Whether it still resolves the same (see `_CachedPlan`); inlined, as this
                # runs on every call, with the CPU caches cold after the last forward pass.
                if entry.by_tree:
                    valid = index.unchanged()
                else:
                    valid = True
                    for children, part, child in entry.links:
                        if children.get(part) is not child:
                            valid = False
                            break
                if valid:
                    if not isinstance(given, dict):  # keys alone: capture each
                        return list(entry.captures), entry
                    return _reuse(entry, given, keys)
        if isinstance(given, dict):
            return _resolve(model, list(given.items()), keys)
        return _resolve(model, [(key, "capture") for key in given], keys)
    items = _normalize_spec(spec)
    if not items:
        return [], None
    return _resolve(model, items, tuple([key for key, _ in items]))


def _reuse(
    entry: _CachedPlan, spec: dict[object, object], keys: tuple[object, ...]
) -> tuple[list[_Planned], _CachedPlan]:
    """The plan of a kept resolution, with the hooks of this run's spec values."""
    planned = []
    values = list(spec.values())
    made: dict[int, Hook] = {}  # a glob's hook, made once for its matches
    for (position, name, module, order), last in zip(entry.entries, entry.last, strict=True):
        value = values[position]
        if type(value) is Hook:
            hook = value
        elif entry.shared:
            found = made.get(position)
            if found is None:
                found = made[position] = to_hook(value, str(keys[position]))
            hook = found
        else:
            hook = to_hook(value, name)
        # The same hook as the last run with these keys (a spec reused as it is): its
        # planned entry is reused too.
        planned.append(last if last.hook is hook else _Planned(name, module, hook, order))
    entry.last = planned
    return planned, entry


def _resolve(
    model: nn.Module, items: list[tuple[object, object]], keys: tuple[object, ...]
) -> tuple[list[_Planned], _CachedPlan | None]:
    inner, prefix = unwrap(model)
    # id(module) -> (name, module, order, explicit, hook, key, position of the key)
    chosen: dict[int, tuple[str, nn.Module, int, bool, Hook, object, int]] = {}
    index: ModelIndex | None = None
    # The path of every exact name, while every key is a name or a glob (else the plan is
    # not kept), and whether a glob needs the whole tree unchanged.
    links: dict[int, Link] | None = {} if not prefix else None
    by_tree = False
    for position, (key, value) in enumerate(items):
        hook = to_hook(value, str(key if isinstance(key, str) else type(key).__name__))
        found: Iterable[tuple[str, nn.Module, int, bool]] | None = None
        if type(key) is str and not prefix and not _is_glob(key):
            # The common case, an exact name on an unwrapped model, without `resolve_key`'s
            # generator; a name it cannot find takes the general path for its error.
            path = _links(model, key)
            module = path[-1][2] if path else None
            if module is not None and path is not None:
                if index is None:
                    index = index_of(model)
                order = index.order.get(id(module))
                if order is None or not index.knows(module, model):
                    index = index_of(model, fresh=True)
                    order = index.order.get(id(module), len(index.names))
                if links is not None:
                    for link in path:
                        links[id(link[2])] = link
                previous = chosen.get(id(module))
                if previous is None or not previous[3]:  # a glob's match gives way
                    chosen[id(module)] = (key, module, order, True, hook, key, position)
                    continue
                found = ((key, module, order, True),)  # a clash: reported below
        if type(key) is str and _is_glob(key):
            by_tree = True
        else:
            links = None  # a module key, the root, or a name only `get_submodule` finds
        if found is None:
            found = [
                (r.name, r.module, r.order, r.explicit)
                for r in resolve_key(model, inner, prefix, key)
            ]
        for entry in found:
            module = entry[1]
            previous = chosen.get(id(module))
            if previous is not None:
                explicit = entry[3]
                if previous[3] == explicit:
                    raise SpecError(
                        f"layer {entry[0]!r} is named by two spec keys, {previous[5]!r} and "
                        f"{key!r}; give it one entry (combine edits with >>)."
                    )
                if previous[3]:
                    continue
            chosen[id(module)] = (*entry, hook, key, position)
    planned = [
        _Planned(name, module, hook, order)
        for name, module, order, _, hook, _, _ in chosen.values()
    ]
    if len(planned) > 1:
        planned.sort(key=_by_order)
    cached = None
    kept_on = cached_index(model) if links is not None else None
    if kept_on is not None and all(entry[1] is not model for entry in chosen.values()):
        cached = _CachedPlan(
            [(chosen[id(p.module)][6], p.name, p.module, p.order) for p in planned],
            list(links.values()) if links is not None else [],
            by_tree,
        )
        plans = kept_on.plans
        if len(plans) >= _MAX_CACHED_PLANS:
            for old in list(plans)[: _MAX_CACHED_PLANS // 2]:
                plans.pop(old, None)  # (another thread may have dropped it)
        plans[keys] = cached
    return planned, cached


def _by_order(planned: _Planned) -> int:
    return planned.order


def _copier(hook: Hook) -> Callable[[Tensor], Tensor]:
    """The copy of captured tensors ``hook`` asks for; `_PLAIN_COPY` for the default one."""
    if hook.detach and hook.clone and hook.device is None and hook.dtype is None:
        return _PLAIN_COPY
    return _make_copier(hook.detach, hook.clone, hook.device, hook.dtype)


@functools.lru_cache(maxsize=64)
def _make_copier(
    detach: bool, clone: bool, device: torch.device | None, dtype: torch.dtype | None
) -> Callable[[Tensor], Tensor]:
    # A pure function of the four options: made once per combination, shared by all hooks.
    def copy(t: Tensor) -> Tensor:
        if detach:
            t = t.detach()
        if device is not None or (dtype is not None and t.is_floating_point()):
            moved = t.to(device=device, dtype=dtype if t.is_floating_point() else None, copy=clone)
            return moved
        return t.clone() if clone else t

    return copy


_PLAIN_COPY = _make_copier(True, True, None, None)

# The records a trace has not made lists for: nothing is ever appended to it.
_NONE_RECORDED: Any = ()


def _copy_value(copy: Callable[[Tensor], Tensor], value: Any) -> Any:
    """``value`` with ``copy`` applied to every tensor in it, as `pytree.tree_map_only` would.

    Plain tuples, lists and dicts (an attention module's ``(out, None)``, a pre-hook's
    arguments) are walked here, many times faster than the general pytree walk, which is
    kept for every other structure (named tuples, ``ModelOutput``, registered classes).
    """
    kind = type(value)
    if kind is Tensor or isinstance(value, Tensor):
        return copy(value)
    if kind is tuple:
        return tuple([_copy_value(copy, item) for item in value])
    if kind is list:
        return [_copy_value(copy, item) for item in value]
    if kind is dict:
        return {key: _copy_value(copy, item) for key, item in value.items()}
    if value is None or kind in _ATOMS:
        return value
    return pytree.tree_map_only(Tensor, copy, value)


_ATOMS = frozenset({bool, int, float, complex, str, bytes, torch.dtype, torch.device})


def _replace_primary(value: Any, new: Tensor, name: str, kind: str) -> Any:
    """Rebuild ``value`` with its primary tensor replaced by ``new`` (see `primary`)."""
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        if hasattr(value, "_replace") and hasattr(value, "_fields"):  # namedtuple
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
    if isinstance(value, Mapping):
        first = next(iter(value))
        try:
            return type(value)(**{**value, first: new})
        except TypeError:
            rebuilt = dict(value)
            rebuilt[first] = new
            return rebuilt
    raise EditError(f"cannot replace the {kind} of layer {name!r}: {type(value).__name__}")


def _check_edit_result(x: Tensor, y: object, site: Site, edit: Edit) -> Tensor:
    if y is None:
        return x
    if not isinstance(y, Tensor):
        raise EditError(
            f"the edit {edit!r} at layer {site.name!r} ({site.kind}, call {site.call}) returned "
            f"a {type(y).__name__}; an edit must return a tensor of shape {tuple(x.shape)} "
            "(or None for 'unchanged')."
        )
    if y.shape != x.shape:
        raise EditError(
            f"the edit {edit!r} at layer {site.name!r} ({site.kind}, call {site.call}) returned "
            f"shape {tuple(y.shape)}, but the {site.kind} it edits has shape "
            f"{tuple(x.shape)}; an edit must keep the shape (use broadcasting inside it)."
        )
    if y.dtype is not x.dtype or y.device != x.device:
        return _convert_edit_result(x, y, site, edit)
    return y


def _convert_edit_result(x: Tensor, y: Tensor, site: Site, edit: Edit) -> Tensor:
    """Cast a floating-point result to the edited dtype; refuse another device or kind.

    The model's next layer expects the dtype it produced: a float64 or float16 result (an
    edit adding a float32 vector to a bfloat16 activation) is cast back. A change of kind
    (a float activation returned as int or bool, a real one as complex) or of device is
    almost surely a bug, and would fail deep inside the next layer: it is an `EditError`.
    """
    where = f"the edit {edit!r} at layer {site.name!r} ({site.kind}, call {site.call})"
    if y.device != x.device:
        raise EditError(
            f"{where} returned a tensor on {y.device}, but the {site.kind} it edits is on "
            f"{x.device}; make the edit's tensors on x.device (add() and the other "
            "combinators move theirs)."
        )
    if (x.is_floating_point() and y.is_floating_point()) or (x.is_complex() and y.is_complex()):
        return y.to(x.dtype)
    raise EditError(
        f"{where} returned dtype {y.dtype}, but the {site.kind} it edits is {x.dtype}; an edit "
        "keeps the kind of number (a floating-point result is cast back, other dtypes must "
        "match): return y.to(x.dtype) if the conversion is what you mean."
    )


def _no_primary(name: str, kind: str, value: object) -> EditError:
    return EditError(
        f"cannot edit the {kind} of layer {name!r}: it is a {type(value).__name__} with no "
        "primary tensor (a tensor, or a tuple/list/mapping whose first item is a tensor). "
        "Hook a submodule that produces a tensor instead."
    )


# Handle ids of the forward hooks hookfn registered and has not removed yet.
_OWN_FORWARD_HOOKS: set[int] = set()


def _next_hook_id() -> int:
    """A fresh hook key from PyTorch's own counter (the caller holds the registration lock).

    Hooks are inserted into the module's hook dictionaries directly (a `RemovableHandle` per
    hook costs more than the hook call itself); drawing the key from the counter PyTorch's
    handles use keeps it distinct from every key PyTorch hands out.
    """
    key = RemovableHandle.next_id
    RemovableHandle.next_id = key + 1
    return key


def _move_first(hooks: dict[int, Any], key: int) -> None:
    """Move the forward hook ``key`` after hookfn's earlier hooks and before every other one.

    Every other forward hook of the module (the user's, or a library's, such as the ones
    transformers records ``hidden_states`` with, which may predate this run) then sees the
    edited output, while nested runs keep their order: an inner run's hook runs after, and so
    sees the edits of, the runs around it. The other hooks keep their relative order.
    """
    if hasattr(hooks, "move_to_end"):
        hooks.move_to_end(key, last=False)
        earlier = sorted(k for k in hooks if k in _OWN_FORWARD_HOOKS and k != key)
        for k in reversed(earlier):  # hook ids grow with registration order
            hooks.move_to_end(k, last=False)


def _track(tensor: Tensor) -> Tensor | None:
    """A leaf copy of ``tensor`` that requires grad, or ``None`` where none can flow.

    For a gradient asked of a tensor that nothing upstream of it requires grad for (a frozen
    model, a constant): the graph then starts at the hooked layer. Layers after it stay
    attached to it, so their gradients are unaffected.
    """
    if not (torch.is_grad_enabled() and (tensor.is_floating_point() or tensor.is_complex())):
        return None
    try:
        return tensor.detach().requires_grad_()
    except RuntimeError:  # inside a torch.func transform, which tracks gradients itself
        return None


def _captures_output_only(hook: Hook) -> bool:
    """Whether ``hook`` only captures outputs (no input, no edit, no gradient)."""
    return (
        hook.output
        and not hook.input
        and hook.edit is None
        and hook.edit_input is None
        and not hook.grad
        and not hook.grad_input
        and hook.edit_grad is None
    )


def _capture_hook_with(
    token: object, outputs: list[Any], base: int, stopper: _Stopper | None, hook: Hook
) -> Callable[[nn.Module, Any, Any], None]:
    """A capture-only forward hook with the hook's copy options, counting for ``stop_early``."""
    active = _ACTIVE
    graph_task = _graph_task
    copy = _copier(hook)

    def capture_and_count(module: nn.Module, args: Any, output: Any) -> None:
        if token in active.get() and graph_task() == base:
            outputs.append(copy(output) if type(output) is Tensor else _copy_value(copy, output))
            if stopper is not None and len(outputs) == 1:
                stopper.site_done()

    return capture_and_count


def _replaying(token: object, base: int) -> bool | None:
    """Which call of a run's hook this is: None, not the run's (the gate is closed); False,
    a forward of the run; True, a re-run of it by activation checkpointing during its
    backward pass (another graph task than ``base``, the run's; see `_Replays`)."""
    if token in _ACTIVE.get():
        return _graph_task() != base
    tasks = _IN_BACKWARD.get(token)
    if tasks is None or _graph_task() not in tasks:
        return None
    return True  # a re-run in an autograd worker thread (see _IN_BACKWARD)


class _Sites:
    """Per-kind `Site` objects, made once per call index and reused.

    Kept with a cached plan (`_CachedPlan.sites`), so shared by the runs of one spec, also
    concurrent ones: made under a lock, and only for the first calls of a module (a module
    called more often, e.g. in generation, gets a fresh `Site` for each further call).
    """

    __slots__ = ("kind", "module", "name", "sites")

    KEEP = 64  # call indices whose sites are kept

    def __init__(self, name: str, module: nn.Module, kind: SiteKind) -> None:
        self.name = name
        self.module = module
        self.kind: SiteKind = kind
        self.sites: list[Site] = []

    def __getitem__(self, call: int) -> Site:
        sites = self.sites
        if call < len(sites):
            return sites[call]
        if call >= self.KEEP:
            return Site(self.name, call=call, kind=self.kind, module=self.module)
        with _SITES_LOCK:
            while len(sites) <= call:
                sites.append(Site(self.name, call=len(sites), kind=self.kind, module=self.module))
        return sites[call]


_SITES_LOCK = threading.Lock()


# Stands in for the `_Sites` of a hook that never reads one (no edit, no gradient hook).
_NO_SITES = _Sites("", nn.Module(), "output")


class _Scoped:
    """The exit shared by `Trace` and `TraceMultiple`: undo everything ``__enter__`` set up."""

    __slots__ = ()

    def _close(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._close()
        except BaseException:
            self._close()  # cut short (KeyboardInterrupt): every step is idempotent, finish
            raise


class Trace(_Scoped):
    """Hook one layer of a model for the duration of a ``with`` block.

    The original DeepHook API: ``retain_output`` / ``retain_input`` store the layer's
    output / input (``.output``, ``.input``), and ``edit_output(output)`` or
    ``edit_output(output, layer)`` may replace the output (``None`` means unchanged).
    Nothing is registered before ``__enter__``, and everything is removed on ``__exit__``,
    whatever happened in between. The hooks act only in the context (thread, asyncio task)
    that entered the block.

    Args:
        model: The model.
        layer: A dotted name from ``model.named_modules()``, or a module of the model.
        retain_output: Capture the output.
        retain_input: Capture the input.
        edit_output: An edit of the output.
        hook: Instead of the three above, a full `Hook` record.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> with Trace(model, "0", edit_output=lambda out: out * 0) as t:
        ...     y = model(torch.randn(2, 4))
        >>> bool((t.output == 0).all()), bool((y == 0).all())
        (True, True)
    """

    __slots__ = (
        "_around",
        "_base",
        "_calls",
        "_capture",
        "_context_reset",
        "_copy",
        "_grad_inputs",
        "_grad_outputs",
        "_grad_sites",
        "_handles",
        "_inputs",
        "_out_sites",
        "_outputs",
        "_owns_token",
        "_plan_cache",
        "_replays",
        "_stopper",
        "_token",
        "_used",
        "grad_targets",
        "hook",
        "module",
        "name",
    )
    name: str
    module: nn.Module
    hook: Hook
    grad_targets: list[GradientEdge]
    _around: _Around | None
    _base: int  # the autograd graph task the trace was entered in (see `_Replays`)
    # The state of `_forward_hook`, set up by `_register`: forward calls recorded, the
    # re-runs' matching (made on the first re-run), sites, and the copy of captured tensors.
    _calls: int
    _replays: _Replays | None
    _out_sites: _Sites
    _grad_sites: _Sites
    _copy: Callable[[Tensor], Tensor]
    _plan_cache: _CachedPlan | None  # where `Site` objects are kept between runs
    _capture: Capture | None
    _context_reset: contextvars.Token[frozenset[object]] | None
    _handles: list[int]
    _outputs: list[Any]
    _inputs: list[Args]
    _grad_outputs: list[Tensor | None]
    _grad_inputs: list[Tensor | None]
    _owns_token: bool
    _stopper: _Stopper | None
    _token: object
    _used: bool

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        retain_output: bool = True,
        retain_input: bool = False,
        edit_output: EditLike | None = None,
        *,
        hook: Hook | None = None,
    ) -> None:
        if hook is None:
            hook = to_hook((retain_output, retain_input, edit_output), str(layer))
        planned, cached = _plan(model, {layer: hook})
        if len(planned) != 1:
            names = ", ".join(repr(p.name) for p in planned[:4])
            raise SpecError(
                f"Trace hooks exactly one layer, but {layer!r} matches {len(planned)} "
                f"({names}, ...); use TraceMultiple for several."
            )
        around = _Around(model, planned, None, cached)  # may refuse compiled code
        self._init(planned[0], token=None, cache=cached)
        self._around = around

    @classmethod
    def _from_plan(
        cls,
        planned: _Planned,
        token: object,
        stopper: _Stopper | None,
        grad_targets: list[GradientEdge],
        cache: _CachedPlan | None,
    ) -> Trace:
        """A trace of one site of a `TraceMultiple`, which owns the token (the lean path)."""
        self = cls.__new__(cls)
        self.name, self.module, self.hook, _ = planned
        self._plan_cache = cache
        self._owns_token = False
        self._token = token
        self._stopper = stopper
        self.grad_targets = grad_targets
        self._handles = []
        self._context_reset = None
        self._around = None
        self._outputs = []
        # Lists for these are made only by a registration that records into them.
        self._inputs = self._grad_outputs = self._grad_inputs = _NONE_RECORDED
        self._capture = None
        self._used = False
        return self

    def _init(
        self,
        planned: _Planned,
        *,
        token: object | None,
        stopper: _Stopper | None = None,
        grad_targets: list[GradientEdge] | None = None,
        cache: _CachedPlan | None = None,
    ) -> None:
        self._plan_cache = cache
        self.name = planned.name
        self.module = planned.module
        self.hook = planned.hook
        self._owns_token = token is None
        self._token = object() if token is None else token
        self._stopper = stopper
        # Gradient edges of the tensors given gradient hooks, for `run_with_hooks(backward=)`;
        # taken as the hook fires, so an in-place op after the module cannot move them.
        self.grad_targets = [] if grad_targets is None else grad_targets
        # Keys of the hooks this trace inserted into the module's hook dictionaries.
        self._handles = []
        self._context_reset = None
        self._around = None
        self._reset_records()
        self._used = False  # whether a registration may have written to the records

    def _reset_records(self) -> None:
        self._outputs = []
        self._inputs = []
        self._grad_outputs = []
        self._grad_inputs = []
        self._capture = None

    # -- registration -------------------------------------------------------------------

    def _register(self, base: int) -> None:
        """Insert this trace's hooks; the caller holds the registration lock.

        ``base`` is the autograd graph task the run is entered in (see `_Replays`). On an
        error (or an interrupt) part of the hooks may be in place: the caller cleans up with
        `_remove`, which finds every one of them.
        """
        if self._handles:
            raise HookfnError(
                f"the Trace of layer {self.name!r} is already active; a Trace is entered once "
                "at a time (make a new one to nest)."
            )
        if self._used:
            self._reset_records()  # fresh records: a Capture taken earlier keeps its own
        self._used = True
        if self._owns_token:
            self.grad_targets.clear()
        hook = self.hook
        # A key is recorded before its hook is inserted, so that `_remove` finds every hook
        # (also after an interrupt between the two).
        keys = self._handles
        module = self.module
        # (An edit's hook is told apart at once: the capture-only tests are not run for it.)
        capture_only = hook is _CAPTURE or (hook.edit is None and _captures_output_only(hook))
        if capture_only and self._stopper is None and _copier(hook) is _PLAIN_COPY:
            self._base = base
            fn: Callable[[nn.Module, Any, Any], Any] = self._capture_output
        elif capture_only:
            fn = _capture_hook_with(self._token, self._outputs, base, self._stopper, hook)
        else:
            if hook.input or hook.edit_input is not None or hook.grad_input:  # needs_pre_hook
                if self._inputs is _NONE_RECORDED:
                    self._inputs, self._grad_inputs = [], []
                pre = self._make_pre_hook()
                key = _next_hook_id()
                keys.append(key)
                module._forward_pre_hooks_with_kwargs[key] = True
                module._forward_pre_hooks[key] = pre
            if not (
                hook.output or hook.edit is not None or hook.grad or hook.edit_grad is not None
            ):
                return  # (not needs_forward_hook)
            self._base = base
            self._calls = 0
            self._replays = None
            self._out_sites = self._sites_of("output") if hook.edit is not None else _NO_SITES
            wants_grad = hook.grad or hook.edit_grad is not None
            if wants_grad and self._grad_outputs is _NONE_RECORDED:
                self._grad_outputs = []
            self._grad_sites = self._sites_of("grad_output") if wants_grad else _NO_SITES
            self._copy = _copier(hook)
            fn = self._forward_hook
        key = _next_hook_id()
        keys.append(key)
        _OWN_FORWARD_HOOKS.add(key)
        hooks = module._forward_hooks
        hooks[key] = fn
        if len(hooks) > 1:  # alone in the dictionary (the common case), nothing to reorder
            _move_first(hooks, key)

    def _remove(self) -> None:
        """Remove this trace's hooks; the caller holds the registration lock.

        Resumable: a key leaves the list only once its hook is removed (removing it twice is
        a no-op), so a cleanup cut short by an interrupt can simply run again.
        """
        keys = self._handles
        if not keys:
            return
        module = self.module
        forward = module._forward_hooks
        while keys:
            key = keys[-1]
            if forward.pop(key, None) is None:  # a pre-hook's key
                module._forward_pre_hooks.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
            _OWN_FORWARD_HOOKS.discard(key)
            keys.pop()

    def _close(self) -> None:
        """Remove everything `__enter__` set up; idempotent, so it can be run again."""
        with _REGISTRY:
            self._remove()
        if self._owns_token:
            if self._around is not None:
                self._around.detach()
            reset, self._context_reset = self._context_reset, None
            _deactivate(self._token, reset)

    def __enter__(self) -> Self:
        if self._handles:
            raise HookfnError(
                f"the Trace of layer {self.name!r} is already active; a Trace is entered once "
                "at a time (make a new one to nest)."
            )
        try:
            with _REGISTRY:
                self._register(_graph_task())
            if self._owns_token:
                if self._around is not None:
                    self._around.attach(self._token)
                self._context_reset = _activate(self._token)
            return self
        except BaseException:
            self._close()  # also after a KeyboardInterrupt: nothing stays registered
            raise

    # -- the hook path ------------------------------------------------------------------

    def _capture_output(self, module: nn.Module, args: Any, output: Any) -> None:
        """The forward hook of a site that only captures its output, with the default copy:
        the most common hook, kept to the fewest steps (a bound method: no closure to make).

        A checkpointed forward re-run during backward (another graph task than the run's, or
        an autograd worker thread, where the run's token is not active) records nothing, and
        a capture has nothing to re-apply, so one test covers every case.
        """
        if self._token in _ACTIVE.get() and _graph_task() == self._base:
            if type(output) is Tensor:
                self._outputs.append(output.detach().clone())
            else:
                self._outputs.append(_copy_value(_PLAIN_COPY, output))

    # A static method: a hook closure that held a bound method would tie the trace, and the
    # tensors it recorded, into a reference cycle that only the cyclic GC frees.
    @staticmethod
    def _grad_hook(
        records: list[Tensor | None],
        slot: int,
        edit: Edit | None,
        site: Site,
        keep: bool,
        copy: Callable[[Tensor], Tensor],
    ) -> Callable[[Tensor], Tensor | None]:
        def on_grad(grad: Tensor) -> Tensor | None:
            new = None
            if edit is not None:
                new = _check_edit_result(grad, edit(grad, site), site, edit)
                grad = new
            if keep:
                records[slot] = copy(grad)
            return new

        return on_grad

    def _forward_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """The forward hook of every site but the capture-only ones (`_capture_output`).

        A bound method, whose state `_register` sets up in slots: no closure to make per
        site and run.
        """
        # `_replaying`, inlined for a forward of the run (this hook runs on every call of an
        # edited module, with the CPU caches cold after the layers before it).
        replaying: bool | None = False
        if self._token not in _ACTIVE.get() or _graph_task() != self._base:
            replaying = _replaying(self._token, self._base)
            if replaying is None:
                return None
        hook = self.hook
        edit = hook.edit
        if replaying:
            # Activation checkpointing re-runs this forward during backward: apply the edit
            # again, identically, and record nothing (the first run did).
            if edit is None:
                return None
            replays = self._replays
            if replays is None:
                replays = self._replays = _Replays(self._base)
            call = replays.call(self._calls)
        else:
            call = self._calls
            self._calls = call + 1
        result = None
        if edit is not None:
            x = output if type(output) is Tensor else primary(output)
            if x is None:
                raise _no_primary(self.name, "output", output)
            sites = self._out_sites.sites
            site = sites[call] if call < len(sites) else self._out_sites[call]
            y = edit(x, site)
            # The common result (a tensor like x) passes without a call; the rest is checked.
            if not (
                type(y) is Tensor
                and y.shape == x.shape
                and y.dtype is x.dtype
                and y.device == x.device
            ):
                y = _check_edit_result(x, y, site, edit)
            if y is not x:
                if type(output) is not Tensor:
                    y = _replace_primary(output, y, self.name, "output")
                output = result = y
        if replaying:
            return result
        if hook.grad or hook.edit_grad is not None:
            tensor = output if type(output) is Tensor else primary(output)
            grads = self._grad_outputs
            slot = len(grads)
            grads.append(None)
            if tensor is not None and not tensor.requires_grad:
                tracked = _track(tensor)
                if tracked is not None:
                    tensor = tracked
                    output = result = _replace_primary(output, tracked, self.name, "output")
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(  # type: ignore[no-untyped-call]
                    self._grad_hook(
                        grads, slot, hook.edit_grad, self._grad_sites[call], hook.grad, self._copy
                    )
                )
                self.grad_targets.append(gradient_edge(tensor))
        if hook.output:
            copy = self._copy
            if copy is _PLAIN_COPY and type(output) is Tensor:
                self._outputs.append(output.detach().clone())
            else:
                self._outputs.append(
                    copy(output) if type(output) is Tensor else _copy_value(copy, output)
                )
            if call == 0 and self._stopper is not None:
                self._stopper.site_done()
        return result

    def _sites_of(self, kind: SiteKind) -> _Sites:
        """The `Site` objects of this trace's ``kind``: kept with a cached plan, else new."""
        cache = self._plan_cache
        if cache is None:
            return _Sites(self.name, self.module, kind)
        key = (self.name, kind)
        sites = cache.sites.get(key)
        if sites is None or sites.module is not self.module:
            sites = cache.sites[key] = _Sites(self.name, self.module, kind)
        return sites

    def _make_pre_hook(self) -> Callable[[nn.Module, Any, Any], Any]:
        token = self._token
        hook = self.hook
        edit = hook.edit_input
        keep_input = hook.input
        keep_grad = hook.grad_input
        wants_grad = keep_grad
        inputs = self._inputs
        grads = self._grad_inputs
        copy = _copier(hook)
        name = self.name
        sites = self._sites_of("input") if edit is not None else _NO_SITES
        grad_sites = self._sites_of("grad_input") if wants_grad else _NO_SITES
        stopper = self._stopper if (hook.input and not hook.output) else None
        grad_hook = self._grad_hook
        targets = self.grad_targets
        calls = 0
        base = _graph_task()
        # Replays are only looked up to re-apply an edit (see `_Replays`).
        replays = _Replays(base) if edit is not None else _NO_REPLAYS

        # ``kwargs`` has a default: a module call on another thread that took its snapshot
        # of the hooks just before this run removed this one may call it as a hook without
        # kwargs (PyTorch checks the with-kwargs flag after the snapshot); the gate below
        # then returns at once.
        def pre_hook(module: nn.Module, args: Any, kwargs: Any = None) -> Any:
            nonlocal calls
            replaying = _replaying(token, base)
            if replaying is None:
                return None
            if replaying:
                # A re-run by activation checkpointing (see forward_hook): edit, record nothing.
                if edit is None:
                    return None
                call = replays.call(calls)
            else:
                call = calls
                calls += 1
            result = None
            if edit is not None or wants_grad:
                packed = Args(*args, **kwargs)
                x = primary(packed)
                if x is None:
                    raise _no_primary(name, "input", packed)
                y = x
                if edit is not None:
                    site = sites[call]
                    y = _check_edit_result(x, edit(x, site), site, edit)
                if wants_grad and not replaying:
                    slot = len(grads)
                    grads.append(None)
                    # A fresh alias, so the gradient is the one flowing into this module alone,
                    # not the total of every consumer of the input tensor. Under no_grad (e.g.
                    # reentrant checkpointing) no gradient can reach it.
                    alias = None
                    if torch.is_grad_enabled():
                        alias = y.view_as(y) if y.requires_grad else _track(y)
                    if alias is not None and alias.requires_grad:
                        y = alias
                        y.register_hook(  # type: ignore[no-untyped-call]
                            grad_hook(grads, slot, None, grad_sites[call], keep_grad, copy)
                        )
                        targets.append(gradient_edge(y))
                if y is not x:
                    if args:
                        args = (_replace_primary(args[0], y, name, "input"), *args[1:])
                    else:
                        first = next(iter(kwargs))
                        kwargs = {
                            **kwargs,
                            first: _replace_primary(kwargs[first], y, name, "input"),
                        }
                    result = (args, kwargs)
            if replaying:
                return result
            if keep_input:
                inputs.append(Args(*_copy_value(copy, args), **_copy_value(copy, kwargs)))
                if call == 0 and stopper is not None:
                    stopper.site_done()
            return result

        return pre_hook

    # -- results ------------------------------------------------------------------------

    @property
    def capture(self) -> Capture:
        """Everything this trace recorded, as an immutable `Capture`."""
        if self._capture is not None:
            return self._capture
        capture = make_capture(
            self.name,
            tuple(self._outputs),
            tuple(self._inputs),
            tuple(self._grad_outputs),
            tuple(self._grad_inputs),
        )
        if not self._handles:
            self._capture = capture  # the trace is closed: nothing can change any more
        return capture

    @property
    def output(self) -> Tensor:
        """The layer's (edited) primary output tensor (see `Capture.output`)."""
        if not self.hook.output:
            raise CaptureError(
                f"the output of layer {self.name!r} was not retained; pass "
                "retain_output=True (or Hook(output=True))."
            )
        return self.capture.output

    @property
    def input(self) -> Tensor:
        """The layer's primary input tensor: its first argument (see `Capture.input`)."""
        if not self.hook.input:
            raise CaptureError(
                f"the input of layer {self.name!r} was not retained; pass "
                "retain_input=True (or Hook(input=True))."
            )
        return self.capture.input

    def __repr__(self) -> str:
        state = "active" if self._handles else "closed"
        return f"Trace({self.name!r}, {self.hook!r}, {state})"


def _activate(token: object) -> contextvars.Token[frozenset[object]]:
    """Add ``token`` to the runs active in this context; `_deactivate` undoes it."""
    return _ACTIVE.set(_ACTIVE.get() | {token})


def _deactivate(token: object, reset: contextvars.Token[frozenset[object]] | None) -> None:
    """Drop ``token`` from the active set; idempotent.

    The context is reset exactly (``ContextVar.reset``) when nothing changed it since the
    token was added; otherwise, e.g. when nested blocks exit out of order or the exit runs in
    another context, only this token is dropped, and every other run stays active.
    """
    current = _ACTIVE.get()
    if token not in current:
        return
    if reset is not None:
        old = reset.old_value
        # The set is unchanged since `_activate` when it is the old one plus this token.
        if old is contextvars.Token.MISSING:
            unchanged = len(current) == 1
        else:
            unchanged = len(current) == len(old) + 1 and old <= current
        if unchanged:
            try:
                _ACTIVE.reset(reset)
                return
            except (ValueError, RuntimeError):
                pass  # exited in another context than it was entered in
    _ACTIVE.set(current - {token})


class _Around:
    """What a run sets up around its hooks (see `hookfn._compile`, `hookfn._parallel`).

    Built once, before anything is registered: it refuses hooked modules inside compiled
    code it cannot bypass (`CompileError`), guards the ``torch.compile`` wrappers of the
    model, and finds the ``DataParallel`` modules whose worker threads must see the run.
    """

    __slots__ = ("guard", "parallel")

    def __init__(
        self,
        model: nn.Module,
        planned: Sequence[_Planned],
        eager_root: nn.Module | None = None,
        cached: _CachedPlan | None = None,
    ) -> None:
        if not planned:  # nothing will be hooked: no compiled code or worker thread to mind
            self.guard = self.parallel = None
            return
        if cached is None:
            path = enclosing(model, [(p.name, p.module) for p in planned])
            parallels: list[nn.Module] = [
                module for _, module, _ in path if isinstance(module, nn.DataParallel)
            ]
        else:
            # The path of a cached plan is kept with it; the model itself (not kept, see
            # `_CachedPlan`) is checked in front of it. Compilation is checked every run.
            if cached.path is None:
                found = enclosing(model, [(p.name, p.module) for p in planned])
                cached.path = [entry for entry in found if entry[1] is not model]
                cached.parallels = [m for _, m, _ in cached.path if isinstance(m, nn.DataParallel)]
            path = [("", model, False), *cached.path]
            parallels = cached.parallels
        wrappers = check_compiled(model, path, eager_root=eager_root)
        # None where there is nothing to set up (the common case): attach and detach are free.
        self.guard = CompileGuard(wrappers) if wrappers else None
        self.parallel = ParallelContext(parallels) if parallels else None

    def attach(self, token: object) -> None:
        guard, parallel = self.guard, self.parallel
        if guard is None and parallel is None:
            return
        with _REGISTRY:
            if parallel is not None:
                parallel.attach()
            if guard is not None:
                guard.attach(_ACTIVE, token)

    def detach(self) -> None:
        guard, parallel = self.guard, self.parallel
        if guard is None and parallel is None:
            return
        with _REGISTRY:
            if guard is not None:
                guard.detach()
            if parallel is not None:
                parallel.detach()


_NOTHING_AROUND = _Around(nn.Module(), [])


class TraceMultiple(_Scoped, Mapping[str, Trace]):
    """Hook several layers for the duration of a ``with`` block (the DeepHook API).

    ``layers`` maps layer keys (names, globs, module objects) to spec values — the DeepHook
    tuple ``(retain_output, retain_input, edit_fn)``, ``"capture"``, an edit or a `Hook`.
    The whole spec is validated before any hook is registered; every hook is removed on
    exit, also when the block raises. ``tm[name]`` is the `Trace` of a concrete layer name.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> with TraceMultiple(model, {"0": (True, True, None), "1": (True, False, None)}) as tm:
        ...     y = model(torch.randn(2, 4))
        >>> torch.equal(tm["1"].output, y), tm["0"].input.shape
        (True, torch.Size([2, 4]))
    """

    __slots__ = (
        "_around",
        "_context_reset",
        "_entered",
        "_stopper",
        "_token",
        "_traces",
        "grad_targets",
        "model",
    )
    _context_reset: contextvars.Token[frozenset[object]] | None

    def __init__(
        self,
        model: nn.Module,
        layers: Spec,
        *,
        stop_early: bool = False,
        _eager_root: nn.Module | None = None,
    ) -> None:
        planned, cached = _plan(model, layers)
        self.model = model
        token = self._token = object()
        self._context_reset = None
        self._entered = False
        targets: list[GradientEdge] = []
        self.grad_targets = targets
        if not planned:  # nothing to hook: nothing to check, count or make
            self._around = _NOTHING_AROUND
            self._stopper = None
            self._traces = {}
            return
        # `run_with_hooks` passes the in-place compiled module it calls eagerly (_compile.py).
        if cached is not None and cached.path is not None and not cached.parallels:
            # A kept plan around which nothing is set up: only compilation in place can
            # have changed since, which is checked here without building the path again.
            compiled = model is not _eager_root and model._compiled_call_impl is not None
            if not compiled:
                for _, module, _ in cached.path:
                    if module._compiled_call_impl is not None:
                        compiled = True
                        break
            around = _Around(model, planned, _eager_root, cached) if compiled else None
        else:
            around = _Around(model, planned, _eager_root, cached)
        self._around = _NOTHING_AROUND if around is None else around
        capturing = sum(1 for p in planned if p.hook.captures_forward) if stop_early else 0
        stopper = self._stopper = _Stopper(token, capturing) if capturing else None
        from_plan = Trace._from_plan
        self._traces = {p.name: from_plan(p, token, stopper, targets, cached) for p in planned}

    def __enter__(self) -> Self:
        if self._entered:
            raise HookfnError("this TraceMultiple is already active; make a new one to nest.")
        self._entered = True
        traces = self._traces
        if not traces:
            return self  # nothing to register, nothing to gate
        try:
            if self._stopper is not None:
                self._stopper.pending = sum(1 for t in traces.values() if t.hook.captures_forward)
            self.grad_targets.clear()
            base = _graph_task()
            with _REGISTRY:
                for trace in traces.values():
                    trace._register(base)
            if self._around is not _NOTHING_AROUND:
                self._around.attach(self._token)
            self._context_reset = _activate(self._token)
            return self
        except BaseException:
            self._close()  # also after a KeyboardInterrupt: nothing stays registered
            raise

    def _close(self) -> None:
        """Remove everything `__enter__` set up; idempotent, so it can be run again."""
        traces = self._traces
        if traces:
            with _REGISTRY:
                for trace in traces.values():
                    trace._remove()
            if self._around is not _NOTHING_AROUND:
                self._around.detach()
            _IN_BACKWARD.pop(self._token, None)  # (if an interrupt cut `backward=` short)
            reset, self._context_reset = self._context_reset, None
            _deactivate(self._token, reset)
        self._entered = False

    def __getitem__(self, name: str) -> Trace:
        try:
            return self._traces[name]
        except KeyError:
            raise CaptureError(
                f"no traced layer named {name!r}; traced layers: {list(self._traces)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._traces

    def get(self, name: str, default: Any = None) -> Any:
        """``tm[name]`` if ``name`` is a traced layer, else ``default``."""
        return self._traces.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._traces)

    def __len__(self) -> int:
        return len(self._traces)

    @property
    def token(self) -> object:
        """The token that gates this context's hooks (see `StopForward`)."""
        return self._token

    def captures(self) -> dict[str, Capture]:
        """The `Capture` of every traced layer, keyed by layer name, in model order."""
        result = {}
        for name, trace in self._traces.items():  # (a loop: no comprehension frame to enter)
            capture = trace._capture
            result[name] = trace.capture if capture is None else capture
        return result

    def __repr__(self) -> str:
        return f"TraceMultiple({list(self._traces)})"
