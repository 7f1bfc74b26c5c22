"""The chunks of an exact sweep: which cells share a forward.

Cells that change the same first position run together (position reuse); where there are
several such groups, neighbouring ones share a forward when a cost model measured on the
model says that is faster: a forward on positions ``p..`` costs a fixed part plus a part per
row, position and layer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hookfn import Args, primary

if TYPE_CHECKING:
    from ._exact import Cell, Runner

__all__ = ["plan_chunks", "synchronize"]


def plan_chunks(
    runner: Runner, groups: dict[int, list[Cell]], per_run: int, vmap: bool, whole: float
) -> list[tuple[int, list[Cell]]]:
    """The chunks of cells, each run in one forward: ``(first position, cells)``.

    Each group of cells that change the same first position is cut into pieces of at most
    ``per_run`` cells, in `Cell.order` (so cells that join at nearby layers run together).
    Where there are several groups (position reuse), neighbouring pieces are merged into one
    forward when that is estimated to be faster: a forward on positions ``p..`` costs a fixed
    part plus a part per row, position and layer, both measured on this model
    (``whole``: the seconds of the base run; `_forward_costs`); merged cells run from the
    earliest first position of the chunk.
    """
    pieces = [
        (start, cells[k : k + per_run])
        for start, cells in sorted(groups.items())
        for k in range(0, len(cells), per_run)
    ]
    if vmap or len(groups) < 2 or len(pieces) < 2:
        return pieces
    fixed, per_position = _forward_costs(runner, whole)
    seq = int(runner.sides.base.seq or 1)
    children = len(runner.stack.children) if runner.stack is not None else 0

    def cost(first: int, last: int) -> float:
        start = pieces[first][0]
        cells = [c for _, piece in pieces[first:last] for c in piece]
        grows = runner.stack is not None and (start == 0 or runner.kv_layers)
        share = _copies(cells, children) / children if grows else len(cells)
        return fixed + per_position * (seq - start) * share

    best: list[tuple[float, int]] = [(0.0, 0)]  # (cost of pieces[:i], where the last chunk begins)
    for i in range(1, len(pieces) + 1):
        options = []
        count = 0
        for j in range(i - 1, -1, -1):
            count += len(pieces[j][1])
            if count > per_run and j < i - 1:
                break
            options.append((best[j][0] + cost(j, i), j))
        best.append(min(options))
    bounds = []
    i = len(pieces)
    while i > 0:
        bounds.append((best[i][1], i))
        i = best[i][1]
    chunks = []
    for first, last in reversed(bounds):
        cells = sorted((c for _, piece in pieces[first:last] for c in piece), key=lambda c: c.order)
        chunks.append((pieces[first][0], cells))
    return chunks


def _copies(cells: list[Cell], children: int) -> int:
    """The rows (in copies of the prompts) the stack's children run on, summed over them,
    when ``cells`` run as one grown batch (`_layers.Layout`)."""
    plain = sum(1 for c in cells if c.join is None)
    joined = [0] * (2 * children + 1)
    for c in cells:
        if c.join is not None:
            joined[min(c.join, 2 * children)] += 1
    total, done, waiting = 0, plain, len(cells) - plain
    for child in range(children):
        done += joined[2 * child]  # joined at its input
        waiting -= joined[2 * child]
        total += done + (1 if waiting else 0)
        done += joined[2 * child + 1]  # joined at its output
        waiting -= joined[2 * child + 1]
    return total


def _forward_costs(runner: Runner, whole: float) -> tuple[float, float]:
    """Seconds of a forward of the base prompts: a fixed part, and a part per position
    (from the base run on every position, ``whole`` seconds, and a forward on the last
    position only, on the cropped key/value cache)."""
    base, n = runner.sides.base, runner.n
    seq = int(base.seq or 1)
    pair = torch.arange(n)
    extra, _ = runner.extra(seq - 1, pair)
    args = base.tail(seq - 1, pair)
    args = Args(*args.args, **{**args.kwargs, **extra})
    began = time.perf_counter()
    with torch.no_grad():
        synchronize(primary(runner.model(*args.args, **args.kwargs)))
    last = time.perf_counter() - began
    per_position = max(whole - last, 0.0) / max(seq - 1, 1)
    return max(last - per_position, 0.0), per_position


def synchronize(tensor: Tensor | None) -> None:
    """Wait for the device to finish the work that made ``tensor`` (for timing)."""
    if tensor is not None and tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)
