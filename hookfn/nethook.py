"""A drop-in for baukit's ``nethook``, built on hookfn's engine.

Code written for nethook runs with its import changed::

    from hookfn import nethook          # instead of: from baukit import nethook

    with nethook.TraceDict(model, ["transformer.h.0", "transformer.h.1.attn"]) as ret:
        model(**inputs)
    ret["transformer.h.1.attn"].output  # the whole tuple, as nethook gives it

The names and signatures are nethook's: `Trace`, `TraceDict`, `StopForward`, `subsequence`,
`hierarchical_subsequence`, `get_module`, `get_parameter`, `replace_module`,
`set_requires_grad`, `recursive_copy`, `invoke_with_optional_args`, plus `module_names`. So
are the semantics:

- ``retain_output=True``, ``retain_input=False``, ``clone=False``, ``detach=False`` and
  ``retain_grad=False`` by default: ``.output`` is by default a reference to what the module
  returned, still attached to the autograd graph;
- ``.output`` is the module's output **as it returned it** (the whole tuple of an attention
  module, a ``ModelOutput``), and ``.input`` its positional arguments: the first one alone
  when there is one, else the tuple of them;
- ``edit_output`` receives that whole output and is called by parameter name: ``output``,
  ``layer`` (the layer name given, ``None`` for a module passed directly) and ``inputs`` (the
  positional arguments); unnamed parameters take them in that order (`invoke_with_optional_args`);
- a module called several times keeps its **last** call in ``.output`` / ``.input``;
- ``retain_grad=True`` marks the retained output to keep its gradient, so ``.output.grad``
  is filled by a backward pass, and hands the rest of the model a copy (in-place operations
  after the module stay legal);
- ``stop=True`` ends the forward pass after the layer with `StopForward`, which the ``with``
  block catches (a `TraceDict` stops after the last layer listed);
- ``layer=None`` hooks the module passed itself.

How it maps onto hookfn, and where it differs on purpose:

- **Hooks are active from construction, in this thread (context).** nethook registers its
  hook in ``__init__``; here ``__init__`` opens a hookfn run (`hookfn.Trace` entered) and
  ``close()`` / ``__exit__`` ends it, so a `Trace` used without ``with`` works as in nethook
  until ``close()``. Like every hookfn run, it acts only in the context (thread, asyncio
  task) that made the `Trace`: a forward pass in another thread does not see it, and
  ``__exit__`` removes every hook, also when the block raises.
- **Hook order.** nethook's hook is appended after the module's other forward hooks and edits
  and records in one step. Here the edit runs *before* the module's other forward hooks
  (which then see the edited output), and the record is taken after them: ``.output`` is
  what the rest of the model receives. Several traces of one module edit in the order they
  were made, as in nethook.
- **An edit that returns None** keeps the output unchanged (nethook then also stored ``None``
  in ``.output``); here ``.output`` is the unchanged output.
- **Copies.** `recursive_copy` copies every tensor of a nested structure and passes other
  objects through; with ``clone=True`` a captured object that cannot be copied (a
  ``DynamicCache``) is left out as ``hookfn.Omitted``.
- **Stopping.** `StopForward` is hookfn's, which derives from ``BaseException`` so that a
  model's own ``except Exception`` cannot swallow it; ``except StopForward`` catches it as
  before. A block catches only the stop its own trace raised.
- **Errors.** An unknown name is a `hookfn.LayerNotFoundError` (a ``LookupError``, as in
  nethook) that lists the closest names.
- **Before the forward pass**, or with ``retain_output=False``, reading ``.output`` is an
  ``AttributeError`` (nethook's attribute is then unset), with a message saying why.

`TraceDict` also takes a mapping ``{layer: {option: value}}`` whose options override the
shared ones for that layer (``{"h.0": {"retain_input": True}, "h.1": {}}``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from torch import nn

from . import Args, Hook, SpecError, StopForward
from . import Trace as _HookfnTrace
from ._module_tree import (
    get_module,
    get_parameter,
    hierarchical_subsequence,
    module_names,
    recursive_copy,
    replace_module,
    set_requires_grad,
    subsequence,
)

__all__ = [
    "StopForward",
    "Trace",
    "TraceDict",
    "get_module",
    "get_parameter",
    "hierarchical_subsequence",
    "invoke_with_optional_args",
    "module_names",
    "recursive_copy",
    "replace_module",
    "set_requires_grad",
    "subsequence",
]

_EDIT_ARGUMENTS = ("output", "layer", "inputs")
_UNSET = object()


# -- calling by name ------------------------------------------------------------------


def _call_plan(fn: Callable[..., Any], n_args: int, names: tuple[str, ...]) -> Callable[..., Any]:
    """How `invoke_with_optional_args` calls ``fn`` with ``n_args`` positional values and
    keyword values named ``names``: a function of those values. Decided once per function."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the values in order
        return lambda *args, **kwargs: fn(*args, *kwargs.values())
    P = inspect.Parameter
    by_name: dict[str, str] = {}  # parameter -> caller keyword it takes
    for p in parameters:
        if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and p.name in names:
            by_name[p.name] = p.name
    # The rest of the caller's values, in order: positional values, then unused keywords.
    spare: list[int | str] = [*range(n_args), *(n for n in names if n not in by_name.values())]
    positional: list[int | str] = []
    keyword: dict[str, int | str] = dict(by_name)
    takes_varargs = any(p.kind is P.VAR_POSITIONAL for p in parameters)
    takes_kwargs = any(p.kind is P.VAR_KEYWORD for p in parameters)
    filling = True  # positional slots are filled in order until one is left to its default
    for p in parameters:
        if p.name in by_name:
            filling = filling and p.kind is not P.POSITIONAL_ONLY
            continue
        if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            if spare and filling:
                source = spare.pop(0)
                if p.kind is P.POSITIONAL_ONLY:
                    positional.append(source)
                else:
                    keyword[p.name] = source
            elif p.default is P.empty:
                raise TypeError(
                    f"{getattr(fn, '__qualname__', fn)!r} requires the argument {p.name!r}, "
                    f"which the caller cannot provide (it provides {list(names)})."
                )
            else:
                filling = False
        elif p.kind is P.KEYWORD_ONLY and p.default is P.empty:
            raise TypeError(
                f"{getattr(fn, '__qualname__', fn)!r} requires the keyword argument {p.name!r}, "
                f"which the caller cannot provide (it provides {list(names)})."
            )
    if takes_varargs:
        positional.extend(s for s in spare if isinstance(s, int))
    if takes_kwargs:
        keyword.update({s: s for s in spare if isinstance(s, str)})

    def call(*args: Any, **kwargs: Any) -> Any:
        def value(source: int | str) -> Any:
            return args[source] if isinstance(source, int) else kwargs[source]

        return fn(
            *[value(s) for s in positional], **{name: value(s) for name, s in keyword.items()}
        )

    call.wants = {s for s in (*positional, *keyword.values()) if isinstance(s, str)}  # type: ignore[attr-defined]
    return call


def invoke_with_optional_args(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the arguments it is written to accept.

    Arguments whose name matches a parameter are passed by name; the others fill the
    remaining parameters in order (positional ones first, then the keyword ones in the order
    given); arguments ``fn`` cannot accept are dropped; a required parameter left without a
    value is a ``TypeError``.

    Examples:
        >>> invoke_with_optional_args(lambda layer, output: (layer, output), output=1, layer="a")
        ('a', 1)
        >>> invoke_with_optional_args(lambda x, name: (x, name), output=1, layer="a")
        (1, 'a')
        >>> invoke_with_optional_args(lambda output: output, output=1, layer="a")
        1
    """
    return _call_plan(fn, len(args), tuple(kwargs))(*args, **kwargs)


# -- Trace ----------------------------------------------------------------------------


class Trace(contextlib.AbstractContextManager["Trace"]):
    """Retain (and optionally edit) the output of one layer, from construction to ``close()``.

    ::

        with Trace(net, "layer.name") as ret:
            _ = net(inp)
            representation = ret.output

    Args:
        module: The model (or, with ``layer=None``, the module to hook).
        layer: The dotted name of the layer in ``module``, or None for ``module`` itself.
        retain_output: Keep the output in ``.output``: the whole value the module returned.
        retain_input: Keep the input in ``.input``: the only positional argument, or the
            tuple of them.
        clone: Keep copies, safe from later in-place changes by the model.
        detach: Keep detached tensors (by default they stay in the autograd graph).
        retain_grad: Fill ``.output.grad`` in a backward pass (the model then continues
            from a copy of the output).
        edit_output: ``fn(output, layer, inputs)``, called by parameter name (see
            `invoke_with_optional_args`), whose result replaces the output (None keeps it).
        stop: End the forward pass after this layer with `StopForward`; a ``with`` block
            catches it.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
        >>> with Trace(model, "0", edit_output=lambda output: output * 0) as t:
        ...     y = model(torch.randn(2, 3))
        >>> bool((t.output == 0).all()), t.output.requires_grad
        (True, True)
    """

    def __init__(
        self,
        module: nn.Module,
        layer: str | None = None,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: Callable[..., Any] | None = None,
        stop: bool = False,
    ) -> None:
        self.layer = layer
        self.stop = stop
        self._retain_output = retain_output
        self._retain_input = retain_input
        self._kept_with_grad: Any = _UNSET
        self._closed = False
        target = module if layer is None else get_module(module, layer)
        keep_grad = retain_output and retain_grad
        edit = self._make_edit(edit_output, clone, detach, keep_grad)
        needs_inputs = edit_output is not None and "inputs" in self._edit_wants
        self._call_inputs: tuple[Any, ...] = ()
        hook = Hook(
            edit,
            output=retain_output or stop,
            input=retain_input,
            edit_input=self._note_inputs if needs_inputs else None,
            detach=detach,
            clone=clone,
            whole=True,
        )
        self._run = _HookfnTrace(module, target, hook=hook, stop=stop)
        self._run.__enter__()

    def _make_edit(
        self,
        edit_output: Callable[..., Any] | None,
        clone: bool,
        detach: bool,
        keep_grad: bool,
    ) -> Callable[[Any], Any] | None:
        self._edit_wants: set[str] = set()
        if edit_output is None and not keep_grad:
            return None
        invoke = None
        if edit_output is not None:
            invoke = _call_plan(edit_output, 0, _EDIT_ARGUMENTS)
            self._edit_wants = getattr(invoke, "wants", set())

        def edit(output: Any) -> Any:
            if invoke is not None:
                edited = invoke(output=output, layer=self.layer, inputs=self._call_inputs)
                if edited is not None:
                    output = edited
            if keep_grad:
                kept = recursive_copy(output, clone=clone, detach=detach, retain_grad=True)
                self._kept_with_grad = kept
                output = recursive_copy(kept, clone=True, detach=False)
            return output

        return edit

    def _note_inputs(self, args: Args) -> None:
        self._call_inputs = args.args

    # -- results ------------------------------------------------------------------

    @property
    def output(self) -> Any:
        """The output of the layer's last call, as the module returned it (after the edit)."""
        if not self._retain_output:
            raise AttributeError(
                f"the output of {self._label} was not retained: pass retain_output=True."
            )
        if self._kept_with_grad is not _UNSET:
            return self._kept_with_grad
        outputs = self._run.capture.raw_outputs
        if not outputs:
            raise AttributeError(f"{self._label} has not run since this Trace was made.")
        return outputs[-1]

    @property
    def input(self) -> Any:
        """The positional input of the layer's last call: the only one, or their tuple."""
        if not self._retain_input:
            raise AttributeError(
                f"the input of {self._label} was not retained: pass retain_input=True."
            )
        inputs = self._run.capture.raw_inputs
        if not inputs:
            raise AttributeError(f"{self._label} has not run since this Trace was made.")
        args = inputs[-1].args
        return args[0] if len(args) == 1 else args

    @property
    def _label(self) -> str:
        return "the module" if self.layer is None else f"layer {self.layer!r}"

    # -- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        self._finish(None, None, None)

    def _finish(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._closed:
            return False
        self._closed = True
        return bool(self._run.__exit__(exc_type, exc, tb))

    def __enter__(self) -> Trace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self._finish(exc_type, exc, tb) and self.stop

    def __repr__(self) -> str:
        state = "closed" if self._closed else "active"
        return f"nethook.Trace({self.layer!r}, {state})"


_TRACE_OPTIONS = frozenset(
    {"retain_output", "retain_input", "clone", "detach", "retain_grad", "edit_output", "stop"}
)


class TraceDict(OrderedDict[str, Trace], contextlib.AbstractContextManager["TraceDict"]):
    """Retain (and optionally edit) the outputs of several layers: a `Trace` per layer.

    ::

        with TraceDict(net, ["layer1.name1", "layer2.name2"]) as ret:
            _ = net(inp)
            representation = ret["layer1.name1"].output

    The options are `Trace`'s, shared by every layer; ``edit_output(output, layer)``
    receives each layer's name. With ``stop``, the forward pass ends after the *last layer
    listed* runs. ``layers`` may also map each layer to a dict of options that override the
    shared ones there. A layer listed twice is traced once.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: Callable[..., Any] | None = None,
        stop: bool = False,
    ) -> None:
        super().__init__()
        self.stop = stop
        if isinstance(layers, str):
            raise SpecError(
                f"TraceDict takes a list of layer names, got the string {layers!r}; "
                f"write [{layers!r}] (or use Trace for one layer)."
            )
        overrides: dict[str, Mapping[str, Any]] = {}
        names: list[str] = []
        for name in layers or ():
            if name not in overrides:
                names.append(name)
                overrides[name] = {}
        if isinstance(layers, Mapping):
            for name, options in layers.items():
                if not isinstance(options, Mapping) or not set(options) <= _TRACE_OPTIONS:
                    raise SpecError(
                        f"TraceDict: the options of layer {name!r} must be a dict with keys "
                        f"among {sorted(_TRACE_OPTIONS)}, got {options!r}."
                    )
                overrides[name] = options
        shared = {
            "retain_output": retain_output,
            "retain_input": retain_input,
            "clone": clone,
            "detach": detach,
            "retain_grad": retain_grad,
            "edit_output": edit_output,
        }
        try:
            for i, name in enumerate(names):
                options = {**shared, "stop": stop and i == len(names) - 1, **overrides[name]}
                self[name] = Trace(module, name, **options)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove every layer's hooks, last layer first (idempotent)."""
        self._finish(None, None, None)

    def _finish(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        caught = False
        for trace in reversed(list(self.values())):
            caught = trace._finish(exc_type, exc, tb) or caught
        return caught

    def __enter__(self) -> TraceDict:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        caught = self._finish(exc_type, exc, tb)
        return caught and (self.stop or any(t.stop for t in self.values()))
