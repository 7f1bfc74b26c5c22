"""`layers`: list a model's hookable layers with what they produce for one input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._capture import Capture, primary
from ._hook import Hook
from ._keys import unwrap
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
    return LayerTable(_info(name, modules[name], capture) for name, capture in caches.items())
