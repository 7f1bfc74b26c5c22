"""`TraceMultiple` and `Trace`: the context managers that open and close a run.

A run is planned when the context manager is made (`hookfn._plan`: nothing is registered
if the spec is wrong), and opened on each ``__enter__``: a fresh token, a `Recorder` per
site (`hookfn._hooks`), the guards around the model. ``__exit__`` removes all of it.
`Trace` is a `TraceMultiple` of one site.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from typing_extensions import Self

from ._capture import Capture
from ._compile import CompileGuard, check_compiled
from ._edits import EditLike, Splice, splice
from ._edits._cache import Captures
from ._errors import CaptureError, EditError, HookfnError, NotCalledWarning, SpecError
from ._gate import (
    DEFERRAL,
    GRAFTS,
    IN_BACKWARD,
    REGISTRY,
    StopForward,
    Stopper,
    activate,
    deactivate,
    graph_task,
)
from ._hook import Hook, to_hook
from ._hooks import Recorder
from ._ops import LIVE, PROBES, Interceptor, unwind
from ._parallel import ParallelContext
from ._plan import Planned, Spec, make_plan

__all__ = ["Trace", "TraceMultiple", "spliced"]


class _PendingExit:
    """The bound ``__exit__`` of a run, taken by the ``with`` statement before it enters.

    If an interrupt (``KeyboardInterrupt``) arrives as ``__exit__`` begins, before its first
    line runs, the ``with`` statement drops this object without a completed call: it then
    closes the run itself, so no hook outlives the block. It closes only the run opened
    right after it was made (or the one open as it was made), never a later one of the
    same object, and a call after that run has ended does nothing.
    """

    __slots__ = ("done", "owner", "run")

    def __init__(self, owner: TraceMultiple) -> None:
        self.owner = owner
        # The run the ``with`` statement is about to open; the open one if taken inside it.
        self.run = owner._runs if owner._token is not None else owner._runs + 1
        self.done = False

    def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        owner = self.owner
        suppress = owner._exit(exc_type, exc, tb) if owner._runs == self.run else False
        self.done = True
        return suppress

    def __del__(self) -> None:
        owner = getattr(self, "owner", None)  # (None: an interrupt stopped __init__)
        if owner is None or getattr(self, "done", True):
            return
        if owner._runs == self.run and owner._token is not None:
            # (an error here, at interpreter exit say, could only be printed and ignored)
            with contextlib.suppress(Exception):
                owner._close()


class _ExitMethod:
    """``__exit__``: a `_PendingExit` for each access on an instance (see there); called on
    the class (``type(cm).__exit__(cm, ...)``, as `contextlib.ExitStack` does), a plain
    exit."""

    def __get__(self, owner: TraceMultiple | None, cls: type | None = None) -> Any:
        if owner is None:
            return self
        return _PendingExit(owner)

    def __call__(
        self,
        owner: TraceMultiple,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return owner._exit(exc_type, exc, tb)


class TraceMultiple(Mapping[str, "Trace"]):
    """Hook several layers for the duration of a ``with`` block (the DeepHook API).

    ``layers`` maps layer keys (names, globs, module objects) to spec values: the DeepHook
    tuple ``(retain_output, retain_input, edit_fn)``, ``"capture"``, an edit or a `Hook`.
    The whole spec is validated before any hook is registered; every hook is removed on
    exit, also when the block raises. ``tm[name]`` is the `Trace` of a concrete layer name.

    The hooks act only in the context (thread, asyncio task) that entered the block, and
    each ``__enter__`` opens a new run with fresh records.

    Args:
        model: The model.
        layers: The spec.
        stop_early: Stop the forward pass once every requested capture is taken; the
            ``with`` block then ends normally, skipping the rest of its body.
        strict: An edit whose layer the block never called is an `EditError` instead of a
            `NotCalledWarning`.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> with TraceMultiple(model, {"0": (True, True, None), "1": (True, False, None)}) as tm:
        ...     y = model(torch.randn(2, 4))
        >>> torch.equal(tm["1"].output, y), tm["0"].input.shape
        (True, torch.Size([2, 4]))
    """

    __exit__ = _ExitMethod()

    def __init__(
        self,
        model: nn.Module,
        layers: Spec,
        *,
        stop_early: bool = False,
        strict: bool = False,
        _eager_root: nn.Module | None = None,
    ) -> None:
        if type(stop_early) is not bool or type(strict) is not bool:
            flag, value = (
                ("strict", strict) if type(stop_early) is bool else ("stop_early", stop_early)
            )
            raise SpecError(f"{flag}= takes True or False, got {value!r}.")
        plan = make_plan(model, layers)
        self.model = model
        self.sites: tuple[Planned, ...] = plan.sites
        self._grafts = plan.grafts
        self._probes = (
            [(host, m) for host, _, m in plan.grafts if isinstance(m, PROBES)]
            if plan.grafts
            else []
        )
        self._interceptors: list[Interceptor] = []
        self._depth: int | None = None  # the function mode stack's depth as the run opened
        self._stop_early = stop_early
        self._strict = strict
        self._guard: CompileGuard | None = None
        self._parallel: ParallelContext | None = None
        # Nothing around the sites (nothing hooked; or a kept plan, before torch.compile is
        # loaded, with no DataParallel): no compiled code or worker thread to mind.
        if plan.around:
            wrappers = check_compiled(model, plan.around, eager_root=_eager_root)
            self._guard = CompileGuard(wrappers) if wrappers else None
            parallels = plan.parallels
            if parallels and stop_early:
                raise SpecError(
                    "stop_early=True cannot stop a forward pass inside DataParallel: its "
                    "worker threads catch only Exception, and the stop would end in an error "
                    "of PyTorch's. Run without stop_early, or hook the module DataParallel "
                    "wraps (model.module)."
                )
            self._parallel = ParallelContext(parallels) if parallels else None
        self._token: object | None = None
        self._runs = 0  # runs opened so far
        self._reset: contextvars.Token[frozenset[object]] | None = None
        self._stopped = False
        self.grad_targets: list[GradientEdge] = []
        self._names: dict[str, Planned] | None = None  # the sites by name (see `_by_name`)
        self._edits = False  # whether a site edits (else nothing can go uncalled)
        for p in plan.sites:  # (a loop: a generator closed early could swallow an interrupt)
            if p.hook.edits_output or p.hook.edits_input:
                self._edits = True
                break
        self._recorders: dict[str, Recorder] = {}  # of the latest run, made as it opens
        self._views: dict[str, Trace] = {}

    def _fresh(self, token: object, base: int) -> dict[str, Recorder]:
        stopper = None
        if self._stop_early:
            capturing = sum(1 for p in self.sites if p.hook.output or p.hook.input)
            stopper = Stopper(token, capturing) if capturing else None
        targets = self.grad_targets
        return {
            p.name: Recorder(p.name, p.module, p.hook, token, base, stopper, targets, p.sites)
            for p in self.sites
        }

    # -- opening and closing a run ----------------------------------------------------

    def __enter__(self) -> Self:
        self._open()
        return self

    def _open(self) -> None:
        if self._token is not None:
            raise HookfnError(
                f"this {type(self).__name__} is already active; a context is entered once at "
                "a time (make a new one to nest)."
            )
        token = self._token = object()
        self._runs += 1
        self._stopped = False
        self.grad_targets.clear()
        self._recorders = self._fresh(token, graph_task())
        try:
            with REGISTRY:
                for recorder in self._recorders.values():
                    recorder.register()
                if self._parallel is not None:
                    self._parallel.attach()
                if self._guard is not None:
                    self._guard.attach(token)
                if self._grafts:
                    GRAFTS[token] = self._grafts
                if self._probes or LIVE[0]:
                    # (a forward cut short leaves op sites' modes on the stack: see `unwind`)
                    self._depth = torch._C._len_torch_function_stack()
                if self._probes:
                    self._intercept(token)
            self._reset = activate(token)
        except BaseException:
            self._close()  # also after a KeyboardInterrupt: nothing stays registered
            raise

    def _intercept(self, token: object) -> None:
        """Set up the calls of this run's probes (see `hookfn._ops`), one interceptor per
        host module (the caller holds the registry lock)."""
        by_host: dict[int, Interceptor] = {}
        for host, probe in self._probes:
            interceptor = by_host.get(id(host))
            if interceptor is None:
                interceptor = by_host[id(host)] = Interceptor(host, token)
            interceptor.add(probe)
        for interceptor in by_host.values():
            self._interceptors.append(interceptor)
            interceptor.register()

    def _close(self) -> None:
        """Remove everything `_open` set up; idempotent, so it can simply run again."""
        token = self._token
        if token is None:
            return
        with REGISTRY:
            for recorder in self._recorders.values():
                recorder.remove()
            if self._guard is not None:
                self._guard.detach()
            if self._parallel is not None:
                self._parallel.detach()
            GRAFTS.pop(token, None)
            if self._depth is not None and LIVE[0]:
                unwind(self._depth)
                self._depth = None
            if DEFERRAL.stops:  # (a stop of this run's op site that no forward hook raised)
                DEFERRAL.stops[:] = [s for s in DEFERRAL.stops if s[0].token is not token]
            while self._interceptors:
                self._interceptors[-1].remove()
                self._interceptors.pop()
        IN_BACKWARD.pop(token, None)  # (if an interrupt cut a `backward=` pass short)
        reset, self._reset = self._reset, None
        deactivate(token, reset)
        self._token = None

    def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        token = self._token
        try:
            self._close()
        except BaseException:
            self._close()  # cut short by an interrupt: every step is idempotent, finish
            raise
        if isinstance(exc, StopForward) and exc.token is token:
            self._stopped = True
            return True  # stop_early: the block ends normally
        if exc_type is None:
            self._report_uncalled()
        return False

    def _report_uncalled(self, stacklevel: int = 4) -> None:
        """Warn (or raise, with ``strict``) for each edit whose module never ran.

        ``stacklevel`` points the warning at the user's code: 4 from the exit of a ``with``
        block (through `_exit` and `_PendingExit`), 3 from `run_with_hooks`."""
        if self._stopped or not self._edits:
            return
        # (the sides with an edit step that never saw a call of the module)
        missed = [
            name
            for name, recorder in self._recorders.items()
            if (recorder.out.edit_calls == 0 and recorder.out.edit is not None)
            or (recorder.inp.edit_calls == 0 and recorder.inp.edit is not None)
        ]
        if not missed:
            return
        text = (
            f"the edit at layer {missed[0]!r} did nothing: the module was never called "
            "during the run"
            + (f" (nor were {', '.join(map(repr, missed[1:]))})" if missed[1:] else "")
            + ". Check the layer name (model.named_modules()), or that the forward reaches it."
        )
        if self._strict:
            raise EditError(text)
        warnings.warn(text, NotCalledWarning, stacklevel=stacklevel)

    @property
    def _by_name(self) -> dict[str, Planned]:
        """The sites by name, made on first use (a run needs them only for ``tm[name]``)."""
        names = self._names
        if names is None:
            names = self._names = {p.name: p for p in self.sites}
        return names

    @property
    def token(self) -> object:
        """The token of the open run (None while closed); see `StopForward`."""
        return self._token

    # -- results ----------------------------------------------------------------------

    def _capture_of(self, name: str) -> Capture:
        recorder = self._recorders.get(name)
        if recorder is None or not recorder.hook.records:  # (None: never entered)
            return self._by_name[name].blank
        return recorder.capture()

    def captures(self) -> Captures:
        """The `Capture` of every traced layer, keyed by layer name, in model order (a
        `dict` that notes the modules the captures came from, for `patch_from`).

        Each call builds them from the records as they are now: a gradient recorded by a
        backward pass after the block is in the captures taken after it.
        """
        result = Captures()
        modules = result.modules
        recorders = self._recorders
        for planned in self.sites:  # (`_capture_of` inlined: a call per layer costs 1% here)
            name = planned.name
            recorder = recorders.get(name)
            if recorder is None or not planned.hook.records:
                result[name] = planned.blank
            else:
                result[name] = recorder.capture()
            modules[name] = planned.ref
        return result

    def __getitem__(self, name: str) -> Trace:
        view = self._views.get(name)
        if view is None:
            if name not in self._by_name:
                raise CaptureError(
                    f"no traced layer named {name!r}; traced layers: {list(self._by_name)}"
                )
            view = self._views[name] = Trace._view_of(self, name)
        return view

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str, default: Any = None) -> Any:
        """``tm[name]`` if ``name`` is a traced layer, else ``default``."""
        return self[name] if name in self._by_name else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        state = "active" if self._token is not None else "closed"
        return f"{type(self).__name__}({list(self._by_name)}, {state})"


class Trace(TraceMultiple):
    """Hook one layer of a model for the duration of a ``with`` block.

    The original DeepHook API: ``retain_output`` / ``retain_input`` store the layer's
    output / input (``.output``, ``.input``), and ``edit_output(output)`` or
    ``edit_output(output, layer)`` may replace the output (``None`` means unchanged).
    Nothing is registered before ``__enter__``, and everything is removed on ``__exit__``,
    whatever happened in between. A `Trace` is a `TraceMultiple` of one layer.

    Args:
        model: The model.
        layer: A dotted name from ``model.named_modules()``, or a module of the model.
        retain_output: Capture the output.
        retain_input: Capture the input.
        edit_output: An edit of the output.
        hook: Instead of the three above, a full `Hook` record.
        stop: Stop the forward pass once the layer's capture is taken (nethook's ``stop``);
            the ``with`` block then ends normally.
        strict: An edit whose layer never ran is an `EditError` (else a warning).

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> with Trace(model, "0", edit_output=lambda out: out * 0) as t:
        ...     y = model(torch.randn(2, 4))
        >>> bool((t.output == 0).all()), bool((y == 0).all())
        (True, True)
    """

    _owner: TraceMultiple | None  # None for a Trace of its own, else what it is a view of
    _name: str

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        retain_output: bool = True,
        retain_input: bool = False,
        edit_output: EditLike | None = None,
        *,
        hook: Hook | None = None,
        stop: bool = False,
        strict: bool = False,
    ) -> None:
        if not isinstance(layer, (str, nn.Module)):
            raise SpecError(
                f"Trace takes one layer (a name or a module), got a {type(layer).__name__}; "
                "use TraceMultiple for several layers."
            )
        label = layer if isinstance(layer, str) else type(layer).__name__
        if hook is None:
            hook = to_hook((retain_output, retain_input, edit_output), label)
        super().__init__(model, {layer: hook}, stop_early=stop, strict=strict)
        if len(self.sites) != 1:
            names = ", ".join(repr(p.name) for p in self.sites[:4])
            raise SpecError(
                f"Trace hooks exactly one layer, but {layer!r} matches {len(self.sites)} "
                f"({names}, ...); use TraceMultiple for several."
            )
        self._owner = None
        self._name = self.sites[0].name

    @classmethod
    def _view_of(cls, owner: TraceMultiple, name: str) -> Trace:
        """``owner[name]``: a `Trace` that reads ``owner``'s records (not enterable)."""
        view = cls.__new__(cls)
        view._owner = owner
        view._name = name
        view._runs = 0  # (a view is never entered: see `_open`)
        view._token = None
        return view

    @property
    def _source(self) -> TraceMultiple:
        return self if self._owner is None else self._owner

    def _open(self) -> None:
        if self._owner is not None:
            raise HookfnError(
                f"the Trace of layer {self._name!r} belongs to a TraceMultiple; enter that instead."
            )
        super()._open()

    @property
    def name(self) -> str:
        """The layer name."""
        return self._name

    @property
    def module(self) -> nn.Module:
        """The hooked module."""
        return self._source._by_name[self._name].module

    @property
    def hook(self) -> Hook:
        """What the trace does at its layer."""
        return self._source._by_name[self._name].hook

    @property
    def capture(self) -> Capture:
        """Everything recorded so far, as an immutable `Capture` (built on each access)."""
        return self._source._capture_of(self._name)

    @property
    def output(self) -> Tensor:
        """The layer's (edited) primary output tensor (see `Capture.output`)."""
        if not self.hook.output:
            raise CaptureError(
                f"the output of layer {self._name!r} was not retained; pass "
                "retain_output=True (or Hook(output=True))."
            )
        return self.capture.output

    @property
    def input(self) -> Tensor:
        """The layer's primary input tensor: its first argument (see `Capture.input`)."""
        if not self.hook.input:
            raise CaptureError(
                f"the input of layer {self._name!r} was not retained; pass "
                "retain_input=True (or Hook(input=True))."
            )
        return self.capture.input

    @property
    def grad_output(self) -> Tensor:
        """The gradient of the layer's primary output, once a backward pass has run."""
        return self.capture.grad_output

    @property
    def grad_input(self) -> Tensor:
        """The gradient of the layer's primary input, once a backward pass has run."""
        return self.capture.grad_input

    def __repr__(self) -> str:
        state = "active" if self._source._token is not None else "closed"
        return f"Trace({self._name!r}, {self.hook!r}, {state})"


def spliced(model: nn.Module, splices: Mapping[Any, Splice | nn.Module]) -> TraceMultiple:
    """A ``with`` block inside which ``model`` runs with modules spliced in (see `splice`).

    Every forward of ``model`` inside the block uses the splices, and every hookfn run inside
    it (`run_with_hooks`, `TraceMultiple`, `hookfn.patching`, `hookfn.collect`) can name
    their parts: ``"transformer.h.1.sae.latents"``. Nothing is captured at the layers
    themselves. The block is call-scoped like any run: other threads and tasks see the model
    as it is.

    Args:
        model: The model.
        splices: Layer keys to a `splice` edit, or to a module (spliced with the defaults).

    Examples:
        >>> import torch
        >>> from hookfn import run_with_hooks, spliced, ablate
        >>> from hookfn.sae import SparseAutoencoder
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> x = torch.randn(3, 4)
        >>> with spliced(model, {"0": SparseAutoencoder(8, 32)}):
        ...     out, caches = run_with_hooks(model, x, {"0.sae.latents": ablate([0, 1])})
        >>> list(caches)
        ['0.sae.latents']
    """
    if not isinstance(splices, Mapping):
        raise SpecError(
            f"spliced(model, splices): splices maps layer keys to splice(...) edits or "
            f"modules, got {type(splices).__name__}."
        )
    spec: dict[Any, Hook] = {}
    for key, value in splices.items():
        if isinstance(value, nn.Module):
            value = splice(value)
        if not isinstance(value, Splice):
            raise SpecError(
                f"spliced(): splices[{key!r}] is a {type(value).__name__}; give a "
                "splice(module, ...) edit or a module."
            )
        spec[key] = Hook(value, output=False)
    return TraceMultiple(model, spec)
