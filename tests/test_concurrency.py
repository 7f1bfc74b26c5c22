"""Call-scoped hooks: threads, asyncio tasks, nested runs and DataParallel worker threads.

Every result is compared with a hand-written forward pass (``F.linear`` and friends, with
the edits applied by hand), computed single-threaded before the concurrent part starts.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import snapshot_hooks
from reference import sequential_by_hand
from torch import Tensor, nn

from hookfn import Hook, Trace, TraceMultiple, add, run_with_hooks, splice
from hookfn._gate import ACTIVE as _ACTIVE

WIDTH = 16
N_THREADS = 4
RUNS_PER_THREAD = 100  # 400 hooked or plain runs, in four threads at once


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 4)
    ).eval()


@dataclass
class Job:
    """One run: what to call, and what it must return."""

    kind: str
    x: Tensor
    spec: Any
    out: Tensor
    captures: dict[str, Tensor] = field(default_factory=dict)  # layer -> primary tensor
    inputs: dict[str, Tensor] = field(default_factory=dict)


def make_job(model: nn.Sequential, rng: random.Random, seed: int) -> Job:
    """A random job of one of five kinds, with its reference computed by hand."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rng.randint(1, 5), 8, generator=gen)
    kind = rng.choice(["edit", "glob", "scale_input", "edit_input", "plain"])
    if kind == "edit":
        delta = torch.randn(WIDTH, generator=gen)
        out, acts = sequential_by_hand(model, x, {0: lambda h: h + delta})
        return Job(kind, x, {"0": add(delta), "2": "capture"}, out, {"0": acts[0], "2": acts[2]})
    if kind == "glob":
        out, acts = sequential_by_hand(model, x)
        return Job(kind, x, {"*": "capture"}, out, {str(i): a for i, a in enumerate(acts)})
    if kind == "scale_input":
        factor = rng.uniform(-2, 2)
        out, acts = sequential_by_hand(model, x, {2: lambda h: h * factor})
        spec = {"2": Hook(lambda h: h * factor, input=True)}
        return Job(kind, x, spec, out, {"2": acts[2]}, {"2": acts[1]})
    if kind == "edit_input":
        delta = torch.randn(WIDTH, generator=gen)
        # Editing layer 2's input is editing layer 1's output, as far as the math goes.
        out, acts = sequential_by_hand(model, x, {1: lambda h: h + delta})
        spec = {"2": Hook(edit_input=add(delta), input=True, output=False)}
        return Job(kind, x, spec, out, {}, {"2": acts[1]})
    out, _ = sequential_by_hand(model, x)
    return Job(kind, x, None, out)


def run_job(model: nn.Module, job: Job) -> list[str]:
    """Run a job; return the mismatches found (empty when everything is right)."""
    if job.spec is None:
        with torch.no_grad():
            out = model(job.x)
        return [] if torch.equal(out, job.out) else [f"plain call: output differs ({job.kind})"]
    with torch.no_grad():
        out, caches = run_with_hooks(model, job.x, job.spec)
    return check(job, out, caches)


def check(job: Job, out: Tensor, caches: dict[str, Any]) -> list[str]:
    problems = []
    if not torch.allclose(out, job.out, rtol=0, atol=1e-6):
        problems.append(f"{job.kind}: output differs")
    for name, expected in job.captures.items():
        if not torch.allclose(caches[name].output, expected, rtol=0, atol=1e-6):
            problems.append(f"{job.kind}: capture of {name} differs")
    for name, expected in job.inputs.items():
        if not torch.allclose(caches[name].input, expected, rtol=0, atol=1e-6):
            problems.append(f"{job.kind}: input capture of {name} differs")
    return problems


@contextmanager
def fast_switching() -> Iterator[None]:
    """Make the interpreter switch threads every few bytecodes, to provoke interleavings."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def test_threads_share_one_model_and_each_gets_its_own_result():
    model = make_model()
    before = snapshot_hooks(model)
    rng = random.Random(0)
    jobs = [
        [make_job(model, rng, seed=t * 1000 + i) for i in range(RUNS_PER_THREAD)]
        for t in range(N_THREADS)
    ]
    assert {job.kind for batch in jobs for job in batch} == {
        "edit",
        "glob",
        "scale_input",
        "edit_input",
        "plain",
    }
    problems: list[str] = []
    overlap = [0]  # runs that saw another run's hooks registered: proof of interleaving
    barrier = threading.Barrier(N_THREADS)

    def worker(batch: list[Job]) -> None:
        barrier.wait()
        try:
            for job in batch:
                if len(model[2]._forward_hooks) + len(model[2]._forward_pre_hooks) > 0:
                    overlap[0] += 1
                problems.extend(run_job(model, job))
        except BaseException as error:  # an exception is a failure too, with its repr
            problems.append(repr(error))

    with fast_switching():
        threads = [threading.Thread(target=worker, args=(batch,)) for batch in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert problems == []
    assert overlap[0] > 0, "the threads never overlapped; the test proved nothing"
    assert snapshot_hooks(model) == before
    assert _ACTIVE.get() == frozenset()


@pytest.mark.parametrize("step", ["edit", "transcoder"])
def test_registration_storm_on_one_module(step: str):
    # Three threads register and remove hooks on the same module as fast as they can while a
    # fourth calls it plainly: the races of PyTorch's hook bookkeeping (handle ids drawn
    # from a shared counter, a hook removed between a call's snapshot of the hooks and its
    # with-kwargs lookup) must neither raise nor lose a hook. The transcoder's edit step is
    # a forward hook with keyword arguments (it reads the module's input).
    torch.manual_seed(3)
    layer = nn.Linear(4, 4)
    x, delta = torch.randn(2, 4), torch.randn(4)
    transcoder = nn.Linear(4, 4)
    with torch.no_grad():
        plain = F.linear(x, layer.weight, layer.bias)
        if step == "edit":
            edit: Any = add(delta)
            edited = plain + delta
        else:
            edit = splice(transcoder, from_input=True)
            edited = F.linear(x, transcoder.weight, transcoder.bias)
    problems: list[str] = []
    barrier = threading.Barrier(4)

    def hooked() -> None:
        barrier.wait()
        try:
            for _ in range(300):
                with torch.no_grad():
                    out, caches = run_with_hooks(layer, x, {"": Hook(edit, input=True)})
                if not (torch.equal(out, edited) and torch.equal(caches[""].input, x)):
                    problems.append("a hooked run lost its hook")
        except BaseException as error:
            problems.append(repr(error))

    def plain_calls() -> None:
        barrier.wait()
        try:
            for _ in range(300):
                with torch.no_grad():
                    if not torch.equal(layer(x), plain):
                        problems.append("a plain call saw a hook")
        except BaseException as error:
            problems.append(repr(error))

    with fast_switching():
        threads = [threading.Thread(target=f) for f in (hooked, hooked, hooked, plain_calls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert problems == []
    assert not layer._forward_hooks
    assert not layer._forward_pre_hooks


def test_plain_calls_in_other_threads_see_no_hooks_while_a_run_is_active():
    # A hooked run holds its hooks open (an edit that waits) while another thread calls
    # the model plainly: that call must be unedited, and the hooked run must be edited.
    model = make_model()
    x = torch.randn(3, 8)
    plain, _ = sequential_by_hand(model, x)
    edited, _ = sequential_by_hand(model, x, {0: lambda h: h * 0})
    entered, release = threading.Event(), threading.Event()

    def slow_zero(h: Tensor) -> Tensor:
        entered.set()
        assert release.wait(10)
        return h * 0

    result: dict[str, Any] = {}

    def hooked() -> None:
        with torch.no_grad():
            result["hooked"], _ = run_with_hooks(model, x, {"0": slow_zero})

    thread = threading.Thread(target=hooked)
    thread.start()
    assert entered.wait(10)
    # The run's hook on layer 0 is registered right now, and this thread calls through it.
    assert len(model[0]._forward_hooks) == 2  # the edit step and the after step
    with torch.no_grad():
        concurrent = model(x)
    release.set()
    thread.join()
    assert torch.allclose(concurrent, plain, rtol=0, atol=1e-6)
    assert torch.allclose(result["hooked"], edited, rtol=0, atol=1e-6)


async def _stepwise(model: nn.Sequential, x: Tensor) -> Tensor:
    h = x
    for layer in model:
        h = layer(h)
        await asyncio.sleep(0)  # let every other task run between two layers
    return h


def test_asyncio_tasks_interleaving_inside_their_blocks():
    model = make_model()
    before = snapshot_hooks(model)
    rng = random.Random(1)
    jobs = [make_job(model, rng, seed=5000 + i) for i in range(60)]
    most_active = [0]

    async def hooked(job: Job) -> list[str]:
        if job.spec is None:
            out = await _stepwise(model, job.x)
            return [] if torch.equal(out, job.out) else ["plain task: output differs"]
        with TraceMultiple(model, job.spec) as tm:
            out = await _stepwise(model, job.x)
            most_active[0] = max(most_active[0], len(model[0]._forward_hooks))
        return check(job, out, tm.captures())

    async def threaded(job: Job) -> list[str]:
        # asyncio.to_thread copies the task's context into the worker thread.
        return await asyncio.to_thread(run_job, model, job)

    async def main() -> list[list[str]]:
        tasks = [hooked(job) if i % 3 else threaded(job) for i, job in enumerate(jobs)]
        return await asyncio.gather(*tasks)

    with torch.no_grad():
        results = asyncio.run(main())
    assert [p for problems in results for p in problems] == []
    assert most_active[0] >= 2, "no two tasks were inside their blocks at once"
    assert snapshot_hooks(model) == before


def test_asyncio_task_started_inside_a_block_inherits_it_and_a_sibling_does_not():
    # Tasks copy the context they are created in: a task created inside the block sees the
    # run's hooks, exactly like code in the block; one created before it does not.
    model = make_model()
    x = torch.randn(2, 8)
    delta = torch.randn(WIDTH)
    plain, _ = sequential_by_hand(model, x)
    edited, _ = sequential_by_hand(model, x, {0: lambda h: h + delta})

    async def main() -> tuple[Tensor, Tensor]:
        go = asyncio.Event()

        async def outsider() -> Tensor:
            await go.wait()
            return await _stepwise(model, x)

        early = asyncio.create_task(outsider())
        with TraceMultiple(model, {"0": add(delta)}):
            inside = asyncio.create_task(_stepwise(model, x))
            go.set()
            results = await asyncio.gather(early, inside)
        return results[0], results[1]

    with torch.no_grad():
        outside_out, inside_out = asyncio.run(main())
    assert torch.allclose(outside_out, plain, rtol=0, atol=1e-6)
    assert torch.allclose(inside_out, edited, rtol=0, atol=1e-6)


@pytest.mark.parametrize("outer_api", ["TraceMultiple", "Trace", "run_with_hooks"])
def test_nested_runs_compose(outer_api: str):
    model = make_model()
    x = torch.randn(3, 8)
    a, b = torch.randn(WIDTH), torch.randn(WIDTH)
    out_ref, acts = sequential_by_hand(model, x, {0: lambda h: h + a + b})
    seen_by_outer = acts[0]  # a capture holds what the rest of the model receives
    inner: dict[str, Any] = {}

    def inner_run() -> Tensor:
        out, caches = run_with_hooks(model, x, {"0": add(b), "2": "capture"})
        inner.update(caches)
        return out

    with torch.no_grad():
        if outer_api == "TraceMultiple":
            with TraceMultiple(model, {"0": add(a), "2": "capture"}) as tm:
                out = inner_run()
            outer = tm.captures()
        elif outer_api == "Trace":
            with Trace(model, "0", edit_output=add(a)) as t:
                out = inner_run()
            outer = {"0": t.capture}
        else:
            out, outer = run_with_hooks(
                model, x, {"0": add(a), "2": "capture"}, forward=lambda _: inner_run()
            )

    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(inner["0"].output, acts[0])
    torch.testing.assert_close(inner["2"].output, acts[2])
    torch.testing.assert_close(outer["0"].output, seen_by_outer)
    if "2" in outer:
        torch.testing.assert_close(outer["2"].output, acts[2])
    assert all(c.n_calls == 1 for c in [*inner.values(), *outer.values()])


def test_blocks_exited_out_of_order_keep_the_other_one_active():
    # An ExitStack-style misuse: the outer block exits first. Its exit must drop only its
    # own token, so the inner block's hooks still act until it exits.
    model = make_model()
    x = torch.randn(2, 8)
    a, b = torch.randn(WIDTH), torch.randn(WIDTH)
    outer = TraceMultiple(model, {"0": add(a)})
    inner = TraceMultiple(model, {"2": add(b)})
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    with torch.no_grad():
        out = model(x)
    inner.__exit__(None, None, None)
    expected, _ = sequential_by_hand(model, x, {2: lambda h: h + b})
    torch.testing.assert_close(out, expected)
    assert _ACTIVE.get() == frozenset()
    assert not model[0]._forward_hooks
    assert not model[2]._forward_hooks


def test_checkpointed_backward_in_another_thread_is_not_edited_by_a_backward_run():
    # A hooked run's edits also apply where activation checkpointing re-runs forwards during
    # its own backward pass; a plain checkpointed backward pass in another thread, racing
    # it, must keep its exact gradients.
    from torch.utils.checkpoint import checkpoint

    from hookfn._gate import IN_BACKWARD as _IN_BACKWARD

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(4)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = checkpoint(lambda t: torch.tanh(self.a(t * 1.0)), x, use_reentrant=False)
            return self.b(h).sum()

    model = Checkpointed()
    x = torch.randn(4, 8, requires_grad=True)
    (reference_grad,) = torch.autograd.grad(model(x), x)
    overlapped = [0]  # plain re-runs that happened while the hooked run was in backward
    probe = model.a.register_forward_hook(
        lambda m, i, o: overlapped.__setitem__(0, overlapped[0] + bool(_IN_BACKWARD))
    )
    problems: list[str] = []
    done = threading.Event()

    def slow(grad: Tensor) -> Tensor:
        time.sleep(0.001)  # keep the hooked run in its backward pass for a while
        return grad

    def hooked() -> None:
        try:
            while not done.is_set():
                run_with_hooks(
                    model, x, {"a": add(100.0), "b": Hook(edit_grad=slow)}, backward=lambda y: y
                )
        except BaseException as error:
            problems.append(repr(error))

    def plain() -> None:
        try:
            for _ in range(150):
                (grad,) = torch.autograd.grad(model(x), x)
                if not torch.equal(grad, reference_grad):
                    problems.append("a plain backward pass was edited")
        except BaseException as error:
            problems.append(repr(error))
        finally:
            done.set()

    with fast_switching():
        threads = [threading.Thread(target=hooked), threading.Thread(target=plain)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    probe.remove()
    assert problems == []
    assert overlapped[0] > 0, "the plain passes never overlapped a hooked backward pass"


# -- DataParallel -------------------------------------------------------------------------


class CPUDataParallel(nn.DataParallel):  # type: ignore[type-arg]
    """DataParallel's forward, minus the accelerator: chunk, run replicas, concatenate.

    The replicas run through ``self.parallel_apply``, exactly as in ``DataParallel.forward``;
    the test swaps PyTorch's ``parallel_apply`` for one that starts plain worker threads (as
    PyTorch's does) but needs no accelerator.
    """

    def forward(self, x: Tensor) -> Tensor:
        chunks = x.chunk(2)
        outputs = self.parallel_apply(
            [self.module] * len(chunks), [(c,) for c in chunks], [{}] * len(chunks)
        )
        return torch.cat(outputs)


def threaded_parallel_apply(
    modules: Any, inputs: Any, kwargs_tup: Any = None, devices: Any = None
) -> list[Any]:
    """PyTorch's parallel_apply on CPU: one fresh thread per replica (no context copied)."""
    results: dict[int, Any] = {}
    kwargs_tup = kwargs_tup or [{}] * len(modules)

    def work(i: int) -> None:
        try:
            results[i] = modules[i](*inputs[i], **kwargs_tup[i])
        except BaseException as error:
            results[i] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(modules))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outputs = [results[i] for i in range(len(modules))]
    for output in outputs:
        if isinstance(output, BaseException):
            raise output
    return outputs


def test_data_parallel_worker_threads_see_the_run(monkeypatch):
    # (the package attribute ``data_parallel`` is a function; the module is in sys.modules)
    data_parallel = sys.modules["torch.nn.parallel.data_parallel"]
    monkeypatch.setattr(data_parallel, "parallel_apply", threaded_parallel_apply)
    model = make_model()
    dp = CPUDataParallel(model)
    x = torch.randn(4, 8)
    delta = torch.randn(WIDTH)
    expected, acts = sequential_by_hand(model, x, {0: lambda h: h + delta})

    # The trap is real in this setup: worker threads do not see the caller's context.
    probe: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="unset")
    probe.set("caller")
    seen = threaded_parallel_apply([lambda: probe.get()], [()])
    assert seen == ["unset"]

    before = snapshot_hooks(dp)
    with torch.no_grad():
        out, caches = run_with_hooks(dp, x, {"module.0": add(delta), "module.2": "capture"})
        plain = dp(x)  # after the run: unhooked again
    torch.testing.assert_close(out, expected)
    # One call per replica, in the order the workers ran them.
    got = sorted(caches["module.2"].outputs, key=lambda t: float(t.sum()))
    want = sorted(acts[2].chunk(2), key=lambda t: float(t.sum()))
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(plain, sequential_by_hand(model, x)[0])
    assert "parallel_apply" not in vars(dp)
    assert snapshot_hooks(dp) == before
