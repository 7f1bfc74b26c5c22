"""Collecting activations over a dataset: `collect`, and `load` for shards on disk.

``collect(model, batches, sites, part="last")`` runs the model on every batch with
``Hook(part=...)`` captures (only the part is ever copied), stops each forward after the
last needed layer, and writes the parts into one preallocated CPU tensor per site. With
``out_dir`` the rows go to shards on disk instead, written whole or not at all, and an
interrupted collection resumes where its last complete shard ends.

Built on the core's public names only (`run_with_hooks`, `Hook`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn
from typing_extensions import TypeAlias

from ._errors import HookfnError
from ._hook import Hook
from ._run import run_with_hooks

__all__ = ["CollectError", "Part", "collect", "load"]

Part: TypeAlias = Union[str, int, Callable[[Tensor], Tensor]]
"""What `collect` keeps of each activation ``[batch, seq, ...]``, per row:

- ``"last"``: the last real token (the attention mask says which are real; left or right
  padding); ``"first"``: the first real token; ``"mean"``: the mean over real tokens;
- ``"all"``: every position (every batch must then have the same length);
- an int ``i``: position ``i`` (``x[:, i]``), the same in every row;
- a function ``x -> tensor`` whose result has one row per batch row."""

_NAMED_PARTS = ("last", "first", "mean", "all")
_FORMAT = 1


class CollectError(HookfnError):
    """A collection cannot run as asked: a part that does not fit, a batch whose structure
    differs from the first one's, a shard directory written for another collection, or a
    row count that does not add up."""


# -- parts ----------------------------------------------------------------------------------


def _part_repr(part: Part) -> str:
    if callable(part):
        return f"<function {getattr(part, '__qualname__', repr(part))}>"
    return repr(part)


def _check_part(part: object, site: str) -> Part:
    if isinstance(part, bool) or not (
        part in _NAMED_PARTS if isinstance(part, str) else isinstance(part, int) or callable(part)
    ):
        raise CollectError(
            f"collect: the part for {site!r} is {part!r}; a part is one of "
            f"{', '.join(repr(p) for p in _NAMED_PARTS)}, a position (an int) or a function "
            "x -> tensor."
        )
    return part  # type: ignore[return-value]


class _Batch:
    """What the part functions read of the batch that is running (set before each run)."""

    mask: Tensor | None = None
    rows: int = 0


def _selector(part: Part, state: _Batch, site: str) -> Callable[[Tensor], Tensor]:
    """The function ``Hook(part=...)`` calls on the activation of ``site``."""

    def fit(x: Tensor) -> None:
        if x.dim() < 2 or x.shape[0] != state.rows:
            raise CollectError(
                f"collect: the part {_part_repr(part)} does not fit the activation of "
                f"{site!r}, of shape {tuple(x.shape)}: a part is taken from a "
                f"[batch, seq, ...] activation with {state.rows} rows (the batch size)."
            )
        mask = state.mask
        if mask is not None and part in ("last", "first", "mean") and x.shape[1] != mask.shape[1]:
            raise CollectError(
                f"collect: the part {part!r} reads the attention mask of shape "
                f"{tuple(mask.shape)}, which does not fit the activation of {site!r}, of "
                f"shape {tuple(x.shape)}; collect {part!r} at sites whose output is "
                "[batch, seq, ...], or pass a position or a function as the part."
            )

    def select(x: Tensor) -> Tensor:
        if callable(part):
            kept = part(x)
            if not isinstance(kept, Tensor) or kept.dim() == 0 or kept.shape[0] != state.rows:
                raise CollectError(
                    f"collect: the part {_part_repr(part)} at {site!r} returned "
                    f"{_shape_of(kept)}; a part has one row per batch row ({state.rows})."
                )
            return kept
        fit(x)
        mask = state.mask
        if part == "all":
            return x
        if isinstance(part, int):
            if not -x.shape[1] <= part < x.shape[1]:
                raise CollectError(
                    f"collect: position {part} does not fit the activation of {site!r}, of "
                    f"shape {tuple(x.shape)} (dimension 1 has {x.shape[1]} positions)."
                )
            return x[:, part]
        if mask is None:
            if part == "mean":
                return x.mean(1)
            return x[:, -1] if part == "last" else x[:, 0]
        real = mask.to(x.device) != 0
        if part == "mean":
            weights = real.to(x.dtype).reshape(*real.shape, *([1] * (x.dim() - 2)))
            return (x * weights).sum(1) / weights.sum(1)
        seq = real.shape[1]
        if part == "last":
            index = seq - 1 - real.flip(1).to(torch.uint8).argmax(1)
        else:
            index = real.to(torch.uint8).argmax(1)
        return x[torch.arange(x.shape[0], device=x.device), index]

    return select


def _shape_of(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# -- batches --------------------------------------------------------------------------------


def _structure(batch: object) -> object:
    """What must stay the same from batch to batch: the keys or positions, and each
    tensor's dtype and number of dimensions."""
    if isinstance(batch, Tensor):
        return ("tensor", str(batch.dtype), batch.dim())
    if isinstance(batch, Mapping):
        return tuple((str(k), _structure(v)) for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return tuple(_structure(v) for v in batch)
    return type(batch).__name__


def _tensors(batch: object) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _tensors(v)]
    return []


def _rows(batch: object, index: int) -> int:
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        return int(batch["input_ids"].shape[0])
    tensors = [t for t in _tensors(batch) if t.dim() > 0]
    if not tensors:
        raise CollectError(
            f"collect: batch {index} holds no tensor with a batch dimension; a batch is a "
            "tensor, a tuple of them or a mapping (a tokenizer's BatchEncoding)."
        )
    return int(tensors[0].shape[0])


def _mask(batch: object) -> Tensor | None:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, Tensor) else None
    return None


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_to(v, device) for v in batch)
    if isinstance(batch, list):
        return [_to(v, device) for v in batch]
    return batch


def _known_rows(batches: Iterable[Any]) -> int | None:
    """The number of rows the batches hold, where it is known without running anything."""
    if isinstance(batches, (list, tuple)):
        return sum(_rows(b, i) for i, b in enumerate(batches))
    # A DataLoader that batches its sampler's indices: as many rows as the sampler gives
    # (a DistributedSampler gives this rank's share).
    sampler = getattr(batches, "sampler", None)
    if (
        isinstance(sampler, Sized)
        and getattr(batches, "batch_size", None) is not None
        and not getattr(batches, "drop_last", False)
    ):
        return len(sampler)
    return None


def _progress(batches: Iterable[Any], enabled: bool, skip: int) -> Iterator[Any]:
    if not enabled:
        yield from batches
        return
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:  # pragma: no cover - tqdm is an optional extra
        yield from batches
        return
    total = len(batches) if isinstance(batches, Sized) else None
    bar = tqdm(total=total, initial=skip, unit="batch", desc="collect")
    try:
        for i, batch in enumerate(batches):
            yield batch
            if i >= skip:
                bar.update(1)
    finally:
        bar.close()


# -- shards ---------------------------------------------------------------------------------


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size under ``torch.distributed`` (0, 1 without)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _manifest(
    names: Sequence[str],
    parts: Sequence[Part],
    dtype: torch.dtype | None,
    shard_batches: int,
    world: int,
) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "world_size": world,
        "sites": list(names),
        "parts": [_part_repr(p) for p in parts],
        "dtype": None if dtype is None else str(dtype),
        "shard_batches": shard_batches,
    }


def _shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard-{index:05d}.pt"


def _write_shard(out_dir: Path, index: int, tensors: dict[str, Tensor], batches: int) -> None:
    """Write a shard whole, or not at all: to a temporary name, then renamed."""
    path = _shard_path(out_dir, index)
    tmp = path.with_suffix(".tmp")
    torch.save({"batches": batches, "tensors": tensors}, tmp)
    os.replace(tmp, path)


def _read_shard(path: Path) -> tuple[int, dict[str, Tensor]]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return int(data["batches"]), dict(data["tensors"])


def _complete_shards(out_dir: Path) -> list[Path]:
    found = []
    index = 0
    while _shard_path(out_dir, index).exists():
        found.append(_shard_path(out_dir, index))
        index += 1
    return found


def load(
    out_dir: str | os.PathLike[str], *, interleave: bool = False, n_rows: int | None = None
) -> dict[str, Tensor]:
    """The rows `collect` wrote to ``out_dir``, one tensor per site.

    Shards are read with ``torch.load(weights_only=True)``: no pickled code runs. A
    collection run by several ``torch.distributed`` ranks (one ``rank-NNNNN`` directory
    each) is read back as one dataset: the ranks' rows one after the other, or, with
    ``interleave``, in the order a ``DistributedSampler(shuffle=False)`` took them from the
    dataset (row ``i`` of rank ``r`` is row ``i * world_size + r``).

    Args:
        out_dir: The directory `collect` wrote.
        interleave: Put the ranks' rows back in ``DistributedSampler`` order (every rank
            must then hold the same number of rows, as that sampler gives them).
        n_rows: Keep the first ``n_rows`` rows: the sampler pads the dataset to a multiple
            of the world size by repeating its first rows.

    Raises:
        CollectError: ``out_dir`` holds no collection, or ranks of unequal lengths are to
            be interleaved.
    """
    directory = Path(out_dir)
    ranks = sorted(directory.glob("rank-*"))
    if ranks:
        per_rank = [_load_one(path) for path in ranks]
        result = {}
        for name in per_rank[0]:
            tensors = [rows[name] for rows in per_rank]
            if interleave:
                if len({t.shape[0] for t in tensors}) != 1:
                    raise CollectError(
                        f"collect: the ranks in {str(directory)!r} hold "
                        f"{[t.shape[0] for t in tensors]} rows; interleave=True reads ranks "
                        "of equal lengths (a DistributedSampler's)."
                    )
                joined = torch.stack(tensors, dim=1).flatten(0, 1)
            else:
                joined = torch.cat(tensors)
            result[name] = joined
    else:
        result = _load_one(directory)
    if n_rows is not None:
        result = {name: t[:n_rows] for name, t in result.items()}
    return result


def _load_one(directory: Path) -> dict[str, Tensor]:
    if not (directory / "manifest.json").exists():
        raise CollectError(f"collect: {str(directory)!r} holds no manifest.json of a collection.")
    chunks: dict[str, list[Tensor]] = {}
    for path in _complete_shards(directory):
        _, tensors = _read_shard(path)
        for name, tensor in tensors.items():
            chunks.setdefault(name, []).append(tensor)
    return {name: torch.cat(values) for name, values in chunks.items()}


# -- collect --------------------------------------------------------------------------------


@dataclass
class _Writer:
    """Rows into preallocated buffers (or a growing list where the total is unknown)."""

    n_rows: int | None
    dtype: torch.dtype | None
    buffers: dict[str, Tensor] | None = None
    chunks: dict[str, list[Tensor]] | None = None
    filled: int = 0

    def write(self, parts: dict[str, Tensor]) -> None:
        rows = next(iter(parts.values())).shape[0]
        if self.n_rows is None:
            if self.chunks is None:
                self.chunks = {name: [] for name in parts}
            for name, part in parts.items():
                self.chunks[name].append(part.to("cpu", self.dtype or part.dtype, copy=True))
        else:
            if self.buffers is None:
                self.buffers = {
                    name: torch.empty(
                        (self.n_rows, *part.shape[1:]), dtype=self.dtype or part.dtype
                    )
                    for name, part in parts.items()
                }
            if self.filled + rows > self.n_rows:
                raise CollectError(
                    f"collect: the batches hold more than the {self.n_rows} rows expected "
                    "(n_rows=, or the length of the dataset)."
                )
            for name, part in parts.items():
                buffer = self.buffers[name]
                if part.shape[1:] != buffer.shape[1:]:
                    raise CollectError(
                        f"collect: the part of {name!r} has shape {tuple(part.shape)} in this "
                        f"batch but {tuple(buffer.shape[1:])} per row before; batches must "
                        "give parts of one shape (pad every batch to one length for 'all')."
                    )
                buffer[self.filled : self.filled + rows].copy_(part)
        self.filled += rows

    def result(self) -> dict[str, Tensor]:
        if self.n_rows is None:
            return {name: torch.cat(values) for name, values in (self.chunks or {}).items()}
        if self.filled != self.n_rows:
            raise CollectError(
                f"collect: the batches held {self.filled} rows, not the {self.n_rows} "
                "expected (n_rows=, or the length of the dataset)."
            )
        return self.buffers or {}


def collect(
    model: nn.Module,
    batches: Iterable[Any],
    sites: str | nn.Module | Sequence[str | nn.Module] | Mapping[str, Part],
    *,
    part: Part = "last",
    dtype: torch.dtype | None = None,
    n_rows: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    shard_batches: int = 64,
    stop_early: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Run ``model`` over ``batches`` and keep a part of the activations at ``sites``.

    Each batch runs once through `run_with_hooks` with ``Hook(part=...)`` captures, so only
    the part is copied, and (``stop_early``) the forward stops after the last needed layer.
    The parts are written into one CPU tensor per site, ``[n_rows, *part_shape]``,
    preallocated where the number of rows is known (a list or tuple of batches, a
    ``DataLoader`` over a sized dataset, or ``n_rows=``), else gathered and joined at the
    end. Batches are run in order, under ``torch.no_grad()``.

    With ``out_dir``, every ``shard_batches`` batches go to a shard file, written whole or
    not at all (a temporary file, then renamed), beside a ``manifest.json`` that names the
    sites, parts, dtype and shard size. Calling `collect` again with the same arguments on the
    same (deterministically ordered) batches skips the batches of the complete shards and
    goes on: an interruption (Ctrl-C included) loses at most the rows of the shard being
    filled, which are computed again, and no row is written twice. The result is then read
    back from the shards (`load` reads them too, with ``weights_only=True``).

    Under ``torch.distributed`` each rank collects the batches it is given (a
    ``DataLoader`` with a ``DistributedSampler``) and writes its own shards, to
    ``out_dir/rank-NNNNN``; it returns its own rows once every rank is done (a barrier).
    ``load(out_dir, interleave=True, n_rows=len(dataset))`` reads the ranks back as one
    dataset, in the dataset's order.

    Args:
        model: The model; each batch is called as in `run_with_hooks` (a mapping as
            ``model(**batch)``, a tuple as ``model(*batch)``, a tensor as ``model(batch)``).
        batches: An iterable of batches: a ``DataLoader``, a list of encodings.
        sites: Layer names (globs and modules too, as in a spec), or ``{site: part}``.
        part: The `Part` to keep, for sites given without their own: ``"last"`` (the last
            real token by the batch's ``attention_mask``, left or right padding; without a
            mask the last position), ``"first"``, ``"mean"`` (over real tokens), ``"all"``,
            a position, or a function ``x -> tensor``.
        dtype: The dtype of the outputs (the activations' when ``None``).
        n_rows: The total number of rows, where ``batches`` cannot tell it.
        out_dir: Write shards to this directory (and resume from the ones there).
        shard_batches: Batches per shard.
        stop_early: Stop each forward once every site has been captured.
        device: Move each batch's tensors here first (the model's first parameter's device
            when ``None``; CPU for a model without parameters).
        progress: Show a tqdm progress bar (when tqdm is installed).

    Returns:
        ``{layer: tensor}``, one row per dataset row, in the order of ``batches``.

    Raises:
        CollectError: (before anything is written) a part that is not one of the forms
            above or does not fit its activation, a batch whose structure (keys, tensor
            dtypes and ranks) differs from the first batch's, an ``out_dir`` written by a
            collection with other sites, parts, dtype or shard size, a row count that does
            not add up.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> batches = [torch.randn(2, 5, 4), torch.randn(3, 5, 4)]
        >>> collect(model, batches, ["0"], part="last")["0"].shape
        torch.Size([5, 3])
    """
    if isinstance(sites, Mapping):
        wanted = {key: _check_part(p, str(key)) for key, p in sites.items()}
    else:
        keys = [sites] if isinstance(sites, (str, nn.Module)) else list(sites)
        checked = _check_part(part, "every site")
        wanted = {key: checked for key in keys}  # type: ignore[misc]
    if not wanted:
        raise CollectError("collect: no site to collect at.")
    if isinstance(shard_batches, bool) or not isinstance(shard_batches, int) or shard_batches < 1:
        raise CollectError(f"collect: shard_batches is an int >= 1, got {shard_batches!r}.")
    state = _Batch()
    spec = {key: Hook(part=_selector(p, state, str(key)), detach=True) for key, p in wanted.items()}
    names = [str(key) if not isinstance(key, nn.Module) else repr(key) for key in wanted]
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    target = torch.device(device)

    rank, world = _rank_and_world()
    directory = None if out_dir is None else Path(out_dir)
    if directory is not None and world > 1:
        directory = directory / f"rank-{rank:05d}"
    skip = 0
    shard_index = 0
    if directory is not None:
        manifest = _manifest(names, list(wanted.values()), dtype, shard_batches, world)
        directory.mkdir(parents=True, exist_ok=True)
        manifest_path = directory / "manifest.json"
        if manifest_path.exists():
            found = json.loads(manifest_path.read_text())
            if found != manifest:
                raise CollectError(
                    f"collect: {str(directory)!r} holds a collection of another spec "
                    f"({found}), not of this one ({manifest}); pass another out_dir, or "
                    "remove it to start again."
                )
        else:
            manifest_path.write_text(json.dumps(manifest, indent=1))
        for path in _complete_shards(directory):
            batches_in_shard, _ = _read_shard(path)
            skip += batches_in_shard
            shard_index += 1
        for stale in directory.glob("shard-*.tmp"):
            stale.unlink()

    writer = _Writer(None if directory is not None else n_rows or _known_rows(batches), dtype)
    pending: list[dict[str, Tensor]] = []
    first_structure: object = None
    seen = 0
    with torch.no_grad():
        for index, batch in enumerate(_progress(batches, progress, skip)):
            structure = _structure(batch)
            if first_structure is None:
                first_structure = structure
            elif structure != first_structure:
                raise CollectError(
                    f"collect: batch {index} has the structure {structure}, but the first "
                    f"batch had {first_structure}; every batch must have the same keys, "
                    "tensor dtypes and ranks."
                )
            if index < skip:
                continue  # its rows are in a complete shard
            seen += 1
            batch = _to(batch, target)
            state.rows = _rows(batch, index)
            state.mask = _mask(batch)
            _, caches = run_with_hooks(model, batch, spec, stop_early=stop_early)
            parts = {}
            for name, capture in caches.items():
                if capture.n_calls != 1:
                    raise CollectError(
                        f"collect: {name!r} was called {capture.n_calls} times in one "
                        "forward; collect reads sites called once per batch."
                    )
                parts[name] = capture.output
            if directory is None:
                writer.write(parts)
                continue
            pending.append({n: p.to("cpu", dtype or p.dtype, copy=True) for n, p in parts.items()})
            if len(pending) == shard_batches:
                _flush(directory, shard_index, pending)
                shard_index += 1
                pending = []
    if directory is not None:
        if pending:
            _flush(directory, shard_index, pending)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank's shards are complete when any rank returns
        return _load_one(directory)
    return writer.result()


def _flush(directory: Path, index: int, pending: list[dict[str, Tensor]]) -> None:
    tensors = {name: torch.cat([p[name] for p in pending]) for name in pending[0]}
    _write_shard(directory, index, tensors, len(pending))
