"""The independent reference every test compares hookfn against: plain PyTorch hooks.

Nothing here imports hookfn. `raw_run` runs a model with ``register_forward_hook`` edits
and captures; `first` is the primary-tensor rule written out by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


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


@contextmanager
def raw_hooks(
    model: nn.Module,
    edits: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    capture: Sequence[str] = (),
) -> Iterator[dict[str, list[Tensor]]]:
    """Plain forward hooks: edits of the first output tensor, then clones of it.

    Yields ``{name: [clone of each call's first output tensor, ...]}``. An edited and
    captured layer records its edited output.
    """
    store: dict[str, list[Tensor]] = {name: [] for name in capture}
    handles = []

    def editor(fn: Callable[[Tensor], Tensor]) -> Any:
        return lambda module, args, out: with_first(out, fn(first(out)))

    def recorder(name: str) -> Any:
        return lambda module, args, out: store[name].append(first(out).detach().clone())

    try:
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
    edits: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    capture: Sequence[str] = (),
) -> tuple[Any, dict[str, Tensor]]:
    """Run ``model(inputs)`` under `raw_hooks` without gradients; the output, and each
    captured layer's (only) first output tensor."""
    with raw_hooks(model, edits, capture) as store, torch.no_grad():
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    result = {}
    for name, values in store.items():
        assert len(values) == 1, f"{name} ran {len(values)} times"
        result[name] = values[0]
    return out, result


@contextmanager
def count_calls(module: nn.Module) -> Iterator[list[int]]:
    """Counts the calls of ``module`` (a pre-hook: it counts even if the module fails)."""
    calls: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()
