"""The hook path: what runs on every call of a hooked module.

One site of one run is a `Recorder`. Its body has two steps, each a hook on the module:

1. **edit** (`Recorder.edit`): the gate, then the edit. It is put in front of the module's
   other hooks, so that they (a user's hook, the ones transformers records ``hidden_states``
   with, TransformerLens' own) see the edited value. Nested runs keep their order: an inner
   run's edit runs after, and sees, an outer one's.
2. **after** (`Recorder.after_output`, `Recorder.after_input`): the gate, then gradient
   tracking, then the record. It is put after the module's other hooks, so a capture holds
   what the rest of the model receives, also where another hook changed the value after
   the edit.

A site registers only the steps its `Hook` needs; a site that only captures its output with
the default copy takes the shortest path, `Recorder.record`. The pre-hooks, and the forward
hook of an edit that reads the module's input, are thin adapters around the same two steps;
the edit of an output is the step itself, registered as a bound method, and the step calls
an edit's ``__call__`` by name, not through the instance (each frame on a hooked call runs
cold, between the model's layers: the benchmarks measure it). One stop-early rule:
a site is done when its last forward record of its first call is taken.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.autograd.graph import get_gradient_edge as gradient_edge

from ._capture import Args, Capture, primary
from ._edits import Edit, Function, check_result
from ._errors import CaptureError, EditError, HookfnError
from ._gate import ACTIVE, HOOK_KEYS, IN_BACKWARD, Replays, Stopper, graph_task
from ._hook import Hook
from ._hook_errors import in_context, no_primary, warn_if_partial, warn_replays
from ._site import Site, SiteKind
from ._values import PLAIN_COPY, copy_value, make_copier, replace_primary

__all__ = ["Recorder"]

# Keys of the edit steps in front of a module's hooks (see `_insert`).
_HEADS: set[int] = set()

_KEEP_SITES = 64  # calls of a site whose `Site` objects are kept between runs
_SITES_LOCK = threading.Lock()


class _Side:
    """One side of a site, its output or its input: what to do there, and what it recorded."""

    __slots__ = (
        "alias",
        "calls",
        "edit",
        "edit_calls",
        "edit_grad",
        "grad_kind",
        "grads",
        "keep",
        "keep_grad",
        "kind",
        "records",
        "replays",
        "sites",
        "stops",
    )

    def __init__(
        self,
        kind: SiteKind,
        grad_kind: SiteKind,
        edit: Edit | None,
        keep: bool,
        keep_grad: bool,
        edit_grad: Edit | None,
        alias: bool,
        sites: list[Site],
        records: list[Any],
    ) -> None:
        self.kind: SiteKind = kind
        self.sites = sites  # the `Site` of each call the edit receives (see `Recorder._site`)
        self.grad_kind: SiteKind = grad_kind
        self.edit = edit
        self.keep = keep
        self.keep_grad = keep_grad
        self.edit_grad = edit_grad
        # Whether a gradient is always taken on a fresh alias of the tensor, which the rest of
        # the model then receives (the input: the gradient into this module alone), or on
        # the output tensor itself unless another site shares it (see `Recorder._track`).
        self.alias = alias
        self.records = records
        self.grads: list[Tensor | None] = []
        self.calls = 0  # calls the after step saw
        self.edit_calls = 0  # calls the edit step saw
        self.replays: Replays | None = None
        self.stops = False  # this side's first record completes the site (stop_early)


_NO_VALUE: Any = object()  # an argument a hook was called without

# Shared sides that nothing is ever written into (see `Recorder.__init__`).
_NO_OUTPUT = _Side("output", "grad_output", None, False, False, None, False, [], [])
_NO_INPUT = _Side("input", "grad_input", None, False, False, None, True, [], [])


class Recorder:
    """The hooks of one site for one run, and what they recorded.

    Args:
        name: The site's layer name.
        module: The hooked module.
        hook: What to do there.
        token: The run's token (see `hookfn._gate`).
        base: The autograd graph task the run was opened in.
        stopper: Counts the sites left to record (``stop_early``), or None.
        grad_targets: Where gradient tracking leaves the edges a ``backward=`` pass needs.
        sites: The `Site` objects of the site's calls, by kind (see `Planned.sites`).
    """

    __slots__ = (
        "base",
        "copy",
        "grad_targets",
        "hook",
        "inp",
        "keys",
        "module",
        "name",
        "out",
        "outputs",
        "sites",
        "stopper",
        "token",
        "warned",
    )

    def __init__(
        self,
        name: str,
        module: nn.Module,
        hook: Hook,
        token: object,
        base: int,
        stopper: Stopper | None,
        grad_targets: list[GradientEdge],
        sites: dict[str, list[Site]],
    ) -> None:
        self.name = name
        self.sites = sites
        self.module = module
        self.hook = hook
        self.token = token
        self.base = base
        self.stopper = stopper
        self.grad_targets = grad_targets
        self.copy = (
            PLAIN_COPY
            if hook.plain_copy
            else make_copier(hook.detach, hook.clone, hook.device, hook.dtype)
        )
        # A side with no step of its own stays a shared empty one (nothing is written into
        # it): the output of a site that only captures it (`record` writes `outputs`), the
        # input of a site that never hooks its input.
        self.outputs: list[Any] = []
        if hook.captures_only and hook.plain_copy:
            self.out = _NO_OUTPUT
        else:
            self.out = _Side(
                "output",
                "grad_output",
                hook.edit,
                hook.output,
                hook.grad,
                hook.edit_grad,
                False,
                sites["output"],
                self.outputs,
            )
        self.inp = (
            _Side(
                "input",
                "grad_input",
                hook.edit_input,
                hook.input,
                hook.grad_input,
                None,
                True,
                sites["input"],
                [],
            )
            if hook.edits_input or hook.after_input
            else _NO_INPUT
        )
        if stopper is not None and self.out is not _NO_OUTPUT:
            (self.out if hook.output else self.inp).stops = True
        self.keys: list[int] = []  # of the hooks this recorder inserted
        self.warned = False  # (a partial edit is reported once per run)

    # -- registration (the caller holds `hookfn._gate.REGISTRY`) -------------------------

    def register(self) -> None:
        """Insert the steps the hook needs. On an error or interrupt part of them may be in
        place: `remove` finds every one (a key is recorded before its hook is inserted)."""
        hook = self.hook
        module = self.module
        if hook.edits_input:
            self._insert(module._forward_pre_hooks, self.edit_input, head=True, kwargs=True)
        if hook.after_input:
            self._insert(module._forward_pre_hooks, self.after_input, head=False, kwargs=True)
        if hook.edits_output:
            if hook.edit.reads_input:  # type: ignore[union-attr]
                self._insert(module._forward_hooks, self.edit_output_of_input, head=True)
                module._forward_hooks_with_kwargs[self.keys[-1]] = True
            else:  # the most common edit: `_insert`, inlined
                key = next(HOOK_KEYS)
                self.keys.append(key)
                hooks = module._forward_hooks
                hooks[key] = self.edit
                _HEADS.add(key)
                if len(hooks) > 1:
                    _put_first(hooks, key)
        if hook.captures_only and hook.plain_copy:  # the most common site: `_insert`, inlined
            key = next(HOOK_KEYS)
            self.keys.append(key)
            module._forward_hooks[key] = self.record
        elif hook.after_output:
            self._insert(module._forward_hooks, self.after_output, head=False)

    def _insert(
        self, hooks: dict[int, Any], fn: Callable[..., Any], *, head: bool, kwargs: bool = False
    ) -> None:
        key = next(HOOK_KEYS)
        self.keys.append(key)
        if kwargs:
            self.module._forward_pre_hooks_with_kwargs[key] = True
        hooks[key] = fn
        if head:
            _HEADS.add(key)
            if len(hooks) > 1:
                _put_first(hooks, key)

    def remove(self) -> None:
        """Remove every hook `register` inserted; idempotent, and resumable after an
        interrupt (a key leaves the list only once its hook is gone)."""
        keys = self.keys
        module = self.module
        while keys:
            key = keys[-1]
            if module._forward_hooks.pop(key, None) is None:
                module._forward_pre_hooks.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
            else:
                module._forward_hooks_with_kwargs.pop(key, None)
            if key in _HEADS:
                _HEADS.discard(key)
            keys.pop()

    # -- the adapters ----------------------------------------------------------------

    def record(self, module: nn.Module, args: Any, output: Any) -> None:
        """The after step of a site that only captures its output with the default copy.

        A checkpointed forward re-run during backward (another graph task, or an autograd
        worker thread where the token is not active) records nothing, so one test covers
        every case where this hook must not act.
        """
        if self.token in ACTIVE.get() and graph_task() == self.base:
            records = self.outputs
            if type(output) is Tensor:
                records.append(output.detach().clone())
            else:
                records.append(copy_value(PLAIN_COPY, output, False))
            if self.stopper is not None and len(records) == 1:
                self.stopper.site_done()

    def edit_output_of_input(
        self, module: nn.Module, args: Any, kwargs: Any, output: Any = _NO_VALUE
    ) -> Any:
        """The edit step of an edit that reads the module's input too (a transcoder).

        ``output`` has a default for the reason ``edit_input``'s ``kwargs`` has one: a call
        on another thread, without the keyword arguments, is not the run's."""
        if output is _NO_VALUE:
            return None
        return self.edit(module, args, output, self.out, Args._of(args, kwargs))

    def after_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        return self._after(self.out, output, args)

    # ``kwargs`` has a default: a call on another thread that took its snapshot of the hooks
    # as this run removed its own may call the hook without them; the gate then returns.
    def edit_input(self, module: nn.Module, args: Any, kwargs: Any = None) -> Any:
        new = self.edit(module, args, Args._of(args, kwargs), self.inp)
        return None if new is None else (new.args, new.kwargs)

    def after_input(self, module: nn.Module, args: Any, kwargs: Any = None) -> Any:
        new = self._after(self.inp, Args._of(args, kwargs))
        return None if new is None else (new.args, new.kwargs)

    # -- the two steps ---------------------------------------------------------------

    def edit(
        self,
        module: nn.Module,
        args: Any,
        value: Any,
        side: _Side | None = None,
        source: Args | None = None,
    ) -> Any:
        """The edit step of ``side`` (None: the output): the gate, then the edit of
        ``value``; the new value, or None for unchanged. ``source``: the module's input, for
        an edit that reads it. ``module`` and ``args`` are the forward hook's own arguments
        (this method is an output's forward hook), not used here.

        A call where the run is not active returns at the gate. A re-run by activation
        checkpointing during a backward pass (in another graph task than the run was opened
        in, or in an autograd worker thread of the run's ``backward=`` pass, where the run's
        context is not active: see `hookfn._gate.IN_BACKWARD`) applies the edit again, with
        the site of the call it replays, and counts no call.
        """
        if side is None:
            side = self.out
        token = self.token
        if token in ACTIVE.get():
            if graph_task() == self.base:
                call = side.edit_calls
                side.edit_calls = call + 1
            else:
                call = self._replayed(side)
        elif token in IN_BACKWARD and _in_backward(token):
            call = self._replayed(side)
        else:
            return None
        edit: Any = side.edit
        sites = side.sites
        site = sites[call] if call < len(sites) else self._site(side.kind, call)
        if self.hook.whole:
            return _edit_whole(edit, value, site)
        x = value if type(value) is Tensor else primary(value)
        if x is None:
            raise no_primary(self.name, side.kind, value)
        try:
            if source is None:
                y = edit.__call__(x, site)  # (by name: see the module docstring)
            else:
                source_x = primary(source)
                if source_x is None:
                    raise no_primary(self.name, "input", source.args)
                y = edit.from_input(source_x, x, site)
            if not edit.result_checked:
                y = check_result(x, y)
        except HookfnError as error:
            raise in_context(error, edit, site) from None
        if y is x:
            return None
        if x is value:
            return y
        if not self.warned and side is self.out:  # (a module reads all its arguments)
            self.warned = True
            warn_if_partial(edit, site, value, x)
        return replace_primary(value, y)

    def _replayed(self, side: _Side) -> int:
        """The call that activation checkpointing re-runs during backward: the edit is
        applied again, identically, with the site of that call."""
        if side.replays is None:
            side.replays = Replays()
            if side.edit_calls > 1:
                warn_replays(self.name)
        return side.replays.call(side.edit_calls)

    def _after(self, side: _Side, value: Any, args: Any = ()) -> Any:
        """The gate, then gradient tracking and the record: a new value (a tensor made to
        track gradients), or None for unchanged. Re-runs by checkpointing do nothing."""
        if not (self.token in ACTIVE.get() and graph_task() == self.base):
            return None
        call = side.calls
        side.calls = call + 1
        result = None
        if side.keep_grad or side.edit_grad is not None:
            tracked = self._track(side, value, call, args)
            if tracked is not None:
                value = result = tracked
        if side.keep:
            records = side.records
            if self.hook.part is not None:
                records.append(self.copy(self._part(side, value)))
            elif side.kind == "output" and type(value) is Tensor:
                records.append(self.copy(value))
            else:
                records.append(copy_value(self.copy, value, not self.hook.clone))
            if call == 0 and side.stops:
                self.stopper.site_done()  # type: ignore[union-attr]
        return result

    def _part(self, side: _Side, value: Any) -> Tensor:
        """The part of ``value``'s primary tensor the hook keeps (``Hook(part=...)``)."""
        x = value if type(value) is Tensor else primary(value)
        part = self.hook.part
        if x is None:
            raise CaptureError(
                f"Hook(part=...) at layer {self.name!r}: its {side.kind} is a "
                f"{type(value).__name__} with no primary tensor to take a part of."
            )
        try:
            kept = part(x) if callable(part) else x[part]
        except (IndexError, RuntimeError, TypeError, ValueError) as error:
            raise CaptureError(
                f"Hook(part={part!r}) does not fit the {side.kind} of layer {self.name!r} "
                f"(shape {tuple(x.shape)}): {error}"
            ) from None
        if not isinstance(kept, Tensor):
            raise CaptureError(
                f"Hook(part=...) at layer {self.name!r} returned a {type(kept).__name__}; "
                "a part is a tensor."
            )
        return kept

    def _track(self, side: _Side, value: Any, call: int, args: Any) -> Any:
        """Put a gradient hook on ``value``'s primary tensor; the value to pass on if the
        tensor had to be replaced (a leaf made to require grad, or an alias).

        An output tensor is hooked itself (so an in-place op after the module keeps the
        hook on the graph), unless another site shares it: the module returned its input
        (an Identity probe, dropout in eval mode), or a site of this run hooked the same
        tensor (a parent and its last child return one tensor). Then a fresh alias, which
        the rest of the model receives, takes the gradient through this site alone, in the
        order the tensor flows through the sites.
        """
        grads = side.grads
        slot = len(grads)
        grads.append(None)
        tensor = value if type(value) is Tensor else primary(value)
        if tensor is None or not torch.is_grad_enabled():
            return None
        new = None
        if side.alias or not tensor.requires_grad or self._shared(tensor, args):
            # A fresh alias: the gradient into this module alone, not the total of every
            # consumer of the tensor; a leaf where nothing upstream requires grad (a frozen
            # model), so the graph starts here.
            new = tensor.view_as(tensor) if tensor.requires_grad else _leaf(tensor)
            if new is None:
                return None
            tensor = new
        site = self._site(side.grad_kind, call)
        tensor.register_hook(  # type: ignore[no-untyped-call]
            _gradient_hook(grads, slot, side.edit_grad, site, side.keep_grad, self.copy)
        )
        self.grad_targets.append(gradient_edge(tensor))
        return None if new is None else replace_primary(value, new)

    def _shared(self, tensor: Tensor, args: Any) -> bool:
        if args and primary(args[0]) is tensor:
            return True
        edge = gradient_edge(tensor)
        for target in self.grad_targets:  # (a loop: see TraceMultiple._edits)
            if target.node is edge.node and target.output_nr == edge.output_nr:
                return True
        return False

    def _site(self, kind: SiteKind, call: int) -> Site:
        sites = self.sites.get(kind)
        if sites is not None and call < len(sites):
            return sites[call]
        if call >= _KEEP_SITES:  # (a module called very often, e.g. in generation)
            return Site._weak(self.name, call, kind, self.module)
        with _SITES_LOCK:  # the sites of a kept plan are shared by concurrent runs
            sites = self.sites.setdefault(kind, [])
            while len(sites) <= call:
                sites.append(Site._weak(self.name, len(sites), kind, self.module))
        return sites[call]

    # -- results -----------------------------------------------------------------------

    def capture(self) -> Capture:
        """What the site recorded so far, as a `Capture`."""
        if self.hook.captures_only:  # (outputs alone: the other sides record nothing)
            return Capture(self.name, tuple(self.outputs))
        inp = self.inp
        return Capture(
            self.name,
            tuple(self.outputs),
            tuple(inp.records),
            tuple(self.out.grads),
            tuple(inp.grads),
        )


def _in_backward(token: object) -> bool:
    """Whether this is a re-run in the graph task of the ``backward=`` pass of ``token``'s
    run (in an autograd worker thread, where the run's context is not active)."""
    tasks = IN_BACKWARD.get(token)
    return tasks is not None and graph_task() in tasks


def _edit_whole(edit: Edit, value: Any, site: Site) -> Any:
    """A whole-structure edit (``Hook(whole=True)``): its result, unchecked, or None."""
    if isinstance(edit, Function):  # the user's own function, without the tensor checks
        new = edit.fn(value, site) if edit.takes_site else edit.fn(value)
    else:
        new = edit(value, site)
    if new is None or new is value:
        return None
    if isinstance(value, Args) and not isinstance(new, Args):
        raise EditError(
            f"the whole-input edit {edit!r} at layer {site.name!r} returned a "
            f"{type(new).__name__}; return an Args(*args, **kwargs) (or None)."
        )
    return new


def _gradient_hook(
    grads: list[Tensor | None],
    slot: int,
    edit: Edit | None,
    site: Site,
    keep: bool,
    copy: Callable[[Tensor], Tensor],
) -> Callable[[Tensor], Tensor | None]:
    # A closure over the records, not the recorder: the graph that holds it then holds no
    # reference back to the run.
    def on_grad(grad: Tensor) -> Tensor | None:
        new = None
        if edit is not None:
            try:
                new = grad = check_result(grad, edit(grad, site))
            except HookfnError as error:
                raise in_context(error, edit, site) from None
        if keep:
            grads[slot] = copy(grad)
        return new

    return on_grad


def _leaf(tensor: Tensor) -> Tensor | None:
    """A leaf copy of ``tensor`` that requires grad, or None where no gradient can flow."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    try:
        return tensor.detach().requires_grad_()
    except RuntimeError:  # inside a torch.func transform, which tracks gradients itself
        return None


def _put_first(hooks: dict[int, Any], key: int) -> None:
    """Move ``key`` right after the last edit step already in the dictionary (to the front
    if there is none), keeping the order of every other hook, a user's ``prepend=True``
    hook in front of an earlier run's edit step included."""
    move = getattr(hooks, "move_to_end", None)
    if move is None:
        return
    keys = [k for k in hooks if k != key]
    last_head = max((i for i, k in enumerate(keys) if k in _HEADS), default=-1)
    move(key, last=False)
    for k in reversed(keys[: last_head + 1]):
        move(k, last=False)
