"""`collect` against raw forward hooks and parts taken by hand (row by row), with left and
right padding; shards on disk, resumed after an injected interrupt; bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from reference import count_calls, first, raw_hooks
from torch import Tensor

from hookfn import CollectError, Hook, HookfnError, collect, run_with_hooks
from hookfn.collection import load

SITES = ["transformer.h.0", "transformer.h.1"]
SEQ = 7


@pytest.fixture(scope="module")
def model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def _batches(side: str, n: int = 5, rows: int = 3) -> list[dict[str, Tensor]]:
    """Batches of `rows` sequences of random real lengths, padded on `side`."""
    generator = torch.Generator().manual_seed(4)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (rows, SEQ), generator=generator)
        mask = torch.zeros(rows, SEQ, dtype=torch.long)
        for r in range(rows):
            length = int(torch.randint(2, SEQ + 1, (), generator=generator))
            if side == "left":
                mask[r, SEQ - length :] = 1
            else:
                mask[r, :length] = 1
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def _by_hand(
    model: transformers.GPT2LMHeadModel, batches: list[dict[str, Tensor]], part: str
) -> dict[str, Tensor]:
    """Raw forward hooks, then each row's part picked out in a Python loop."""
    rows: dict[str, list[Tensor]] = {name: [] for name in SITES}
    for batch in batches:
        with raw_hooks(model, capture=SITES) as store, torch.no_grad():
            model(**batch)
        for name in SITES:
            x = first(store[name][0])
            for r in range(x.shape[0]):
                real = [i for i in range(SEQ) if batch["attention_mask"][r, i] == 1]
                if part == "last":
                    rows[name].append(x[r, real[-1]])
                elif part == "first":
                    rows[name].append(x[r, real[0]])
                else:
                    rows[name].append(x[r, real].mean(0))
    return {name: torch.stack(values) for name, values in rows.items()}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("part", ["last", "first", "mean"])
def test_collect_equals_raw_hooks_by_hand(
    model: transformers.GPT2LMHeadModel, side: str, part: str
) -> None:
    batches = _batches(side)
    got = collect(model, batches, SITES, part=part)
    want = _by_hand(model, batches, part)
    assert list(got) == SITES
    for name in SITES:
        assert got[name].shape == (15, 32)
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_collect_equals_run_with_hooks_stacked(model: transformers.GPT2LMHeadModel) -> None:
    batches = _batches("left")
    got = collect(model, batches, {"transformer.h.*": "all", "transformer.h.2.mlp": 3})
    assert list(got) == [
        "transformer.h.0",
        "transformer.h.1",
        "transformer.h.2",
        "transformer.h.2.mlp",
    ]
    outs = [
        run_with_hooks(model, b, ["transformer.h.*", "transformer.h.2.mlp"])[1] for b in batches
    ]
    for name in ["transformer.h.0", "transformer.h.1", "transformer.h.2"]:
        assert torch.equal(got[name], torch.cat([c[name].output for c in outs]))
    want = torch.cat([c["transformer.h.2.mlp"].output[:, 3] for c in outs])
    assert torch.equal(got["transformer.h.2.mlp"], want)


def test_dtype_dataloader_and_a_function_part(model: transformers.GPT2LMHeadModel) -> None:
    batches = _batches("right", n=4, rows=2)
    rows = [{k: v[r] for k, v in b.items()} for b in batches for r in range(2)]
    loader = torch.utils.data.DataLoader(rows, batch_size=3)  # 8 rows: 3 + 3 + 2
    got = collect(
        model, loader, {"transformer.h.1": _norm_of_last}, dtype=torch.float16, progress=True
    )
    parts = []
    for batch in batches:
        with raw_hooks(model, capture=["transformer.h.1"]) as store, torch.no_grad():
            model(**batch)
        parts.append(first(store["transformer.h.1"][0])[:, -1:].norm(dim=-1))
    assert got["transformer.h.1"].dtype == torch.float16
    assert got["transformer.h.1"].shape == (8, 1)
    torch.testing.assert_close(got["transformer.h.1"], torch.cat(parts).half())


def _norm_of_last(x: Tensor) -> Tensor:
    return x[:, -1:].norm(dim=-1)


def test_stop_early_runs_no_later_layer(model: transformers.GPT2LMHeadModel) -> None:
    batches = _batches("left", n=2)
    with count_calls(model.transformer.h[1]) as later:
        collect(model, batches, ["transformer.h.0"])
    assert later == []
    with count_calls(model.transformer.h[1]) as later:
        collect(model, batches, ["transformer.h.0"], stop_early=False)
    assert len(later) == 2


def _interrupted(batches: list[dict[str, Tensor]], at: int) -> Iterator[dict[str, Tensor]]:
    for i, batch in enumerate(batches):
        if i == at:
            raise KeyboardInterrupt
        yield batch


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("at", [1, 4, 5])
def test_resume_after_interrupt_equals_one_run(
    model: transformers.GPT2LMHeadModel, tmp_path: Path, at: int
) -> None:
    batches = _batches("left", n=7)
    whole = collect(model, batches, SITES)
    with pytest.raises(KeyboardInterrupt):
        collect(model, _interrupted(batches, at), SITES, out_dir=tmp_path, shard_batches=2)
    assert _no_hooks(model)
    shards = sorted(p.name for p in tmp_path.glob("shard-*"))
    assert shards == [f"shard-{i:05d}.pt" for i in range(at // 2)]  # complete shards only
    resumed = collect(model, batches, SITES, out_dir=tmp_path, shard_batches=2)
    for name in SITES:
        assert torch.equal(resumed[name], whole[name])
        assert torch.equal(load(tmp_path)[name], whole[name])
    # Run once more: everything is there, nothing runs again, nothing is duplicated.
    with count_calls(model.transformer.h[0]) as calls:
        again = collect(model, batches, SITES, out_dir=tmp_path, shard_batches=2)
    assert calls == []
    assert torch.equal(again[SITES[0]], whole[SITES[0]])


def test_interrupt_inside_a_forward(model: transformers.GPT2LMHeadModel, tmp_path: Path) -> None:
    batches = _batches("right", n=5)
    calls = [0]

    def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt

    handle = model.transformer.h[0].register_forward_hook(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            collect(model, batches, SITES, out_dir=tmp_path, shard_batches=2)
    finally:
        handle.remove()
    assert _no_hooks(model)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.pt"]
    resumed = collect(model, batches, SITES, out_dir=tmp_path, shard_batches=2)
    whole = collect(model, batches, SITES)
    assert torch.equal(resumed[SITES[1]], whole[SITES[1]])


def test_shard_dir_of_another_spec(model: transformers.GPT2LMHeadModel, tmp_path: Path) -> None:
    batches = _batches("left", n=2)
    collect(model, batches, SITES, out_dir=tmp_path)
    for other in (
        {"sites": ["transformer.h.0"]},
        {"sites": SITES, "part": "mean"},
        {"sites": SITES, "dtype": torch.float16},
        {"sites": SITES, "shard_batches": 3},
    ):
        kwargs = dict(other)
        sites = kwargs.pop("sites")
        with (
            count_calls(model.transformer.h[0]) as calls,
            pytest.raises(CollectError, match="another spec"),
        ):
            collect(model, batches, sites, out_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
        assert calls == []


def test_bad_input(model: transformers.GPT2LMHeadModel) -> None:
    batches = _batches("left", n=3)
    with pytest.raises(CollectError, match="a part is one of"):
        collect(model, batches, SITES, part="middle")  # type: ignore[arg-type]
    with pytest.raises(HookfnError, match="position 40 does not fit"):
        collect(model, batches, SITES, part=40)
    with pytest.raises(HookfnError, match="one row per batch row"):
        collect(model, batches, {"transformer.h.0": lambda x: x[0]})
    changed = [*batches[:2], {"input_ids": batches[2]["input_ids"]}]
    with pytest.raises(CollectError, match="batch 2 has the structure"):
        collect(model, changed, SITES)
    with pytest.raises(CollectError, match="held 9 rows, not the 10"):
        collect(model, iter(batches), SITES, n_rows=10)
    assert _no_hooks(model)


def test_without_mask_last_is_the_last_position(model: transformers.GPT2LMHeadModel) -> None:
    ids = [b["input_ids"] for b in _batches("right", n=2)]
    got = collect(model, ids, ["transformer.h.0"])
    want = [run_with_hooks(model, x, {"transformer.h.0": Hook()})[1] for x in ids]
    expected = torch.cat([c["transformer.h.0"].output[:, -1] for c in want])
    assert torch.equal(got["transformer.h.0"], expected)


# -- torch.distributed: 2 gloo processes, each writing its own shards --------------------

WORLD = 2
N_ROWS = 7  # odd: the sampler pads rank 1 with a repeat of row 0


def _dataset_rows() -> list[dict[str, Tensor]]:
    return [{k: v[r] for k, v in b.items()} for b in _batches("right", n=3) for r in range(3)][
        :N_ROWS
    ]


def _tiny_model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def _collect_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        rows = _dataset_rows()
        sampler = torch.utils.data.DistributedSampler(rows, shuffle=False)
        loader = torch.utils.data.DataLoader(rows, batch_size=2, sampler=sampler)
        mine = collect(_tiny_model(), loader, SITES, out_dir=out_dir, shard_batches=1)
        torch.save(mine, Path(out_dir) / f"returned-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    import socket
    import time

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    context = mp.spawn(_collect_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail("the collection processes did not finish in 120 s")
    rows = _dataset_rows()
    one = collect(_tiny_model(), torch.utils.data.DataLoader(rows, batch_size=2), SITES)
    both = load(tmp_path, interleave=True, n_rows=N_ROWS)
    assert sorted(p.name for p in tmp_path.glob("rank-*")) == ["rank-00000", "rank-00001"]
    for name in SITES:
        assert both[name].shape == (N_ROWS, 32)
        torch.testing.assert_close(both[name], one[name], rtol=1e-6, atol=1e-6)
    # Each rank returned its own rows: every other row of the (padded) dataset.
    for rank in range(WORLD):
        mine = torch.load(tmp_path / f"returned-{rank}.pt", weights_only=True)
        padded = torch.cat([one[SITES[0]], one[SITES[0]][:1]])
        torch.testing.assert_close(mine[SITES[0]], padded[rank::WORLD], rtol=1e-6, atol=1e-6)


def test_rows_of_a_sampler_are_known_before_the_run(model: transformers.GPT2LMHeadModel) -> None:
    rows = _dataset_rows()
    sampler = torch.utils.data.DistributedSampler(rows, num_replicas=2, rank=1, shuffle=False)
    loader = torch.utils.data.DataLoader(rows, batch_size=3, sampler=sampler)
    got = collect(model, loader, SITES)
    want = collect(model, [torch.utils.data.default_collate([rows[i] for i in sampler])], SITES)
    assert got[SITES[0]].shape == (4, 32)
    torch.testing.assert_close(got[SITES[0]], want[SITES[0]], rtol=1e-6, atol=1e-6)
