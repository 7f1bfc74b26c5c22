"""``torch.compile``: hooked calls run eagerly, or fail; they never run silently without hooks.

A graph compiled by dynamo does not call module hooks that were added after it was compiled
(its guards skip the hook dictionaries by default), and a hook that is traced into a graph
is not gated per call. So a hook can only act in eager code. hookfn therefore

- runs a compiled model's hooked call eagerly when it can reach the eager module: the
  ``_orig_mod`` of a ``torch.compile(model)`` wrapper, and the eager ``_call_impl`` of a
  module compiled in place with ``model.compile()`` (`eager_callable`);
- refuses, with a `CompileError` naming the compiled module, a spec whose hooked module
  sits inside compiled code it cannot bypass (`check_compiled`);
- guards every ``torch.compile`` wrapper around the model while hooks are active, so that a
  call of the compiled wrapper from the hooked context (a ``forward=`` callable, or a call
  inside a ``Trace`` block) raises instead of silently running the compiled graph
  (`CompileGuard`).

The uncompiled model's numbers are the reference: a hooked run computes exactly what the
eager model computes with the same hooks.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ._errors import CompileError
from ._gate import ACTIVE
from ._keys import strip_prefix, submodule, unwrap

__all__ = [
    "CompileGuard",
    "check_compiled",
    "compiler_loaded",
    "eager_callable",
    "eager_forward",
    "enclosing",
    "is_compiled_in_place",
    "is_compiled_wrapper",
]


_OPTIMIZED_MODULE: list[type[nn.Module]] = []  # torch.compile's wrapper class, once seen


def _optimized_module() -> type[nn.Module] | None:
    # Nothing can be compiled before dynamo is imported; looking it up in sys.modules keeps
    # the (slow) import of torch._dynamo out of hookfn's import. Once found, it is kept.
    if _OPTIMIZED_MODULE:
        return _OPTIMIZED_MODULE[0]
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    found = getattr(eval_frame, "OptimizedModule", None) if eval_frame is not None else None
    if not isinstance(found, type):
        return None
    _OPTIMIZED_MODULE.append(found)
    return found


def compiler_loaded() -> bool:
    """Whether ``torch.compile`` was loaded: before, nothing can be compiled."""
    return _optimized_module() is not None


def is_compiled_wrapper(module: object) -> bool:
    """Whether ``module`` is the wrapper that ``torch.compile(model)`` returns."""
    optimized = _optimized_module()
    return optimized is not None and isinstance(module, optimized)


def is_compiled_in_place(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (``module.compile()``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def _strip_wrappers(model: nn.Module) -> nn.Module:
    while is_compiled_wrapper(model):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def eager_callable(model: nn.Module) -> tuple[Callable[..., Any], nn.Module | None]:
    """What to call to run ``model`` eagerly, and the in-place compiled module it bypasses.

    ``torch.compile`` wrappers are stripped (their ``_orig_mod`` runs eagerly with the same
    parameters); a module compiled in place is called through its eager ``_call_impl``, which
    runs its hooks and its ``forward`` exactly as ``module(...)`` would without compilation.
    """
    if _optimized_module() is None:  # torch.compile not loaded: nothing is compiled
        return model, None
    inner = _strip_wrappers(model)
    if is_compiled_in_place(inner):
        return inner._call_impl, inner
    return inner, None


def eager_forward(
    model: nn.Module, forward: Callable[..., Any]
) -> tuple[Callable[..., Any], nn.Module | None]:
    """`eager_callable` for a ``forward=`` callable of ``run_with_hooks``.

    The model itself (or one of its ``torch.compile`` wrappers) is run as `eager_callable`
    runs it; a function compiled with ``torch.compile(fn)`` is replaced by ``fn``. Any other
    callable is returned unchanged (a compiled wrapper it calls is caught by `CompileGuard`).
    """
    module = model
    while True:
        if forward is module:
            return eager_callable(model)
        inner = getattr(module, "_orig_mod", None)
        if not is_compiled_wrapper(module) or not isinstance(inner, nn.Module):
            break
        module = inner
    original = getattr(forward, "_torchdynamo_orig_callable", None)
    if callable(original) and not isinstance(forward, nn.Module):
        return eager_forward(model, original)
    return forward, None


def enclosing(
    model: nn.Module, hooked: Sequence[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module, bool]]:
    """The modules a call of ``model`` passes through on its way to the hooked ones.

    Returns ``(name, module, is_site)`` triples, outermost first: the wrapper chain from
    ``model`` down to the unwrapped model (`unwrap`), then every ancestor of each hooked
    module, then the hooked modules themselves, each once. ``hooked`` holds the ``(name,
    module)`` pairs of the plan (names as the user wrote them, wrapper prefix or not).
    """
    inner, prefix = unwrap(model)
    found: dict[int, tuple[str, nn.Module, bool]] = {}
    module, name = model, ""
    while module is not inner:
        found[id(module)] = (name, module, False)
        child = getattr(module, "_orig_mod", None)
        step = "_orig_mod"
        if not (is_compiled_wrapper(module) and isinstance(child, nn.Module)):
            child, step = getattr(module, "module", None), "module"
        if not isinstance(child, nn.Module):
            break
        module, name = child, f"{name}.{step}" if name else step
    # Ancestor names, each once: walking up from a layer stops at the first known parent.
    ancestors: dict[str, None] = {"": None}
    for site_name, _ in hooked:
        name = strip_prefix(site_name, prefix)[1] if prefix else site_name
        while name:
            name = name.rpartition(".")[0]
            if name in ancestors:
                break
            ancestors[name] = None
    for name in sorted(ancestors, key=lambda n: n.count(".") + (n != "")):  # outermost first
        ancestor = submodule(inner, name)
        if ancestor is None:
            continue
        label = prefix + name if name else prefix[:-1]
        found.setdefault(id(ancestor), (label, ancestor, False))
    for site_name, site in hooked:
        found[id(site)] = (site_name, site, True)
    return list(found.values())


def check_compiled(
    model: nn.Module,
    path: Sequence[tuple[str, nn.Module, bool]],
    *,
    eager_root: nn.Module | None = None,
) -> list[nn.Module]:
    """Refuse hooked modules that would run inside compiled code; return wrappers to guard.

    Args:
        model: The model as the user passed it.
        path: `enclosing` of the plan.
        eager_root: A module compiled in place that the run calls through its eager
            ``_call_impl`` (see `eager_callable`), so its compilation does not matter.

    Returns:
        The ``torch.compile`` wrappers at the top of ``model``: the run bypasses them, and a
        `CompileGuard` makes any call of them inside the hooked context an error.

    Raises:
        CompileError: A hooked module, or a module around it, is compiled in a way the run
            cannot bypass.
    """
    optimized = _optimized_module()
    if optimized is None:
        return []  # dynamo is not even imported: nothing is compiled
    top: list[nn.Module] = []
    wrapper = model
    while isinstance(wrapper, optimized) and isinstance(wrapper._orig_mod, nn.Module):
        top.append(wrapper)
        wrapper = wrapper._orig_mod
    for name, module, is_site in path:
        # (runs once per run for every module on the way: kept to reads of the instance's
        # own attributes, where module.compile() and a compiled forward put theirs)
        if isinstance(module, optimized):
            if is_site or module in top:  # (modules compare by identity)
                continue  # hooks on a wrapper itself run eagerly, around its graph
            raise _wrapper_inside(name)
        state = module.__dict__
        if state.get("_compiled_call_impl") is not None and module is not eager_root:
            raise _compiled_in_place(name, module)
        if "forward" in state and _compiled_forward(module):
            raise _forward_compiled(name)
    return top


def _compiled_forward(module: nn.Module) -> bool:
    """Whether ``module.forward`` was replaced by a compiled function on the instance
    (``m.forward = torch.compile(m.forward)``): the module then runs a compiled graph."""
    forward = module.__dict__.get("forward")
    return forward is not None and hasattr(forward, "_torchdynamo_orig_callable")


def _restore(name: str) -> str:
    """The statement that gives module ``name`` its eager forward back."""
    return f"del model.get_submodule({name!r}).forward" if name else "del model.forward"


def _forward_compiled(name: str) -> CompileError:
    label = _label(name)
    return CompileError(
        f"the forward of {label} was replaced by a compiled function "
        "(m.forward = torch.compile(m.forward)), so it runs as a compiled graph, where hooks "
        "cannot act (the run would silently return an unedited output). Hook the model "
        f"with its eager forward: `{_restore(name)}` restores it, or "
        "compile the whole model with torch.compile(model) instead: hookfn runs a compiled "
        "model's hooked calls eagerly."
    )


def _label(name: str) -> str:
    return repr(name) if name else "the model"


def _wrapper_inside(name: str) -> CompileError:
    label = _label(name)
    return CompileError(
        f"{label} is a torch.compile wrapper inside the model, so the layers under it run in "
        "a compiled graph, where hooks cannot act (the run would silently return an unedited "
        f"output). Hook the uncompiled module (put {label}._orig_mod back in its place while "
        "you hook it), or compile the whole model instead: hookfn runs a compiled model's "
        "hooked calls eagerly."
    )


def _compiled_in_place(name: str, module: nn.Module) -> CompileError:
    return CompileError(
        f"{_label(name)} was compiled in place ({type(module).__name__}.compile()), so it runs "
        "as a compiled graph, where hooks cannot act (the run would silently return an "
        "unedited output). Pass the compiled model itself to run_with_hooks without forward= "
        "(hookfn then runs it eagerly), compile the whole model with torch.compile(model) "
        "instead of its parts, or hook an uncompiled copy."
    )


class CompileGuard:
    """Pre-hooks on ``torch.compile`` wrappers that fail a call from the hooked context.

    Registered for the duration of a run; gated like every hookfn hook, so concurrent calls
    of the compiled model from other threads or tasks run compiled, as before.
    """

    __slots__ = ("handles", "wrappers")

    def __init__(self, wrappers: Sequence[nn.Module]) -> None:
        self.wrappers = tuple(wrappers)
        self.handles: list[RemovableHandle] = []

    def attach(self, token: object) -> None:
        """Register the guards (the caller holds the registration lock)."""
        for wrapper in self.wrappers:
            self.handles.append(wrapper.register_forward_pre_hook(_guard(ACTIVE, token)))

    def detach(self) -> None:
        """Remove the guards; idempotent, and resumable after an interruption."""
        handles = self.handles
        while handles:
            handles[-1].remove()
            handles.pop()


def _guard(
    active: contextvars.ContextVar[frozenset[object]], token: object
) -> Callable[[nn.Module, Any], None]:
    def guard(module: nn.Module, args: Any) -> None:
        if token in active.get():
            raise CompileError(
                f"the torch.compile wrapper {type(module).__name__} was called while hookfn's "
                "hooks are active; the compiled graph would run without them (an unedited "
                "output, empty captures). Call the eager module instead: model._orig_mod(...) "
                "inside a Trace block, or pass forward= a function that calls "
                "model._orig_mod (run_with_hooks(model, ...) without forward= does this for "
                "you)."
            )

    return guard
