"""How many cells go into one forward (``batch_size=`` or a memory budget), the progress bar,
and how the model is called for stacked rows (which keyword arguments it takes)."""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, Union

import torch
from torch import nn
from typing_extensions import TypeAlias

from hookfn import SpecError

__all__ = [
    "DEFAULT_ROWS",
    "Memory",
    "cells_per_run",
    "check_sizes",
    "forward_parameters",
    "measure_row_bytes",
    "progress_bar",
]

T = TypeVar("T")

Memory: TypeAlias = Union[int, str, None]
"""A memory budget: bytes, or a string such as ``"512MB"`` or ``"2GiB"``."""

DEFAULT_ROWS = 64
"""Rows per forward when neither ``batch_size=`` nor ``memory=`` is given."""

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def check_sizes(batch_size: object, memory: object, where: str) -> int | None:
    """Check ``batch_size=`` and ``memory=`` (before any forward); the budget in bytes.

    Raises:
        SpecError: Either is malformed, or both are given.
    """
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise SpecError(
            f"{where}: batch_size= takes a positive int (rows per forward), got {batch_size!r}."
        )
    if memory is None:
        return None
    if batch_size is not None:
        raise SpecError(f"{where}: give batch_size= or memory=, not both.")
    if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0:
        return memory
    if isinstance(memory, str):
        match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?I?B?)\s*", memory.upper())
        if match and match.group(2) in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    raise SpecError(
        f"{where}: memory= takes a number of bytes or a string such as '512MB' or '2GiB', got "
        f"{memory!r}."
    )


def cells_per_run(n: int, batch_size: int | None, budget: int | None, row_bytes: int) -> int:
    """Cells per forward: each cell is ``n`` rows (one per prompt pair); at least one."""
    rows = int(budget // max(row_bytes, 1)) if budget is not None else batch_size or DEFAULT_ROWS
    return max(1, rows // n)


def measure_row_bytes(fn: Callable[[], Any], n: int, device: torch.device) -> int:
    """The peak memory one row of ``fn``'s forward allocates, from one call of ``fn``.

    On CUDA from the allocator's peak; on the CPU from the allocation events of
    ``torch.profiler`` (the CPU allocator keeps no peak).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (event.start_ns(), event.nbytes())
            for event in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
            if event.name() == "[memory]"
        )
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
    return max(1, peak // max(n, 1))


def forward_parameters(model: nn.Module) -> frozenset[str]:
    """The keyword parameters of ``model.forward`` (to pass ``use_cache`` and such only to
    models that take them)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(
        name
        for name, p in parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def progress_bar(items: Iterable[T], total: int, enabled: bool | None, what: str) -> Iterator[T]:
    """``items``, with a tqdm progress bar when enabled (``None``: on a terminal, for 8 runs
    or more) and tqdm is installed."""
    if enabled is None:
        enabled = total >= 8 and sys.stderr.isatty()
    if enabled:
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            enabled = False
        else:
            yield from tqdm(items, total=total, desc=what, unit="run", leave=False)
            return
    yield from items
