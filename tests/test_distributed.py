"""hookfn under torch.distributed: DDP (and FSDP2 ``fully_shard``) with 2 CPU processes.

One ``torch.multiprocessing.spawn`` of 2 gloo ranks runs every scenario and saves what each
rank saw; the tests compare it with single-process references computed here on the same
rank's data. Hook names work with and without DDP's ``module.`` prefix.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import snapshot_hooks
from reference import raw_backward
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hookfn import Hook, add, layers, run_with_hooks

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed"
)

WORLD = 2
SHIFT = 0.5
TIMEOUT_S = 120


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))


def _data(rank: int) -> Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + rank))


def _loss(out: Tensor) -> Tensor:
    return out.pow(2).mean()


def _ddp_scenarios(rank: int) -> dict[str, Any]:
    model = DistributedDataParallel(_model())
    x = _data(rank)
    before = snapshot_hooks(model)
    result: dict[str, Any] = {}

    # A training step: captures and an edit, by prefixed and plain names; DDP syncs grads.
    out, caches = run_with_hooks(model, x, {"module.0": "capture", "2": add(SHIFT)})
    _loss(out).backward()
    result["names"] = list(caches)
    result["capture_0"] = caches["module.0"].output
    result["out"] = out.detach()
    result["grads"] = {name: p.grad.clone() for name, p in model.module.named_parameters()}
    model.zero_grad(set_to_none=True)

    # Gradients of the hooked layers only (backward=...): no parameter's .grad is touched.
    _, caches = run_with_hooks(
        model, x, {"module.2": Hook(grad=True), "1": Hook(grad=True)}, backward=_loss
    )
    result["grad_names"] = list(caches)
    result["grad_2"] = caches["module.2"].grad_output
    result["grad_1"] = caches["1"].grad_output
    result["param_grads_after_backward_metric"] = [
        p.grad for p in model.parameters() if p.grad is not None
    ]
    result["layers"] = [(i.name, i.shape) for i in layers(model, x)]
    result["hooks_restored"] = snapshot_hooks(model) == before
    return result


def _fsdp_scenarios(rank: int) -> dict[str, Any]:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as error:  # pragma: no cover - older torch
        return {"skip": f"no FSDP2 fully_shard: {error}"}
    model = _model()
    names = [n for n, _ in model.named_modules()]
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    x = _data(rank)
    out, caches = run_with_hooks(model, x, {"0": "capture", "2": add(SHIFT)})
    _loss(out).backward()
    return {
        "names_unchanged": [n for n, _ in model.named_modules()] == names,
        "capture_0": caches["0"].output,
        "out": out.detach(),
        "grads": {
            name: p.grad.full_tensor().clone()  # type: ignore[union-attr]
            for name, p in model.named_parameters()
        },
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        results = {"ddp": _ddp_scenarios(rank), "fsdp": _fsdp_scenarios(rank)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {WORLD} DDP processes did not finish within {TIMEOUT_S} s")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference(rank: int, shift: float = SHIFT) -> dict[str, Any]:
    """The same step on one process, by plain hooks and autograd: capture layer 0, add
    ``shift`` at 2."""
    edits = {"2": lambda h: h + shift}
    ref = raw_backward(_model(), _data(rank), _loss, ["0", "1", "2"], edits=edits)
    return {
        "capture_0": ref.outputs["0"],
        "out": ref.out.detach(),
        "grads": ref.params,
        "grad_1": ref.grads["1"],
        "grad_2": ref.grads["2"],
    }


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_captures_and_edits_per_rank(ranks: list[dict[str, Any]], rank: int) -> None:
    got, ref = ranks[rank]["ddp"], _reference(rank)
    assert got["names"] == ["module.0", "2"]
    torch.testing.assert_close(got["capture_0"], ref["capture_0"])
    torch.testing.assert_close(got["out"], ref["out"])
    assert got["hooks_restored"]


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_gradients_are_averaged_over_ranks(ranks: list[dict[str, Any]], rank: int) -> None:
    refs = [_reference(r)["grads"] for r in range(WORLD)]
    for name, grad in ranks[rank]["ddp"]["grads"].items():
        torch.testing.assert_close(grad, sum(ref[name] for ref in refs) / WORLD)
    assert not torch.allclose(refs[0]["0.weight"], refs[1]["0.weight"])  # ranks differ


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_gradient_capture(ranks: list[dict[str, Any]], rank: int) -> None:
    got, ref = ranks[rank]["ddp"], _reference(rank, shift=0.0)  # no edit in that run
    assert got["grad_names"] == ["1", "module.2"]
    torch.testing.assert_close(got["grad_2"], ref["grad_2"])
    torch.testing.assert_close(got["grad_1"], ref["grad_1"])
    assert got["param_grads_after_backward_metric"] == []


def test_ddp_layers_lists_inner_names(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["ddp"]["layers"] == [("0", (4, 8)), ("1", (4, 8)), ("2", (4, 8)), ("3", (4, 2))]


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_fully_shard(ranks: list[dict[str, Any]], rank: int) -> None:
    got = ranks[rank]["fsdp"]
    if "skip" in got:
        pytest.skip(got["skip"])
    ref = _reference(rank)
    refs = [_reference(r)["grads"] for r in range(WORLD)]
    assert got["names_unchanged"]
    torch.testing.assert_close(got["capture_0"], ref["capture_0"])
    torch.testing.assert_close(got["out"], ref["out"])
    for name, grad in got["grads"].items():
        torch.testing.assert_close(grad, sum(r[name] for r in refs) / WORLD)
