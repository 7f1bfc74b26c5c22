"""Layer reuse: what comes before a chunk's earliest patched layer runs once per chunk.

Every cell of a chunk runs the same base prompts, so the layers before the first patched one
compute the same values for each: the chunk's forward runs them on one copy of the prompts
(``n`` rows) and grows the batch where cells start. The layers are the children of a *stack*:
an `nn.ModuleList` or `nn.Sequential` whose children ``0, 1, ...`` the model calls in turn
(``transformer.h``, ``model.layers``, a `Sequential` model itself). A cell patched inside
child ``l`` (or at its input) joins at child ``l``'s input; one patched at child ``l``'s
output joins there. Cells are sorted by where they join, and the rows are laid out as

    [cells that need every layer] [joined cells, in order] [one copy of the base prompts]

the copy being what later cells are grown from (and dropped when the last one joins). Every
tensor argument a child receives from the stack's parent with the rows of the model input
(attention masks, position ids, rotary embeddings) is re-indexed to the rows the child runs
on; key/value cache layers are indexed the same way before the forward.

The forward checks what it relies on and raises `NotExact` (the chunk then runs as a plain
stacked batch) where the model does not do what this layout needs: a child called twice or out
of order, a child that receives other rows than the layout, an output with other rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from hookfn import Args, Edit, Hook, Site, primary
from hookfn._values import replace_primary

__all__ = ["Layout", "NotExact", "Stack", "find_stack", "join_point"]


class NotExact(Exception):
    """The model does not run a grown batch as the layout needs; run the chunk plainly."""


@dataclass(frozen=True, slots=True)
class Stack:
    """A list of layers the model calls in turn: ``name`` (``""``: the model) and its
    children's full names, by index."""

    name: str
    children: tuple[str, ...]


def _stack_of(model: nn.Module, name: str) -> tuple[str, int] | None:
    """The outermost stack that holds ``name`` and the index of the child that holds it."""
    parts = name.split(".") if name else []
    for i, part in enumerate(parts):
        if not part.isdigit():
            continue
        container = ".".join(parts[:i])
        try:
            module = model.get_submodule(container)
        except AttributeError:
            return None
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            return container, int(part)
    return None


def _batch_mixing(model: nn.Module) -> bool:
    """Whether a module mixes the rows of a batch: batch norm in training mode."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )


def _uses(model: nn.Module, ids: set[int]) -> int:
    """How many times the modules ``ids`` are registered in the model (once each, unless
    shared)."""
    count, seen, todo = 0, {id(model)}, [model]
    while todo:
        for child in todo.pop()._modules.values():
            if child is None:
                continue
            count += id(child) in ids
            if id(child) not in seen:
                seen.add(id(child))
                todo.append(child)
    return count


def find_stack(model: nn.Module, names: Sequence[str]) -> Stack | None:
    """The stack that holds the sites ``names`` (the one most of them are in), or ``None``
    where layer reuse cannot be exact: no stack, children that are not ``0..n-1``, a child
    that is also used elsewhere in the model (it would run twice), or a module that mixes
    batch rows."""
    found = [s for s in (_stack_of(model, name) for name in names) if s is not None]
    if not found or _batch_mixing(model):
        return None
    container = max({c for c, _ in found}, key=lambda c: sum(1 for f, _ in found if f == c))
    module = model.get_submodule(container)
    keys = list(module._modules)
    if keys != [str(i) for i in range(len(keys))]:
        return None
    children = [module._modules[k] for k in keys]
    ids = {id(c) for c in children}
    if any(c is None for c in children) or len(ids) != len(keys) or _uses(model, ids) != len(ids):
        return None
    prefix = f"{container}." if container else ""
    return Stack(container, tuple(f"{prefix}{k}" for k in keys))


def join_point(model: nn.Module, stack: Stack | None, name: str, kind: str) -> int | None:
    """Where a cell patched at site ``name`` joins the batch: ``2 * l`` at child ``l``'s
    input, ``2 * l + 1`` at its output; ``None`` outside the stack (every layer)."""
    if stack is None:
        return None
    held = _stack_of(model, name)
    if held is None or held[0] != stack.name or held[1] >= len(stack.children):
        return None
    index = held[1]
    return 2 * index + 1 if name == stack.children[index] and kind == "output" else 2 * index


@dataclass(slots=True, eq=False)
class _Growth:
    """One join: ``gather`` takes the rows before it to the rows after it; ``source`` takes
    the rows after it to the model input's rows."""

    gather: Tensor
    source: Tensor
    rows: int


@dataclass(slots=True, eq=False)
class Layout:
    """The rows of one chunk's forward, child by child.

    Attributes:
        n: Rows per cell (prompt pairs).
        plain: Cells that run every layer (first in the rows).
        joins: ``(join point, cells)`` in order.
        first: The first child that is hooked (where the first cells join).
        input_rows: Rows of the model input.
        growth: Each join point's `_Growth`.
    """

    n: int
    plain: int
    joins: list[tuple[int, int]]
    first: int = 0
    input_rows: int = 0
    growth: dict[int, _Growth] = field(default_factory=dict)
    # During the forward:
    rows: int = 0
    source: Tensor | None = None
    last_child: int = -1

    @staticmethod
    def of(n: int, points: Sequence[int | None]) -> Layout | None:
        """The layout of cells joining at ``points`` (sorted, ``None`` first); ``None`` when
        it saves nothing (no cell joins after the model input)."""
        plain = sum(1 for p in points if p is None)
        counts: dict[int, int] = {}
        for p in points:
            if p is not None:
                counts[p] = counts.get(p, 0) + 1
        joins = sorted(counts.items())
        if not joins or (len(joins) == 1 and joins[0][1] == 1 and plain == 0):
            return None
        layout = Layout(n, plain, joins, first=joins[0][0] // 2, input_rows=(plain + 1) * n)
        base = torch.arange(plain * n, (plain + 1) * n)
        done = plain
        for k, (point, cells) in enumerate(joins):
            last = k == len(joins) - 1
            keep = 0 if last else 1
            before = torch.arange(done * n)
            here = torch.arange(done * n, (done + 1) * n)  # the base copy, last in the rows
            gather = torch.cat([before, here.repeat(cells + keep)])
            done += cells
            source = torch.cat([torch.arange(plain * n), base.repeat(done - plain + keep)])
            layout.growth[point] = _Growth(gather, source, int(gather.numel()))
        return layout

    @property
    def output_rows(self) -> int:
        return (self.plain + sum(c for _, c in self.joins)) * self.n

    def rows_of_child(self, child: int) -> Tensor:
        """``[rows]``: the model-input row of each row that child ``child`` runs on (after a
        join at its input)."""
        source = torch.arange(self.input_rows)
        for point, growth in self.growth.items():
            if point <= 2 * child:
                source = growth.source
        return source

    def start(self) -> None:
        self.rows, self.source, self.last_child = self.input_rows, None, -1

    def finish(self, output: Any) -> None:
        """Check that every join happened and the output has the chunk's rows."""
        out = primary(output)
        if self.rows != self.output_rows or out is None or out.shape[0] != self.output_rows:
            raise NotExact("the output does not have the chunk's rows")

    def _grow(self, x: Tensor, point: int) -> Tensor:
        growth = self.growth[point]
        if x.shape[0] != self.rows:
            raise NotExact(f"a child received {x.shape[0]} rows, not {self.rows}")
        self.rows, self.source = growth.rows, growth.source.to(x.device)
        return x.index_select(0, growth.gather.to(x.device))

    def _side(self, t: Any, x: Tensor) -> Any:
        """A tensor argument other than the hidden state, re-indexed to the rows the child
        runs on where it has the model input's rows."""
        if (
            isinstance(t, Tensor)
            and t is not x
            and t.dim() >= 2
            and t.shape[0] == self.input_rows
            and self.source is not None
            and self.rows != self.input_rows
        ):
            return t.index_select(0, self.source.to(t.device))
        return t

    def child_hook(self, child: int, patch_in: Edit | None, patch_out: Edit | None) -> Hook:
        """The `Hook` of stack child ``child``: joins at its input and output, the side
        arguments re-indexed, the patches of the child's own input and output."""
        point_in, point_out = 2 * child, 2 * child + 1
        grows_in, grows_out = point_in in self.growth, point_out in self.growth

        def edit_input(args: Args, site: Site) -> Args:
            if child <= self.last_child:
                raise NotExact(f"child {child} ran twice or out of order")
            self.last_child = child
            x = primary(args)
            if x is None:
                raise NotExact(f"child {child} received no tensor")
            if x.shape[0] != self.rows:
                raise NotExact(f"child {child} received {x.shape[0]} rows, not {self.rows}")
            y = self._grow(x, point_in) if grows_in else x
            if patch_in is not None:
                y = patch_in(y, site)
            leaves = pytree.tree_map(lambda t: self._side(t, x), (args.args, args.kwargs))
            new = Args(*leaves[0], **leaves[1])
            return replace_primary(new, y)  # type: ignore[no-any-return]

        def edit_output(output: Any, site: Site) -> Any:
            y = primary(output)
            if y is None:
                raise NotExact(f"child {child} returned no tensor")
            if grows_out:
                y = self._grow(y, point_out)
            elif y.shape[0] != self.rows:
                raise NotExact(f"child {child} returned {y.shape[0]} rows, not {self.rows}")
            if patch_out is not None:
                y = patch_out(y, site)
            return replace_primary(output, y)

        out_edit = edit_output if grows_out or patch_out is not None else None
        return Hook(out_edit, edit_input=edit_input, whole=True, output=False)
