"""``nn.DataParallel``: its replicas run in worker threads, which must see the run's hooks.

hookfn gates every hook on a `contextvars.ContextVar` holding the tokens of the runs active in
the calling thread or asyncio task. ``DataParallel.forward`` runs its replicas through
``parallel_apply`` in fresh ``threading.Thread`` workers, which start with an empty context:
without help they would not see the run's token, and the replicas would run unhooked.

While a run that hooks modules under a ``DataParallel`` is active, `ParallelContext`
shadows that instance's ``parallel_apply`` with one that calls each replica inside a copy of
the *caller's* context (one copy per worker: a context cannot be entered by two threads at
once). It is the same computation, and a plain call of the model from another thread
carries its own context, without hookfn's tokens, so it stays unhooked. Nothing global is
patched; the shadowing attribute is removed when the last run using it ends.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["ParallelContext"]

# id(DataParallel instance) -> ids of the active runs relying on its shadowed parallel_apply.
# Only touched with the registration lock held (see `ParallelContext.attach`).
_USERS: dict[int, set[int]] = {}


class _InContext:
    """Call a replica inside a given context (what a worker thread runs)."""

    __slots__ = ("context", "replica")

    def __init__(self, context: contextvars.Context, replica: Any) -> None:
        self.context = context
        self.replica = replica

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.context.run(self.replica, *args, **kwargs)


def _parallel_apply(
    parallel: nn.DataParallel[Any], replicas: Sequence[Any], inputs: Sequence[Any], kwargs: Any
) -> list[Any]:
    calls = [_InContext(contextvars.copy_context(), replica) for replica in replicas]
    return type(parallel).parallel_apply(parallel, calls, inputs, kwargs)  # type: ignore[arg-type]


class ParallelContext:
    """Propagate the caller's context into the worker threads of some ``DataParallel``."""

    __slots__ = ("attached", "parallels")

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.parallels = tuple(m for m in modules if isinstance(m, nn.DataParallel))
        self.attached: list[nn.DataParallel[Any]] = []

    def attach(self) -> None:
        """Shadow ``parallel_apply`` (the caller holds the registration lock)."""
        for parallel in self.parallels:
            self.attached.append(parallel)  # first, so that `detach` undoes a partial attach
            users = _USERS.setdefault(id(parallel), set())
            if not users:
                parallel.__dict__["parallel_apply"] = functools.partial(_parallel_apply, parallel)
            users.add(id(self))

    def detach(self) -> None:
        """Undo `attach`. Every step is idempotent, so a cleanup cut short can run again."""
        for parallel in self.attached:
            users = _USERS.get(id(parallel))
            if users is None:
                continue
            users.discard(id(self))
            if not users:
                parallel.__dict__.pop("parallel_apply", None)
                _USERS.pop(id(parallel), None)
        self.attached.clear()
