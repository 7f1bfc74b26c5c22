"""`layers`: list a model's hookable layers with what they produce for one input."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._capture import Args, Capture, primary
from ._components import components
from ._errors import HookfnError
from ._hook import Hook
from ._keys import unwrap
from ._ops import op_name
from ._plan import plan
from ._run import run_with_hooks

__all__ = ["LayerInfo", "LayerTable", "layers"]

# Captures go to the meta device: they keep shape and dtype and hold no memory, so a dry run
# of a large model costs what a plain forward pass costs.
_SHAPES_ONLY = Hook(device="meta", clone=False)
_MAX_SHAPES_SHOWN = 3


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One hookable layer and what it produced in a dry run.

    Attributes:
        name: The dotted name to use as a spec key, as ``named_modules()`` gives it (for a
            wrapped model, without the wrapper's ``module.`` / ``_orig_mod.`` prefix unless
            ``match`` spells it).
        type: The module's class name.
        shapes: The shape of every tensor in the output of the first call, in pytree order;
            the primary tensor (the one captures and edits act on) comes first when the
            output has one. Empty when the module was not called.
        dtype: The dtype of the primary output tensor, or ``None`` when there is none.
        calls: How many times the module ran.
        params: The number of parameter elements of the module and its submodules (shared
            parameters counted once).

    Examples:
        >>> import torch
        >>> info = LayerInfo("fc", "Linear", ((2, 3),), torch.float32, 1, 15)
        >>> print(info)
        fc  Linear  (2, 3)  calls=1  params=15
    """

    name: str
    type: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype | None
    calls: int
    params: int

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The shape of the primary output tensor, or ``None`` when there is none."""
        return self.shapes[0] if self.shapes and self.dtype is not None else None

    def _shapes_text(self) -> str:
        if self.calls == 0:
            return "(not called)"
        if not self.shapes:
            return "(no tensor)"
        shown = ", ".join(str(shape) for shape in self.shapes[:_MAX_SHAPES_SHOWN])
        hidden = len(self.shapes) - _MAX_SHAPES_SHOWN
        return f"{shown}, +{hidden} more" if hidden > 0 else shown

    def __str__(self) -> str:
        return (
            f"{self.name}  {self.type}  {self._shapes_text()}  calls={self.calls}  "
            f"params={self.params}"
        )


class LayerTable(list[LayerInfo]):
    """The list `layers` returns: a plain list of `LayerInfo` that prints as a table.

    Examples:
        >>> import torch
        >>> table = LayerTable([LayerInfo("0", "Linear", ((2, 3),), torch.float32, 1, 15)])
        >>> print(table)
        name  type    output  calls  params
        0     Linear  (2, 3)      1      15
        >>> table.names
        ['0']
    """

    @property
    def names(self) -> list[str]:
        """The layer names, in model order."""
        return [info.name for info in self]

    def __str__(self) -> str:
        header = ("name", "type", "output", "calls", "params")
        rows = [
            (info.name, info.type, info._shapes_text(), str(info.calls), f"{info.params:,}")
            for info in self
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = []
        for row in [header, *rows]:
            # Text columns to the left, numbers to the right.
            cells = [
                cell.ljust(width) if i < 3 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def _info(name: str, module: nn.Module, capture: Capture) -> LayerInfo:
    shapes: tuple[tuple[int, ...], ...] = ()
    dtype = None
    if capture.raw_outputs:
        first = capture.raw_outputs[0]
        leaves = [leaf for leaf in pytree.tree_leaves(first) if isinstance(leaf, Tensor)]
        main = primary(first)
        if main is not None:
            dtype = main.dtype
            leaves = [main, *(leaf for leaf in leaves if leaf is not main)]
        shapes = tuple(tuple(leaf.shape) for leaf in leaves)
    params = sum(p.numel() for p in module.parameters())
    return LayerInfo(name, type(module).__name__, shapes, dtype, capture.n_calls, params)


def layers(
    model: nn.Module,
    inputs: object,
    match: str = "**",
    *,
    forward: Callable[..., Any] | None = None,
    ops: bool = False,
) -> LayerTable:
    """List the layers of ``model`` that a spec can name, with what each produces.

    Runs the model once on ``inputs`` (under ``torch.no_grad()``), with a capture at every
    layer that ``match`` selects, and reports each layer's name, type, output shapes, number
    of calls and parameter count, in model order. Layers the run did not reach are listed
    with ``calls=0``. ``print(...)`` the result for a table.

    The dry run leaves nothing behind: its hooks are removed, the captured tensors are
    shape-only (meta-device) copies that are dropped before returning, the random number
    generator state is restored (dropout), and buffers of modules in training mode
    (batch-norm statistics) are put back as they were.

    Args:
        model: The model (compiled, DataParallel and DDP wrappers included).
        inputs: As for `run_with_hooks`: a tensor, a tuple of positional arguments, a
            mapping of keyword arguments, or `Args`.
        match: A layer name or a glob over layer names (``*`` one dotted segment, ``**``
            any number); the default lists every layer.
        forward: Call this instead of ``model`` (as in `run_with_hooks`).
        ops: Also list the sites inside the modules' forwards: each torch function a listed
            module calls itself (not inside a submodule), as the op key that names it
            (``"transformer.h.0.attn:softmax"``, type ``op``; ``calls`` counts its calls in
            the run), right after the module; and, with the default ``match``, for an
            architecture with component names, each component (``blocks.0.attn.hook_z``,
            type ``component``) at the end.
            Shape and layout functions (``view``, ``transpose``, ``size``, ...) are left out.

    Returns:
        A `LayerTable`: a list of `LayerInfo` in ``named_modules()`` order.

    Raises:
        LayerNotFoundError: ``match`` matches no layer.

    Examples:
        >>> import torch
        >>> from hookfn import layers
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> table = layers(model, torch.randn(2, 4))
        >>> print(table)
        name  type    output  calls  params
        0     Linear  (2, 3)      1      15
        1     ReLU    (2, 3)      1       0
        >>> table[0].shape, table.names
        ((2, 3), ['0', '1'])
    """
    inner, _ = unwrap(model)
    if match == "**" and next(inner.children(), None) is None:
        return LayerTable()
    spec = {match: _SHAPES_ONLY}
    modules = {site.name: site.module for site in plan(model, spec)}
    saved = [
        (buffer, buffer.clone())
        for module in inner.modules()
        if module.training
        for buffer in module.buffers(recurse=False)
    ]
    devices = sorted({p.device.index or 0 for p in inner.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            _, caches = run_with_hooks(model, inputs, spec, forward=forward)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    table = LayerTable(_info(name, modules[name], capture) for name, capture in caches.items())
    if not ops:
        return table
    return _with_ops(model, inputs, forward, table, match)


# Functions that only reshape, view, or read sizes: not listed as op sites.
_LAYOUT = frozenset(
    [
        "get",
        "getitem",
        "setitem",
        "size",
        "dim",
        "view",
        "view_as",
        "reshape",
        "transpose",
        "permute",
        "contiguous",
        "split",
        "chunk",
        "unbind",
        "expand",
        "expand_as",
        "unsqueeze",
        "squeeze",
        "flatten",
        "unflatten",
        "to",
        "type",
        "float",
        "half",
        "numel",
        "stride",
        "is_floating_point",
        "device",
        "dtype",
        "shape",
        "T",
        "mT",
        "len",
        "iter",
        "repr",
        "format",
        "bool",
        "tril",
        "triu",
        "ones",
        "zeros",
        "full",
        "arange",
        "empty",
        "new_ones",
        "new_zeros",
        "new_full",
        "clone",
        "detach",
    ]
)


class _OpRecorder(TorchFunctionMode):
    """Records, for the innermost module running, the torch functions it calls."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict[str, int]]] = []
        self.found: dict[tuple[str, str], list[Any]] = {}  # -> [calls, first result shape]

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        name = op_name(func)
        if self.stack and name not in _LAYOUT and isinstance(result, Tensor):
            module, counts = self.stack[-1]
            counts[name] = counts.get(name, 0) + 1
            entry = self.found.setdefault((module, name), [0, tuple(result.shape), result.dtype])
            entry[0] += 1
        return result


def _with_ops(
    model: nn.Module,
    inputs: object,
    forward: Callable[..., Any] | None,
    table: LayerTable,
    match: str,
) -> LayerTable:
    inner, prefix = unwrap(model)
    names = {id(m): prefix + n for n, m in inner.named_modules() if n}
    recorder = _OpRecorder()

    def enter(module: nn.Module, args: Any) -> None:
        name = names.get(id(module))
        if name is not None:
            recorder.stack.append((name, {}))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in names and recorder.stack:
            recorder.stack.pop()

    from torch.nn.modules import module as torch_module

    handles = [
        torch_module.register_module_forward_pre_hook(enter),
        torch_module.register_module_forward_hook(leave, always_call=True),
    ]
    call = forward if forward is not None else model
    devices = sorted({p.device.index or 0 for p in inner.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), recorder:
            _call(call, inputs)
    finally:
        for handle in handles:
            handle.remove()
    by_module: dict[str, list[LayerInfo]] = {}
    for (module, op), (calls, shape, dtype) in recorder.found.items():
        info = LayerInfo(f"{module}:{op}", "op", (shape,), dtype, calls, 0)
        by_module.setdefault(module, []).append(info)
    rows = LayerTable()
    for info in table:
        rows.append(info)
        rows.extend(by_module.get(info.name, ()))
    try:
        listed = components(inner)
    except HookfnError:
        return rows
    if match != "**":  # (components are listed with every layer, not under a filter)
        return rows
    shown = set(listed)
    spec = {"blocks.**": _SHAPES_ONLY}
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        _, caches = run_with_hooks(model, inputs, spec, forward=forward)
    for name, capture in caches.items():
        if name in shown:
            found = _info(name, nn.Identity(), capture)
            rows.append(LayerInfo(name, "component", found.shapes, found.dtype, found.calls, 0))
    return rows


def _call(call: Callable[..., Any], inputs: object) -> None:
    if isinstance(inputs, Args):
        call(*inputs.args, **inputs.kwargs)
    elif isinstance(inputs, Mapping):
        call(**inputs)
    elif isinstance(inputs, tuple):
        call(*inputs)
    else:
        call(inputs)
