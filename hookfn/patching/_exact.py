"""`activation_patching`: exact sweeps, many cells per forward, with exact reuse.

Each cell of a sweep is one patched run, ``where(mask, source, activation)`` at one site. A
hand-written loop runs one forward per cell; here the cells are stacked along the batch
dimension (or vmapped) in chunks, and four kinds of work are never done because their result
is known exactly:

- A cell whose patch writes the values already there (the source equals the base activation
  wherever the mask is set: positions before the first token where the prompts differ, say)
  leaves the run as it is: its value is the base run's metric. The equality is checked, not
  assumed.
- On a causal model that takes a key/value cache, positions before the first one a patch
  changes equal the base run at every layer. Such a cell runs on the later positions only,
  with the base run's cache cropped there; cells are grouped by that position. A cell that
  changes only positions after every prompt's last real position cannot move the metric.
- The layers before a chunk's earliest patched one see the base prompts in every cell: they
  run once, on one copy, and the batch grows where each cell's patch comes (`_layers`).
  Neighbouring groups of positions share a forward where a cost model measured on the model
  says that is faster (`_plan`).
- Built-in metrics read one position: only its logits are computed (``logits_to_keep``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from typing_extensions import TypeAlias

from hookfn import Args, Edit, Hook, Site, SpecError, TransformError, primary, run_with_hooks

from ._baseline import (
    Grid,
    Sides,
    SitePatch,
    activations,
    capture_spec,
    check_cache,
    clean_logprobs,
    read_sides,
    score,
    site_names,
    site_patches,
)
from ._batches import (
    Memory,
    cells_per_run,
    check_sizes,
    forward_parameters,
    measure_row_bytes,
    progress_bar,
)
from ._chunks import plan_chunks, synchronize
from ._grid import Over, as_axes
from ._layers import Layout, NotExact, Stack, find_stack, join_point
from ._metrics import MetricLike, Rows, Scorer, as_scorer
from ._prompts import Align
from ._result import Mode, PatchingResult
from ._sites import SitesLike, as_sites

__all__ = [
    "Patch",
    "Reuse",
    "activation_patching",
    "assemble",
    "cell_rows",
    "first_changed",
    "patch_hook",
]

Reuse: TypeAlias = Literal["auto", "positions", "layers", "none"]
"""What `activation_patching` computes once instead of once per cell (``reuse=``)."""


class Patch(Edit):
    """Rows ``start:stop`` of the activation take ``where(mask, source, x)``; the rest is
    left as it is. ``mask`` and ``source`` are per row (or broadcast)."""

    __slots__ = ("mask", "source", "start", "stop")

    def __init__(self, start: int, stop: int, mask: Tensor, source: Tensor) -> None:
        self.start, self.stop, self.mask, self.source = start, stop, mask, source

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        start, stop = self.start, self.stop
        if start == 0 and stop == x.shape[0]:
            return torch.where(self.mask, self.source, x)
        part = torch.where(self.mask, self.source, x[start:stop])
        return torch.cat([x[:start], part, x[stop:]])

    def __repr__(self) -> str:
        return f"Patch(rows {self.start}:{self.stop})"


def patch_hook(kind: str, edit: Edit) -> Hook:
    """The `Hook` that applies ``edit`` at a site's output or input, capturing nothing."""
    return Hook(edit, output=False) if kind == "output" else Hook(edit_input=edit, output=False)


@dataclass(frozen=True, slots=True)
class Cell:
    site: int
    part: int
    start: int  # the first position the patch changes (0 where that is not used)
    join: int | None = None  # where it joins the batch (`_layers.join_point`), None: at the input

    @property
    def order(self) -> tuple[int, int, int]:
        """Cells in a chunk: those that run every layer first, then by where they join."""
        return (-1 if self.join is None else self.join, self.site, self.part)


@dataclass(slots=True, eq=False)
class Runner:
    """The model, the base prompts, and how to run and score a chunk of cells."""

    model: nn.Module
    sides: Sides
    grid: Grid
    scorer: Scorer
    clean: Tensor | None  # the clean log-probabilities, for kl_to_clean
    base_metric: Tensor  # [n]
    parameters: frozenset[str]
    kv: Any  # the base run's key/value cache, when positions are reused
    cache_keyword: str | None
    base_output: Tensor | None  # the base run's primary output, for callable metrics
    stack: Stack | None = None  # the layers a chunk's forward can start late in
    kv_layers: bool = False  # the cache's layers are the stack's children, one to one

    @property
    def n(self) -> int:
        return self.sides.base.n

    def extra(
        self, start: int, pair: Tensor, layout: Layout | None = None
    ) -> tuple[dict[str, Any], Tensor]:
        """Keyword arguments for a run on positions ``start..``, and each row's metric index
        (``pair``: the prompt pair of each output row)."""
        extra: dict[str, Any] = {}
        last = self.sides.base.last[pair]
        index = (last - start).clamp(min=0)
        if self.kv is not None and start > 0:
            kv = _fresh_cache(self.kv)
            kv.crop(start - int(self.sides.base.seq or 0))
            device = self.sides.base.ids.device
            if layout is None:
                kv.batch_select_indices(pair.to(device))
            else:
                for child, layer in enumerate(kv.layers):
                    rows = layout.rows_of_child(child) % self.n
                    layer.batch_select_indices(rows.to(device))
            assert self.cache_keyword is not None
            extra[self.cache_keyword] = kv
            extra["use_cache"] = True
        elif "use_cache" in self.parameters:
            extra["use_cache"] = False
        if self.scorer.builtin and "logits_to_keep" in self.parameters:
            needed = sorted({p - start for p in self.sides.base.last.tolist() if p >= start})
            keep = torch.tensor(needed or [0], dtype=torch.long)
            extra["logits_to_keep"] = keep.to(self.sides.base.ids.device)
            index = torch.searchsorted(keep, index)
        return extra, index

    def stacked(self, chunk: list[Cell], start: int) -> Tensor:
        """The chunk's cells stacked along the batch dimension, in one forward: ``[cells, n]``.

        The chunk is in `Cell.order`. Where cells join after the model input (layer reuse),
        the layers before run on one copy of the prompts and the batch grows where the cells
        join (`_layers.Layout`); if the model does not run that layout as it needs, the chunk
        runs again with every cell on every layer.
        """
        layout = None
        if self.stack is not None and (start == 0 or self.kv_layers):
            layout = Layout.of(self.n, [c.join for c in chunk])
        if layout is not None:
            try:
                return self._forward(chunk, start, layout)
            except (NotExact, RuntimeError):
                self.stack = None  # the model does not allow it: every later chunk runs plainly
        return self._forward(chunk, start, None)

    def _forward(self, chunk: list[Cell], start: int, layout: Layout | None) -> Tensor:
        n, sites = self.n, self.grid.sites
        pair = torch.arange(n).repeat(len(chunk))
        edits: dict[int, Patch] = {}
        row = 0
        for site_index, cells in _by_site(chunk):
            patch = sites[site_index]
            mask = cell_rows(patch.masks[[c.part for c in cells]], n)
            source = patch.source.repeat(len(cells), *[1] * (patch.source.dim() - 1))
            if start > 0:
                mask = mask[:, start:] if mask.shape[1] > 1 else mask
                source = source[:, start:]
            edits[site_index] = Patch(row, row + len(cells) * n, mask, source)
            row += len(cells) * n
        spec: dict[str, Hook] = {}
        if layout is None:
            for site_index, edit in edits.items():
                spec[sites[site_index].name] = patch_hook(sites[site_index].kind, edit)
            pair_in = pair
        else:
            assert self.stack is not None
            at_child: dict[str, tuple[Edit | None, Edit | None]] = {}
            for site_index, edit in edits.items():
                name, kind = sites[site_index].name, sites[site_index].kind
                if name in self.stack.children:
                    held = at_child.get(name, (None, None))
                    at_child[name] = (edit, held[1]) if kind == "input" else (held[0], edit)
                else:
                    spec[name] = patch_hook(kind, edit)
            for child in range(layout.first, len(self.stack.children)):
                name = self.stack.children[child]
                patch_in, patch_out = at_child.get(name, (None, None))
                spec[name] = layout.child_hook(child, patch_in, patch_out)
            pair_in = torch.arange(n).repeat(layout.input_rows // n)
            layout.start()
        extra, index = self.extra(start, pair, layout)
        base = self.sides.base
        args = base.rows(pair_in) if start == 0 else base.tail(start, pair_in)
        args = Args(*args.args, **{**args.kwargs, **extra})
        prefix = None
        if start > 0 and not self.scorer.builtin:
            assert self.base_output is not None
            prefix = self.base_output[:, :start]
        output, _ = run_with_hooks(self.model, args, spec)
        if layout is not None:
            layout.finish(output)
        values = self.scorer(output, Rows(n, pair, index, prefix), self.clean)
        if start > 0:
            # A prompt whose last real position comes before the patch: its metric cannot move.
            before = base.last[pair].to(values.device) < start
            values = torch.where(before, self.base_metric.to(values.device)[pair], values)
        return values.view(len(chunk), n)

    def vmapped(self, chunk: list[Cell]) -> Tensor:
        """The chunk's cells under `torch.func.vmap`, one full forward each: ``[cells, n]``."""
        n, sites = self.n, self.grid.sites
        used = sorted({c.site for c in chunk})
        masks = []
        for site_index in used:
            patch = sites[site_index]
            off = torch.zeros_like(patch.masks[0])
            masks.append(
                torch.stack([patch.masks[c.part] if c.site == site_index else off for c in chunk])
            )
        pair = torch.arange(n)
        extra, index = self.extra(0, pair)
        args = Args(*self.sides.base.args.args, **{**self.sides.base.args.kwargs, **extra})

        def one(*cell_masks: Tensor) -> Tensor:
            spec = {
                sites[i].name: patch_hook(sites[i].kind, Patch(0, n, m, sites[i].source))
                for i, m in zip(used, cell_masks, strict=True)
            }
            output, _ = run_with_hooks(self.model, args, spec)
            return self.scorer(output, Rows(n, pair, index), self.clean)

        try:
            result: Tensor = torch.func.vmap(one)(*masks)
        except TransformError as error:
            raise TransformError(
                f"activation_patching(vmap=True): {error} Or run with vmap=False (cells stacked "
                "along the batch dimension), which has no such limits."
            ) from error
        return result


def cell_rows(masks: Tensor, n: int) -> Tensor:
    """``[cells, pair|1, ...]`` masks as rows, ``[cells * n, ...]`` (cell-major)."""
    cells = masks.shape[0]
    return masks.expand(cells, n, *masks.shape[2:]).reshape(cells * n, *masks.shape[2:])


def _by_site(chunk: list[Cell]) -> Iterator[tuple[int, list[Cell]]]:
    groups: dict[int, list[Cell]] = {}
    for cell in chunk:
        groups.setdefault(cell.site, []).append(cell)
    yield from groups.items()


def first_changed(patch: SitePatch, seq: int | None) -> list[int | None]:
    """Per cell of a site: the first position its patch changes (0 without a sequence axis),
    or ``None`` when it changes nothing."""
    changed = patch.source != patch.base  # [n, *rest]
    positional = seq is not None and changed.dim() >= 2 and changed.shape[1] == seq
    result: list[int | None] = []
    for begin in range(0, patch.masks.shape[0], 16):  # bounded memory for large grids
        touched = patch.masks[begin : begin + 16] & changed[None]
        if positional:
            for row in _any_but(touched, 2):
                hits = row.nonzero()
                result.append(int(hits[0]) if hits.numel() else None)
        else:
            for cell in touched:
                result.append(0 if bool(cell.any()) else None)
    return result


def _any_but(t: Tensor, keep: int) -> Tensor:
    """``[cells, t.shape[keep]]``: whether anything is set, per cell and entry of dim ``keep``."""
    moved = t.movedim(keep, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1).any(-1)


def _causal(model: nn.Module, causal: bool | None) -> bool:
    if causal is not None:
        return causal
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    try:
        generates = bool(can_generate()) if callable(can_generate) else False
    except Exception:  # a model whose check itself fails is not taken as causal
        generates = False
    return generates and not getattr(config, "is_encoder_decoder", False)


def _kv_cache(output: Any, seq: int | None) -> Any:
    """The key/value cache in a model's output, if it is one that can be cropped and indexed."""
    values = output.values() if hasattr(output, "values") and not isinstance(output, Tensor) else ()
    for value in values:
        if all(hasattr(value, m) for m in ("crop", "batch_select_indices", "get_seq_length")):
            return value if value.get_seq_length() == seq else None
    return None


def activation_patching(
    model: nn.Module,
    clean: object,
    corrupted: object,
    sites: SitesLike,
    *,
    metric: MetricLike,
    over: Over = None,
    mode: Mode = "denoise",
    per_pair: bool = False,
    align: Align = None,
    tokens: object = None,
    batch_size: int | None = None,
    memory: Memory = None,
    vmap: bool = False,
    causal: bool | None = None,
    reuse: Reuse = "auto",
    progress: bool | None = None,
) -> PatchingResult:
    """Exact activation patching: one patched run per cell, many cells per forward.

    Each cell patches one part (``over=``) of one site's activation with the source run's
    (the clean run when denoising, the corrupted one when noising) and scores the run with
    ``metric``. The results equal a loop of one forward per cell (to float precision).

    Args:
        model: Any module: transformers models, TransformerLens bridges, plain modules.
        clean: The clean prompts: model inputs as `run_with_hooks` takes them (token ids
            ``[pairs, seq]``, a ``BatchEncoding``, `Args`), or, as the source side, the
            ``{layer: Capture}`` dict of an earlier run.
        corrupted: The corrupted prompts, one per clean one.
        sites: Layer keys (globs included) for outputs, or `Sites` (``kind="input"``, a head
            count); `resid_pre`, `attn_out`, `head_out`, ... name the usual ones.
        metric: `logit_diff`, `probability`, `kl_to_clean`, or a callable
            ``metric(output) -> Tensor[pairs]``.
        over: What each site is cut into: ``None`` (the whole site), `each_position`,
            `each_head`, `each_index`, or a tuple of them (their product).
        mode: ``"denoise"`` patches clean activations into the corrupted run; ``"noise"``
            corrupted ones into the clean run.
        per_pair: Keep a ``"pair"`` axis instead of averaging over the prompt pairs.
        align: For prompts of different lengths: ``"end"`` (positions matched from the end)
            or ``{base_position: source_position}``.
        tokens: A tokenizer or one string per position, for position labels.
        batch_size: The most rows (cells x prompt pairs) per forward; default 64.
        memory: A memory budget (bytes or ``"2GB"``) that sets the rows per forward from the
            measured peak of one forward.
        vmap: Batch the cells with `torch.func.vmap` instead of stacking them as rows.
        causal: Whether the model is causal (positions never see later ones), which lets
            cells run on the positions their patch can change only, on the base run's
            key/value cache. ``None``: transformers models that generate (GPT-2, Llama, ...).
        reuse: What is computed once instead of once per cell, where it is exact:
            ``"auto"`` (both), ``"positions"`` (on a causal model, the positions before the
            first one a patch changes, from the base run's key/value cache), ``"layers"`` (the
            layers before a chunk's earliest patched one, run on one copy of the prompts), or
            ``"none"`` (every cell a whole forward).
        progress: Show a progress bar (tqdm); ``None``: on a terminal, for long sweeps.

    Returns:
        A `PatchingResult` with axes ``("site", *axes of over)`` (``"pair"`` first when
        ``per_pair``).

    Raises:
        HookfnError: Bad input, before any patched run: a `SpecError` for malformed
            arguments, an `EditError` when the shapes do not fit (a head split that does not
            divide the width, a cache from another model), naming the fix.

    Examples:
        >>> import torch
        >>> from hookfn.demo import load_model, make_patching_pair
        >>> from hookfn.patching import activation_patching, each_position, logit_diff
        >>> model, pair = load_model(), make_patching_pair(8, torch.Generator().manual_seed(0))
        >>> result = activation_patching(
        ...     model, pair.clean_ids, pair.corrupted_ids, "transformer.h.*",
        ...     over=each_position(), metric=logit_diff(pair.clean_targets, pair.corrupted_targets))
        >>> result.axes, tuple(result.values.shape)
        (('site', 'position'), (2, 8))
    """
    where = "activation_patching()"
    sides = read_sides(clean, corrupted, mode, align, where)
    site_set = as_sites(sites, f"{where}: sites=")
    axes = as_axes(over)
    scorer = as_scorer(metric, sides.base.n)
    budget = check_sizes(batch_size, memory, where)
    if not isinstance(vmap, bool) or not isinstance(per_pair, bool):
        raise SpecError(f"{where}: vmap= and per_pair= take True or False.")
    if causal is not None and not isinstance(causal, bool):
        raise SpecError(f"{where}: causal= takes True, False or None (detect), got {causal!r}.")
    if reuse not in ("auto", "positions", "layers", "none"):
        raise SpecError(
            f"{where}: reuse= takes 'auto', 'positions', 'layers' or 'none', got {reuse!r}."
        )
    names = site_names(model, site_set)
    if sides.cache is not None:
        check_cache(model, sides.cache, names, site_set.kind)
    parameters = forward_parameters(model)
    is_causal = _causal(model, causal)
    cache_keyword = next((k for k in ("cache", "past_key_values") if k in parameters), None)
    reuse_positions = reuse in ("auto", "positions")
    reuse_layers = reuse in ("auto", "layers")
    positions = (
        reuse_positions
        and is_causal
        and not vmap
        and cache_keyword is not None
        and "use_cache" in parameters
    )
    stack = find_stack(model, names) if reuse_layers and not vmap else None

    spec = capture_spec([(names, site_set.kind)])
    with torch.no_grad():
        outputs: dict[str, Any] = {}
        captures: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        for role in ("clean", "corrupted"):
            side = sides.base if role == sides.names[0] else sides.source
            if side is None:
                continue
            args = side.args
            if role == sides.names[0] and "use_cache" in parameters:
                args = side.with_kwargs(use_cache=positions)
            began = time.perf_counter()
            outputs[role], captures[role] = run_with_hooks(model, args, spec)
            synchronize(primary(outputs[role]))
            seconds[role] = time.perf_counter() - began
        clean_lp = clean_logprobs(scorer, outputs.get("clean"), sides.clean)
        metrics = {
            role: score(scorer, out, _side(sides, role), clean_lp) for role, out in outputs.items()
        }
    base_name, source_name = sides.names
    base_acts = activations(captures[base_name], names, site_set.kind, base_name)
    if sides.cache is not None:
        source_acts = activations(sides.cache, names, site_set.kind, "cache")
    else:
        source_acts = activations(captures[source_name], names, site_set.kind, source_name)
    grid = site_patches(model, site_set, names, axes, sides, source_acts, base_acts, tokens)

    base_output = primary(outputs[base_name])
    seq = sides.base.seq
    kv = _kv_cache(outputs[base_name], seq) if positions else None
    if kv is not None and not scorer.builtin and not _positional_output(base_output, seq):
        kv = None  # a callable metric reads the whole output, which then cannot be rebuilt
    kv_layers = kv is not None and stack is not None and _cache_layers(kv) == len(stack.children)
    runner = Runner(
        model, sides, grid, scorer, clean_lp, metrics[base_name], parameters,
        kv, cache_keyword, base_output, stack, kv_layers,
    )  # fmt: skip

    n = sides.base.n
    values = metrics[base_name].expand(len(names), grid.sites[0].masks.shape[0], n).clone()
    last_real = int(sides.base.last.max())
    groups: dict[int, list[Cell]] = {}
    for i, patch in enumerate(grid.sites):
        join = join_point(model, stack, patch.name, patch.kind)
        for j, first in enumerate(first_changed(patch, seq)):
            if first is None or (is_causal and first > last_real):
                continue  # the patch changes nothing the metric can see
            start = first if kv is not None and _positional(patch, seq) else 0
            groups.setdefault(start, []).append(Cell(i, j, start, join))
    for cells in groups.values():
        cells.sort(key=lambda c: c.order)

    row_bytes = 0
    if budget is not None:
        row_bytes = _row_bytes(runner)
    per_run = cells_per_run(n, batch_size, budget, row_bytes)
    chunks = plan_chunks(runner, groups, per_run, vmap, seconds[base_name])
    with torch.no_grad():
        for start, chunk in progress_bar(chunks, len(chunks), progress, "patching"):
            got = runner.vmapped(chunk) if vmap else runner.stacked(chunk, start)
            for cell, row in zip(chunk, got, strict=True):
                values[cell.site, cell.part] = row.to(values.dtype)
    return assemble(
        values, grid, metrics.get("clean"), metrics.get("corrupted"), n, per_pair, mode,
        "activation patching", scorer.name,
    )  # fmt: skip


def _fresh_cache(kv: Any) -> Any:
    """A copy of the base run's key/value cache to crop, index and extend.

    transformers' `DynamicCache` of `DynamicLayer` layers replaces its tensors on every change
    (``crop``, ``batch_select_indices``, ``update``) and never writes into them, so copies of
    the cache and layer objects, sharing the tensors, are enough; any other cache is deep
    copied."""
    layers = getattr(kv, "layers", None)
    if (
        type(kv).__name__ == "DynamicCache"
        and isinstance(layers, list)
        and all(type(layer).__name__ == "DynamicLayer" for layer in layers)
    ):
        fresh = copy.copy(kv)
        fresh.layers = [copy.copy(layer) for layer in layers]
        return fresh
    return copy.deepcopy(kv)


def _cache_layers(kv: Any) -> int | None:
    """The number of layers of a key/value cache that can be indexed layer by layer."""
    layers = getattr(kv, "layers", None)
    if isinstance(layers, list) and all(hasattr(x, "batch_select_indices") for x in layers):
        return len(layers)
    return None


def _side(sides: Sides, role: str) -> Any:
    return sides.base if role == sides.names[0] else sides.source


def _positional(patch: SitePatch, seq: int | None) -> bool:
    return seq is not None and patch.base.dim() >= 2 and patch.base.shape[1] == seq


def _positional_output(output: Tensor | None, seq: int | None) -> bool:
    return output is not None and output.dim() >= 2 and output.shape[1] == seq


def _row_bytes(runner: Runner) -> int:
    """Peak bytes per row of a forward like the patched ones (measured once), plus what a
    row's patches hold: the source and the patched copy at each site."""
    base = runner.sides.base
    pair = torch.arange(base.n)
    extra, _ = runner.extra(0, pair)
    args = Args(*base.args.args, **{**base.args.kwargs, **extra})
    with torch.no_grad():
        forward = measure_row_bytes(
            lambda: runner.model(*args.args, **args.kwargs), base.n, base.ids.device
        )
    patches = sum(2 * p.base[0].numel() * p.base.element_size() for p in runner.grid.sites)
    return forward + patches


def assemble(
    values: Tensor,
    grid: Grid,
    clean: Tensor | None,
    corrupted: Tensor | None,
    n: int,
    per_pair: bool,
    mode: Mode,
    method: str,
    metric: str,
) -> PatchingResult:
    """``[sites, cells, n]`` values and the baselines as a labelled `PatchingResult`."""
    nan = torch.full((n,), float("nan"))
    clean_metric = (nan if clean is None else clean).detach().float().cpu()
    corrupted_metric = (nan if corrupted is None else corrupted).detach().float().cpu()
    shaped = values.detach().float().cpu().reshape(*grid.shape, n).movedim(-1, 0)
    result = PatchingResult(
        shaped,
        ("pair", *grid.axes),
        (tuple(str(i) for i in range(n)), *grid.labels),
        clean_metric,
        corrupted_metric,
        mode,
        method,
        metric,
    )
    return result if per_pair else result.averaged()
