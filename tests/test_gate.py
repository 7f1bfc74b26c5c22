"""The gate: hook keys that never collide, and a fresh token for every run."""

from __future__ import annotations

import contextvars
import threading

import pytest
import torch
from reference import raw_run
from torch import nn
from torch.utils.hooks import RemovableHandle

from hookfn import Trace, TraceMultiple, add, run_with_hooks


def test_hook_keys_never_collide_with_handles_a_user_thread_draws() -> None:
    """A user thread registering plain hooks while runs register theirs: every hook of
    both stays in place under its own key, and every run edits as a raw hook does."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    stop = threading.Event()
    handles: list[RemovableHandle] = []

    def register_plain_hooks() -> None:
        while not stop.is_set() and len(handles) < 300:
            handles.append(model[1].register_forward_hook(lambda m, a, o: None))

    thread = threading.Thread(target=register_plain_hooks)
    thread.start()
    try:
        delta = torch.randn(4)
        for _ in range(200):
            with torch.no_grad():
                out, _ = run_with_hooks(model, x, {"0": add(delta), "1": "capture"})
            assert len(model[0]._forward_hooks) == 0
    finally:
        stop.set()
        thread.join()
    keys = set(model[1]._forward_hooks)
    assert keys == {h.id for h in handles}  # no user hook was overwritten or removed
    for h in handles:
        h.remove()
    ref, _ = raw_run(model, x, {"0": lambda h: h + delta})
    torch.testing.assert_close(out, ref)


def _zeroing(api: str, model: nn.Module) -> TraceMultiple:
    if api == "Trace":
        return Trace(model, "0", edit_output=lambda h: h * 0)
    return TraceMultiple(model, {"0": lambda h: h * 0})


@pytest.mark.parametrize("api", ["Trace", "TraceMultiple"])
def test_a_reentered_trace_does_not_act_in_a_context_copied_in_an_earlier_block(api: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with torch.no_grad():
        plain = model(x)
    trace = _zeroing(api, model)
    with trace, torch.no_grad():
        model(x)
        earlier = contextvars.copy_context()  # e.g. a task started in the first block
    with trace, torch.no_grad():
        assert torch.equal(model(x), torch.zeros_like(plain))  # this block edits
        from_earlier = earlier.run(model, x)  # the earlier block's context does not
    torch.testing.assert_close(from_earlier, plain)


@pytest.mark.parametrize("api", ["Trace", "TraceMultiple"])
def test_an_interrupt_as_exit_begins_leaves_no_hook(api: str) -> None:
    """The with statement takes ``__exit__`` before it enters; if an interrupt stops the
    call before its first line runs, dropping what it took closes the run."""
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with torch.no_grad():
        plain = model(x)
    trace = _zeroing(api, model)
    exit_ = trace.__exit__  # what the with statement holds
    trace.__enter__()
    assert len(model[0]._forward_hooks) == 2
    del exit_  # interrupted before the call: the with statement drops it
    assert len(model[0]._forward_hooks) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain)
