"""What the call-scope gate costs on the hook path.

Every hookfn hook starts with one test, ``token in ACTIVE.get()`` (``hookfn._gate``): a
ContextVar read and a frozenset lookup, so that a run's hooks act only in its own thread or
asyncio task. This script measures that gate in place, where it runs:

    OMP_NUM_THREADS=1 python benchmarks/bench_gate.py

Rows (nanoseconds per call; the minimum over repeats, each the mean of many calls):

- ``empty hook``: calling a Python hook ``f(module, args, output)`` that returns at once;
- ``hookfn hook, other run``: calling a hookfn forward hook from a context where its run is
  not active (what a concurrent plain call pays per hooked module): the empty call plus the
  gate;
- ``module call ...``: a ``nn.Identity`` call with no hook, with an empty raw hook, and with
  an inactive hookfn hook; the last two differ by the gate, in place.

The figures quoted in docs/guarantees.md come from this script.
"""

from __future__ import annotations

import contextvars
import platform
import timeit
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hookfn import Hook, TraceMultiple

REPEATS = 7


def per_call_ns(fn: Callable[[], Any], number: int) -> float:
    """The best of ``REPEATS`` timings of ``number`` calls, in nanoseconds per call."""
    timer = timeit.Timer(fn)
    return min(timer.repeat(repeat=REPEATS, number=number)) / number * 1e9


def measure(number: int = 200_000) -> dict[str, float]:
    module = nn.Identity()
    x = torch.zeros(1)
    rows: dict[str, float] = {}

    with TraceMultiple(module, {"": Hook(output=False, edit=lambda t: t)}):
        (hook,) = module._forward_hooks.values()

    def empty(m: nn.Module, args: Any, output: Any) -> None:
        return None

    args = (x,)
    rows["empty hook"] = per_call_ns(lambda: empty(module, args, x), number)
    # The run is over, so its token is not active here: the hook returns after the gate.
    rows["hookfn hook, other run"] = per_call_ns(lambda: hook(module, args, x), number)
    rows["gate in a hook (difference)"] = rows["hookfn hook, other run"] - rows["empty hook"]

    calls = number // 4
    rows["module call, no hook"] = per_call_ns(lambda: module(x), calls)
    # Raw and hookfn rounds alternate, and each keeps its best: the machine's drift hits
    # both alike.
    raw, gated = float("inf"), float("inf")
    for _ in range(5):
        handle = module.register_forward_hook(empty)
        raw = min(raw, per_call_ns(lambda: module(x), calls))
        handle.remove()
        # A run active in another context (as in another thread): its hook is registered
        # and gated off for the calls made here.
        other = contextvars.copy_context()
        block = TraceMultiple(module, {"": Hook(output=False, edit=lambda t: t)})
        other.run(block.__enter__)
        try:
            gated = min(gated, per_call_ns(lambda: module(x), calls))
        finally:
            other.run(block.__exit__, None, None, None)
    rows["module call, empty raw hook"] = raw
    rows["module call, inactive hookfn hook"] = gated
    rows["gate in a module call (difference)"] = (
        rows["module call, inactive hookfn hook"] - rows["module call, empty raw hook"]
    )
    return rows


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    for name, value in measure().items():
        print(f"{name:40s} {value:8.0f} ns")


if __name__ == "__main__":
    main()
