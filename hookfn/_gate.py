"""The gate every hook passes first: run tokens, the registration lock, backward state, stop.

A run (one ``with`` block, one `run_with_hooks` call) draws a fresh token when it opens. Its
hooks act only where that token is active: in the context (thread, asyncio task) that opened
the run, or in the autograd threads of the run's own ``backward=`` pass. Everything else on
the hook path (`hookfn._hooks`) comes after this test.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "ACTIVE",
    "BEFORE_STOP",
    "DEFERRAL",
    "GRAFTS",
    "HOOK_KEYS",
    "IN_BACKWARD",
    "REGISTRY",
    "Replays",
    "StopForward",
    "Stopper",
    "activate",
    "active_grafts",
    "deactivate",
    "graph_task",
    "suspended",
]

# The run tokens whose hooks may act in the current context. Hooks of a run fire only where
# its token is active, so a concurrent call on the same model (another thread or asyncio
# task) never sees them.
ACTIVE: contextvars.ContextVar[frozenset[object]] = contextvars.ContextVar(
    "hookfn_active", default=frozenset()
)

# Serializes hook registration and removal across threads, so that no registration reorders
# a hook dictionary another one is reading. Never taken on the hook path.
REGISTRY = threading.RLock()

# Tokens of the runs whose ``backward=`` pass is in progress, each with the ids of the
# autograd graph tasks of that pass. Activation checkpointing re-runs forwards during
# backward, on accelerators in autograd worker threads that do not see the run's context;
# the hooks look here instead. A concurrent backward of another thread runs in another
# graph task, so its re-runs never see this run's edits.
IN_BACKWARD: dict[object, set[int]] = {}

graph_task = torch._C._current_graph_task_id

# Modules spliced into a model (`hookfn.splice`) by the runs open now, by run token: each a
# ``(host, name, module)`` triple, whose parts are sites named ``host_name.name.part`` for
# the runs that resolve their keys where that run is active (its own, and nested ones).
GRAFTS: dict[object, tuple[tuple[nn.Module, str, nn.Module], ...]] = {}


def active_grafts() -> list[tuple[nn.Module, str, nn.Module]]:
    """The grafts of the runs active in this context (none where no run splices)."""
    if not GRAFTS:
        return []
    return [graft for token in ACTIVE.get() for graft in GRAFTS.get(token, ())]


# hookfn inserts its hooks into a module's hook dictionaries directly, under keys of its
# own: negative numbers, which PyTorch's handles (counting up from 0) never draw, so no
# registration of another thread can take the same key. ``next`` on a count is atomic.
HOOK_KEYS = itertools.count(-1, -1)


def activate(token: object) -> contextvars.Token[frozenset[object]]:
    """Add ``token`` to the runs active in this context; `deactivate` undoes it."""
    return ACTIVE.set(ACTIVE.get() | {token})


def deactivate(token: object, reset: contextvars.Token[frozenset[object]] | None) -> None:
    """Drop ``token`` from the active set; idempotent.

    The context is reset exactly (``ContextVar.reset``) when nothing changed it since the
    token was added; otherwise (nested blocks exited out of order, an exit in another
    context) only this token is dropped, and every other run stays active.
    """
    current = ACTIVE.get()
    if token not in current:
        return
    if reset is not None:
        old = reset.old_value
        if old is contextvars.Token.MISSING:
            unchanged = len(current) == 1
        else:
            unchanged = len(current) == len(old) + 1 and old <= current
        if unchanged:
            try:
                ACTIVE.reset(reset)
                return
            except (ValueError, RuntimeError):
                pass  # exited in another context than it was entered in
    ACTIVE.set(current - {token})


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No run's hooks act inside the block (in this context): for a computation a hook
    makes that the run must not see, such as a splice's reconstruction of unedited latents."""
    reset = ACTIVE.set(frozenset())
    try:
        yield
    finally:
        ACTIVE.reset(reset)


class Replays:
    """Maps a forward that activation checkpointing re-runs during backward to its first run.

    The re-run applies the edits again, with the `Site` of the call it replays, and records
    nothing. A module called once per forward replays call 0; a module called several times
    is matched in the order backward re-runs checkpointed segments, the last one first.
    """

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def call(self, calls: int) -> int:
        if calls <= 1:
            return 0
        task = graph_task()
        replayed = self.seen.get(task, 0)
        self.seen[task] = replayed + 1
        return calls - 1 - replayed % calls


class StopForward(BaseException):
    """Raised inside the forward pass once every requested capture is taken (``stop_early``).

    It derives from `BaseException` so that a model's own ``except Exception`` cannot swallow
    it. The run that raised it catches it: `run_with_hooks` returns, a ``with`` block ends
    normally.
    """

    def __init__(self, token: object) -> None:
        super().__init__("hookfn: every requested capture was taken; forward stopped early")
        self.token = token


# Called with the torch function mode stack's depth at a run's start, right before its stop
# cuts its forward short: op sites' modes above it are left there (see `hookfn._ops.unwind`),
# before the stop passes through code that leaves modes of its own.
BEFORE_STOP: list[Callable[[int], None]] = []


class Stopper:
    """Counts the sites that still have to record their first call (``stop_early``)."""

    __slots__ = ("depth", "pending", "token")

    def __init__(self, token: object, sites: int) -> None:
        self.token = token
        self.pending = sites
        self.depth = torch._C._len_torch_function_stack()

    def site_done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            stop = StopForward(self.token)
            if DEFERRAL.depth:
                DEFERRAL.stops.append((stop, self.depth))
                return
            for before in BEFORE_STOP:
                before(self.depth)
            raise stop


class _Deferral(threading.local):
    """Stops raised where they cannot pass yet: inside an op site's function mode handler
    (PyTorch pushes the mode back as an exception leaves it, so a stop raised there would
    leave the mode on the stack). The host module's forward hook raises them."""

    def __init__(self) -> None:
        self.depth = 0
        self.stops: list[tuple[StopForward, int]] = []


DEFERRAL = _Deferral()
