"""`Trace` and `TraceMultiple`: the context managers that register, gate and remove hooks."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Union

import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import Self, TypeAlias

from ._capture import Args, Capture, primary
from ._edits import Edit, EditLike
from ._errors import CaptureError, EditError, HookfnError, SpecError
from ._hook import Hook, SpecValue, to_hook
from ._site import Site, SiteKind
from ._sites import Resolved, resolve_key, unwrap

__all__ = ["Spec", "StopForward", "Trace", "TraceMultiple", "plan"]

Spec: TypeAlias = Union[
    Mapping[Union[str, nn.Module], SpecValue], Sequence[Union[str, nn.Module]], str, nn.Module
]
"""A spec: a mapping from layer keys to spec values, or keys alone (capture only)."""

# The run tokens whose hooks may act in the current context. Hooks of a run fire only where
# its token is active, so a concurrent call on the same model (another thread or asyncio
# task) never sees them.
_ACTIVE: contextvars.ContextVar[frozenset[object]] = contextvars.ContextVar(
    "hookfn_active", default=frozenset()
)


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


@dataclass(frozen=True, slots=True)
class _Planned:
    name: str
    module: nn.Module
    hook: Hook
    order: int


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
    if not isinstance(model, nn.Module):
        raise SpecError(f"expected a torch.nn.Module as the model, got {type(model).__name__}.")
    inner, prefix = unwrap(model)
    chosen: dict[int, tuple[Resolved, Hook, object]] = {}
    for key, value in _normalize_spec(spec):
        label = key if isinstance(key, str) else type(key).__name__
        hook = to_hook(value, str(label))
        for resolved in resolve_key(model, inner, prefix, key):
            previous = chosen.get(id(resolved.module))
            if previous is not None:
                old, _, old_key = previous
                if old.explicit == resolved.explicit:
                    raise SpecError(
                        f"layer {resolved.name!r} is named by two spec keys, {old_key!r} and "
                        f"{key!r}; give it one entry (combine edits with >>)."
                    )
                if old.explicit:
                    continue
            chosen[id(resolved.module)] = (resolved, hook, key)
    planned = [
        _Planned(resolved.name, resolved.module, hook, resolved.order)
        for resolved, hook, _ in chosen.values()
    ]
    planned.sort(key=lambda p: p.order)
    return planned


def _copier(hook: Hook) -> Callable[[Tensor], Tensor]:
    detach, clone, device, dtype = hook.detach, hook.clone, hook.device, hook.dtype

    def copy(t: Tensor) -> Tensor:
        if detach:
            t = t.detach()
        if device is not None or (dtype is not None and t.is_floating_point()):
            moved = t.to(device=device, dtype=dtype if t.is_floating_point() else None, copy=clone)
            return moved
        return t.clone() if clone else t

    return copy


def _copy_value(copy: Callable[[Tensor], Tensor], value: Any) -> Any:
    if isinstance(value, Tensor):
        return copy(value)
    return pytree.tree_map_only(Tensor, copy, value)


def _replace_primary(value: Any, new: Tensor, name: str, kind: str) -> Any:
    """Rebuild ``value`` with its primary tensor replaced by ``new`` (see `primary`)."""
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        if hasattr(value, "_replace") and hasattr(value, "_fields"):  # namedtuple
            return value._replace(**{value._fields[0]: new})
        return (new, *value[1:])
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
    return y


def _no_primary(name: str, kind: str, value: object) -> EditError:
    return EditError(
        f"cannot edit the {kind} of layer {name!r}: it is a {type(value).__name__} with no "
        "primary tensor (a tensor, or a tuple/list/mapping whose first item is a tensor). "
        "Hook a submodule that produces a tensor instead."
    )


class _Sites:
    """Per-kind `Site` objects, made once per call index and reused."""

    __slots__ = ("kind", "module", "name", "sites")

    def __init__(self, name: str, module: nn.Module, kind: SiteKind) -> None:
        self.name = name
        self.module = module
        self.kind: SiteKind = kind
        self.sites: list[Site] = []

    def __getitem__(self, call: int) -> Site:
        sites = self.sites
        while len(sites) <= call:
            sites.append(Site(self.name, call=len(sites), kind=self.kind, module=self.module))
        return sites[call]


class Trace:
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
        planned = plan(model, {layer: hook})
        if len(planned) != 1:
            names = ", ".join(repr(p.name) for p in planned[:4])
            raise SpecError(
                f"Trace hooks exactly one layer, but {layer!r} matches {len(planned)} "
                f"({names}, ...); use TraceMultiple for several."
            )
        self._init(planned[0], token=None)

    @classmethod
    def _from_plan(
        cls,
        planned: _Planned,
        token: object,
        stopper: _Stopper | None,
        grad_targets: list[Tensor],
    ) -> Trace:
        self = cls.__new__(cls)
        self._init(planned, token=token, stopper=stopper, grad_targets=grad_targets)
        return self

    def _init(
        self,
        planned: _Planned,
        *,
        token: object | None,
        stopper: _Stopper | None = None,
        grad_targets: list[Tensor] | None = None,
    ) -> None:
        self.name = planned.name
        self.module = planned.module
        self.hook = planned.hook
        self._owns_token = token is None
        self._token: object = object() if token is None else token
        self._stopper = stopper
        # Tensors whose gradient hooks were registered, for `run_with_hooks(backward=...)`.
        self.grad_targets: list[Tensor] = [] if grad_targets is None else grad_targets
        self._handles: list[RemovableHandle] = []
        self._context_reset: contextvars.Token[frozenset[object]] | None = None
        self._reset_records()

    def _reset_records(self) -> None:
        self._outputs: list[Any] = []
        self._inputs: list[Args] = []
        self._grad_outputs: list[Tensor | None] = []
        self._grad_inputs: list[Tensor | None] = []
        self._capture: Capture | None = None

    # -- registration -------------------------------------------------------------------

    def _register(self) -> None:
        if self._handles:
            raise HookfnError(
                f"the Trace of layer {self.name!r} is already active; a Trace is entered once "
                "at a time (make a new one to nest)."
            )
        self._reset_records()
        if self._owns_token:
            self.grad_targets.clear()
        hook = self.hook
        try:
            if hook.needs_pre_hook:
                self._handles.append(
                    self.module.register_forward_pre_hook(self._make_pre_hook(), with_kwargs=True)
                )
            if hook.needs_forward_hook:
                self._handles.append(self.module.register_forward_hook(self._make_forward_hook()))
        except BaseException:
            self._remove()
            raise

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> Self:
        self._register()
        if self._owns_token:
            self._context_reset = _ACTIVE.set(_ACTIVE.get() | {self._token})
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()
        if self._owns_token:
            _deactivate(self._token, self._context_reset)
            self._context_reset = None

    # -- the hook path ------------------------------------------------------------------

    def _grad_hook(
        self,
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

    def _make_forward_hook(self) -> Callable[[nn.Module, Any, Any], Any]:
        active = _ACTIVE
        token = self._token
        hook = self.hook
        edit = hook.edit
        keep_output = hook.output
        keep_grad = hook.grad
        edit_grad = hook.edit_grad
        wants_grad = keep_grad or edit_grad is not None
        outputs = self._outputs
        grads = self._grad_outputs
        copy = _copier(hook)
        name = self.name
        sites = _Sites(name, self.module, "output")
        grad_sites = _Sites(name, self.module, "grad_output")
        stopper = self._stopper if hook.output else None
        grad_hook = self._grad_hook
        targets = self.grad_targets
        calls = 0

        def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
            nonlocal calls
            if token not in active.get():
                return None
            call = calls
            calls += 1
            result = None
            if edit is not None:
                x = output if type(output) is Tensor else primary(output)
                if x is None:
                    raise _no_primary(name, "output", output)
                site = sites[call]
                y = _check_edit_result(x, edit(x, site), site, edit)
                if y is not x:
                    output = result = _replace_primary(output, y, name, "output")
            if wants_grad:
                tensor = output if type(output) is Tensor else primary(output)
                slot = len(grads)
                grads.append(None)
                if tensor is not None and tensor.requires_grad:
                    tensor.register_hook(  # type: ignore[no-untyped-call]
                        grad_hook(grads, slot, edit_grad, grad_sites[call], keep_grad, copy)
                    )
                    targets.append(tensor)
            if keep_output:
                outputs.append(
                    copy(output) if type(output) is Tensor else _copy_value(copy, output)
                )
                if call == 0 and stopper is not None:
                    stopper.site_done()
            return result

        return forward_hook

    def _make_pre_hook(self) -> Callable[[nn.Module, Any, Any], Any]:
        active = _ACTIVE
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
        sites = _Sites(name, self.module, "input")
        grad_sites = _Sites(name, self.module, "grad_input")
        stopper = self._stopper if (hook.input and not hook.output) else None
        grad_hook = self._grad_hook
        targets = self.grad_targets
        calls = 0

        def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> Any:
            nonlocal calls
            if token not in active.get():
                return None
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
                if wants_grad:
                    slot = len(grads)
                    grads.append(None)
                    if y.requires_grad:
                        # A fresh alias, so the gradient is the one flowing into this module
                        # alone, not the total of every consumer of the input tensor.
                        y = y.view_as(y)
                        y.register_hook(  # type: ignore[no-untyped-call]
                            grad_hook(grads, slot, None, grad_sites[call], keep_grad, copy)
                        )
                        targets.append(y)
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
        capture = Capture(
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


def _deactivate(token: object, reset: contextvars.Token[frozenset[object]] | None) -> None:
    if reset is not None:
        try:
            _ACTIVE.reset(reset)
            return
        except ValueError:
            pass  # exited in another context than it was entered in
    _ACTIVE.set(_ACTIVE.get() - {token})


class TraceMultiple(Mapping[str, Trace]):
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

    def __init__(self, model: nn.Module, layers: Spec, *, stop_early: bool = False) -> None:
        planned = plan(model, layers)
        self.model = model
        self._token = object()
        capturing = sum(1 for p in planned if p.hook.captures_forward)
        self._stopper = _Stopper(self._token, capturing) if stop_early and capturing else None
        self.grad_targets: list[Tensor] = []
        self._traces = {
            p.name: Trace._from_plan(p, self._token, self._stopper, self.grad_targets)
            for p in planned
        }
        self._context_reset: contextvars.Token[frozenset[object]] | None = None
        self._entered = False

    def __enter__(self) -> Self:
        if self._entered:
            raise HookfnError("this TraceMultiple is already active; make a new one to nest.")
        if self._stopper is not None:
            self._stopper.pending = sum(1 for t in self._traces.values() if t.hook.captures_forward)
        self.grad_targets.clear()
        registered: list[Trace] = []
        try:
            for trace in self._traces.values():
                trace._register()
                registered.append(trace)
        except BaseException:
            for trace in registered:
                trace._remove()
            raise
        self._entered = True
        self._context_reset = _ACTIVE.set(_ACTIVE.get() | {self._token})
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            for trace in self._traces.values():
                trace._remove()
        finally:
            _deactivate(self._token, self._context_reset)
            self._context_reset = None
            self._entered = False

    def __getitem__(self, name: str) -> Trace:
        try:
            return self._traces[name]
        except KeyError:
            raise CaptureError(
                f"no traced layer named {name!r}; traced layers: {list(self._traces)}"
            ) from None

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
        return {name: trace.capture for name, trace in self._traces.items()}

    def __repr__(self) -> str:
        return f"TraceMultiple({list(self._traces)})"
