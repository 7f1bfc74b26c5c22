"""The independent reference every test compares hookfn against: plain PyTorch.

Nothing here imports hookfn. Everything is written with PyTorch's own tools only:

- `raw_hooks` / `raw_run`: ``register_forward_hook`` edits and captures of a module's first
  output tensor, ``register_forward_pre_hook`` edits of its first argument; `raw_inputs`
  records the arguments of each call, `count_calls` counts the calls;
- `raw_backward`, `raw_input_grad`, `raw_perturbation_grad`: gradients by plain autograd
  (``retain_grad()``, tensor hooks, a fresh leaf) on a copy of the model;
- `raw_layer_calls`: every submodule's calls and output shapes, by forward hooks;
- `sequential_by_hand`: an ``nn.Sequential`` computed op by op with
  ``torch.nn.functional``, with no hook at all;
- `first` / `with_first`: the primary-tensor rule, written out by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

Fn = Callable[[Tensor], Tensor]


def first(value: Any) -> Tensor:
    """A module output's first tensor: itself, or the first item of a tuple / list."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"no first tensor in a {type(value).__name__}")


def with_first(value: Any, new: Tensor) -> Any:
    """``value`` with its first tensor replaced by ``new``."""
    if isinstance(value, Tensor):
        return new
    return type(value)((new, *value[1:])) if type(value) is tuple else [new, *value[1:]]


def call(model: Callable[..., Any], inputs: Any, **kwargs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs, **kwargs)
    if isinstance(inputs, tuple):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


def _clone(value: Any) -> Any:
    return pytree.tree_map_only(Tensor, lambda t: t.detach().clone(), value)


@contextmanager
def raw_hooks(
    model: nn.Module,
    edits: Mapping[str, Fn] | None = None,
    capture: Sequence[str] = (),
    *,
    pre_edits: Mapping[str, Fn] | None = None,
    whole: bool = False,
) -> Iterator[dict[str, list[Any]]]:
    """Plain hooks: edits of the first output tensor, then clones of it.

    ``edits`` are forward hooks that replace a layer's first output tensor by ``fn(it)``;
    ``pre_edits`` forward pre-hooks that replace the first tensor of its first positional
    argument (with none, of its first keyword argument) by ``fn(it)``.

    Yields ``{name: [clone of each call's first output tensor, ...]}`` (with ``whole``,
    clones of each call's whole output: tuples keep their other items). An edited and
    captured layer records its edited output.
    """
    store: dict[str, list[Any]] = {name: [] for name in capture}
    handles = []

    def editor(fn: Fn) -> Any:
        return lambda module, args, out: with_first(out, fn(first(out)))

    def pre_editor(fn: Fn) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> Any:
            if args:
                return (with_first(args[0], fn(first(args[0]))), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: with_first(kwargs[key], fn(first(kwargs[key])))}

        return hook

    def recorder(name: str) -> Any:
        keep = _clone if whole else (lambda out: first(out).detach().clone())
        return lambda module, args, out: store[name].append(keep(out))

    try:
        for name, fn in (pre_edits or {}).items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(pre_editor(fn), with_kwargs=True))
        for name, fn in (edits or {}).items():
            handles.append(model.get_submodule(name).register_forward_hook(editor(fn)))
        for name in capture:
            handles.append(model.get_submodule(name).register_forward_hook(recorder(name)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def raw_run(
    model: nn.Module,
    inputs: Any,
    edits: Mapping[str, Fn] | None = None,
    capture: Sequence[str] = (),
    *,
    pre_edits: Mapping[str, Fn] | None = None,
    whole: bool = False,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """Run ``model(inputs, **kwargs)`` (see `call`) under `raw_hooks` without gradients.

    Returns the output, and each captured layer's first output tensor (its whole output
    with ``whole``); a captured layer must run exactly once.
    """
    hooks = raw_hooks(model, edits, capture, pre_edits=pre_edits, whole=whole)
    with hooks as store, torch.no_grad():
        out = call(model, inputs, **kwargs)
    result = {}
    for name, values in store.items():
        assert len(values) == 1, f"{name} ran {len(values)} times"
        result[name] = values[0]
    return out, result


@contextmanager
def raw_inputs(
    model: nn.Module, names: Sequence[str]
) -> Iterator[dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]]]:
    """Plain forward pre-hooks (``with_kwargs=True``) that record each call's arguments.

    Yields ``{name: [(args, kwargs), ...]}`` with every tensor in them cloned.
    """
    store: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {n: [] for n in names}
    handles = []

    def recorder(name: str) -> Any:
        return lambda module, args, kwargs: store[name].append((_clone(args), _clone(kwargs)))

    try:
        for name in names:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(recorder(name), with_kwargs=True))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def count_calls(module: nn.Module) -> Iterator[list[int]]:
    """Counts the calls of ``module`` (a pre-hook: it counts even if the module fails)."""
    calls: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


# -- gradients: plain autograd on a copy of the model ----------------------------------------


@dataclass
class RawBackward:
    """What `raw_backward` saw: the model's output, and per watched layer its first output
    tensor (cloned when the hook saw it) and that tensor's ``.grad``; every parameter's
    ``.grad`` of the copy that ran."""

    out: Any
    outputs: dict[str, Tensor]
    grads: dict[str, Tensor | None]
    params: dict[str, Tensor | None]


def raw_backward(
    model: nn.Module,
    inputs: Any,
    metric: Callable[[Any], Tensor],
    watch: Sequence[str] = (),
    *,
    edits: Mapping[str, Fn] | None = None,
    pre_edits: Mapping[str, Fn] | None = None,
    grad_fns: Mapping[str, Fn] | None = None,
) -> RawBackward:
    """``metric(model(inputs)).backward()`` on a deep copy of ``model``.

    ``edits`` / ``pre_edits`` act as in `raw_hooks`. Each watched layer's first output
    tensor (edited, if edited) gets ``retain_grad()``; ``grad_fns`` puts a raw tensor hook
    on a layer's first output tensor that replaces its gradient by ``fn(grad)``.
    """
    model = copy.deepcopy(model)
    grad_fns = grad_fns or {}
    kept: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def keeper(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            tensor = first(out)
            if name in watch:
                tensor.retain_grad()
                kept[name] = tensor
                outputs[name] = tensor.detach().clone()
            if name in grad_fns:
                tensor.register_hook(grad_fns[name])

        return hook

    with ExitStack() as stack:
        stack.enter_context(raw_hooks(model, edits, pre_edits=pre_edits))
        for name in dict.fromkeys([*watch, *grad_fns]):
            handle = model.get_submodule(name).register_forward_hook(keeper(name))
            stack.callback(handle.remove)
        out = call(model, inputs)
        metric(out).backward()
    return RawBackward(
        out=out,
        outputs=outputs,
        grads={name: tensor.grad for name, tensor in kept.items()},
        params={name: p.grad for name, p in model.named_parameters()},
    )


def raw_input_grad(
    model: nn.Module, inputs: Any, name: str, metric: Callable[[Any], Tensor]
) -> Tensor:
    """The gradient flowing into ``name`` alone: on a copy, its first input (positional or,
    failing that, the first keyword) is swapped for a fresh leaf by a forward pre-hook."""
    model = copy.deepcopy(model)
    leaf: list[Tensor] = []

    def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> Any:
        if args:
            new = first(args[0]).detach().requires_grad_()
            leaf.append(new)
            return (with_first(args[0], new), *args[1:]), kwargs
        key = next(iter(kwargs))
        new = first(kwargs[key]).detach().requires_grad_()
        leaf.append(new)
        return args, {**kwargs, key: with_first(kwargs[key], new)}

    handle = model.get_submodule(name).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        metric(call(model, inputs)).backward()
    finally:
        handle.remove()
    (tensor,) = leaf
    assert tensor.grad is not None
    return tensor.grad


def raw_perturbation_grad(
    model: nn.Module, inputs: Any, layer: str, delta: Tensor, metric: Callable[[Any], Tensor]
) -> Tensor:
    """d metric / d delta, where ``delta`` is added to ``layer``'s first output tensor by a
    raw forward hook on a copy of the model: plain autograd."""
    model = copy.deepcopy(model)
    leaf = delta.clone().requires_grad_()
    with raw_hooks(model, {layer: lambda h: h + leaf}):
        metric(call(model, inputs)).backward()
    assert leaf.grad is not None
    return leaf.grad


# -- structure: every submodule's calls --------------------------------------------------------


def raw_layer_calls(
    model: nn.Module, inputs: Any
) -> list[tuple[str, str, list[tuple[int, ...]], int]]:
    """Each submodule in ``named_modules()`` order, by raw forward hooks on all of them:
    ``(name, type name, shapes of the first call's output tensors, number of calls)``."""
    calls: dict[str, list[list[tuple[int, ...]]]] = {}
    handles = []

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
            calls[name].append([tuple(t.shape) for t in leaves])

        return hook

    for name, module in model.named_modules():
        if name:
            calls[name] = []
            handles.append(module.register_forward_hook(recorder(name)))
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [
        (name, type(model.get_submodule(name)).__name__, (c[0] if c else []), len(c))
        for name, c in calls.items()
    ]


# -- no hooks at all: an nn.Sequential by hand -------------------------------------------------


def _functional(layer: nn.Module) -> Fn:
    """``layer`` (eval mode) as a ``torch.nn.functional`` call on its own weights."""
    if isinstance(layer, nn.Linear):
        return lambda h: F.linear(h, layer.weight, layer.bias)
    if isinstance(layer, nn.ReLU):
        return torch.relu
    if isinstance(layer, nn.Tanh):
        return torch.tanh
    if isinstance(layer, nn.GELU):
        return lambda h: F.gelu(h, approximate=layer.approximate)
    if isinstance(layer, nn.Dropout):
        assert not layer.training, "a Dropout in train mode has no reference"
        return lambda h: h
    if isinstance(layer, nn.BatchNorm1d):
        assert not layer.training, "a BatchNorm in train mode has no reference"
        mean, var, eps = layer.running_mean, layer.running_var, layer.eps
        return lambda h: F.batch_norm(h, mean, var, layer.weight, layer.bias, False, 0.0, eps)
    raise TypeError(f"no functional form of {type(layer).__name__}; pass it in ops=")


def sequential_by_hand(
    model: nn.Sequential,
    x: Tensor,
    edits: Mapping[int, Fn] | None = None,
    ops: Mapping[int, Fn] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """The forward pass of ``model`` by hand, without hooks or gradients.

    Layer ``i`` is computed with ``torch.nn.functional`` on its own weights (``ops[i]``
    where given, for a layer of the test's own), then ``edits[i]`` is applied to its result.
    Returns the output and a clone of each layer's (edited) output.
    """
    edits = edits or {}
    steps = [(ops or {}).get(i) or _functional(layer) for i, layer in enumerate(model)]
    acts = []
    h = x
    with torch.no_grad():
        for i, op in enumerate(steps):
            h = op(h)
            if i in edits:
                h = edits[i](h)
            acts.append(h.clone())
    return h, acts


@contextmanager
def raw_hooks_whole(module: nn.Module, fn: Callable[[Any], Any]) -> Iterator[None]:
    """A plain forward hook that replaces ``module``'s whole output by ``fn(output)``."""
    handle = module.register_forward_hook(lambda m, args, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def raw_references(module: nn.Module) -> Iterator[list[tuple[tuple[Any, ...], Any]]]:
    """A plain forward hook that keeps each call's positional arguments and output as they
    are (references, not copies), in call order."""
    calls: list[tuple[tuple[Any, ...], Any]] = []
    handle = module.register_forward_hook(lambda m, args, out: calls.append((args, out)))
    try:
        yield calls
    finally:
        handle.remove()
