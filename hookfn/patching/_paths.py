"""`path_patching`: a sender's effect along its path to chosen receivers only (Wang et al.
2022, the IOI paper).

Three runs per sender cell, each batched over the cells:

1. the base prompts, with the sender's part taken from the source run and every other sender
   (every frozen site) held at its base-run value, so that the change reaches the receivers
   only along paths that avoid the other senders;
2. in that run, the receivers' activations are recorded;
3. the base prompts again, with only the receivers' activations replaced by the recorded
   ones; the metric of this run is the cell's value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hookfn import Args, Edit, Hook, SpecError, run_with_hooks

from ._baseline import (
    Grid,
    activations,
    capture_spec,
    check_cache,
    clean_logprobs,
    read_sides,
    score,
    site_names,
    site_patches,
)
from ._batches import check_sizes, forward_parameters, progress_bar
from ._exact import Patch, assemble, cell_rows, first_changed
from ._grid import Over, as_axes
from ._metrics import MetricLike, Rows, as_scorer
from ._prompts import Align
from ._result import Mode, PatchingResult
from ._sites import Kind, Sites, SitesLike, as_sites

__all__ = ["path_patching"]


def _merge(spec: dict[str, Hook], name: str, kind: Kind, edit: Edit | None, record: bool) -> None:
    """Add an edit or a capture of ``name``'s output or input to ``spec``."""
    old = spec.get(name, Hook(output=False))
    fields: dict[str, Any] = {
        "output": old.output,
        "input": old.input,
        "edit": old.edit,
        "edit_input": old.edit_input,
    }
    if kind == "output":
        fields["output"] = fields["output"] or record
        fields["edit"] = edit or fields["edit"]
    else:
        fields["input"] = fields["input"] or record
        fields["edit_input"] = edit or fields["edit_input"]
    spec[name] = Hook(
        fields["edit"],
        output=fields["output"],
        input=fields["input"],
        edit_input=fields["edit_input"],
    )


def path_patching(
    model: nn.Module,
    clean: object,
    corrupted: object,
    senders: SitesLike,
    receivers: SitesLike,
    *,
    metric: MetricLike,
    over: Over = None,
    freeze: SitesLike | None = None,
    mode: Mode = "denoise",
    per_pair: bool = False,
    align: Align = None,
    tokens: object = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> PatchingResult:
    """Path patching: each sender cell's effect through the receivers alone.

    For each cell of the senders (their sites cut by ``over``): run the base prompts with
    that part from the source run and every frozen site held at its base value, record the
    receivers' activations, then run the base prompts with only the receivers' activations
    replaced by those; the value is that last run's metric.

    Args:
        model: Any module.
        clean: The clean prompts (or, as the source side, a ``{layer: Capture}`` cache).
        corrupted: The corrupted prompts.
        senders: The sender sites (layer keys or `Sites`; `head_out` with `each_head` gives
            one cell per head).
        receivers: The receiver sites, patched whole in the last run (``Sites(...,
            kind="input")`` for what a module reads, e.g. the query input of chosen heads).
        metric: A built-in metric or a callable ``metric(output) -> Tensor[pairs]``.
        over: What each sender site is cut into (see `activation_patching`).
        freeze: The sites held at their base values in the first run (the other senders);
            default: the sender sites themselves.
        mode: ``"denoise"`` or ``"noise"``.
        per_pair: Keep a ``"pair"`` axis.
        align: For prompts of different lengths (see `activation_patching`).
        tokens: A tokenizer or one string per position, for position labels.
        batch_size: The most rows per forward (default 64).
        progress: Show a progress bar.

    Returns:
        A `PatchingResult` over the sender cells, method ``"path patching"``.

    Raises:
        HookfnError: Bad input, before any patched run; a receiver that is also frozen is a
            `SpecError` (its recorded value would be the frozen one).

    Examples:
        >>> import torch
        >>> from hookfn.demo import load_model, make_patching_pair
        >>> from hookfn.patching import Sites, each_head, head_out, logit_diff, path_patching
        >>> model, pair = load_model(), make_patching_pair(8, torch.Generator().manual_seed(0))
        >>> result = path_patching(
        ...     model, pair.clean_ids, pair.corrupted_ids,
        ...     senders=head_out(model), receivers=Sites("transformer.h.1.attn", kind="input"),
        ...     over=each_head(), freeze=head_out(model),
        ...     metric=logit_diff(pair.clean_targets, pair.corrupted_targets))
        >>> result.axes, tuple(result.values.shape)
        (('site', 'head'), (2, 4))
    """
    where = "path_patching()"
    sides = read_sides(clean, corrupted, mode, align, where)
    sender_sites = as_sites(senders, f"{where}: senders=")
    receiver_sites = as_sites(receivers, f"{where}: receivers=")
    frozen_sites = sender_sites if freeze is None else as_sites(freeze, f"{where}: freeze=")
    axes = as_axes(over)
    scorer = as_scorer(metric, sides.base.n)
    check_sizes(batch_size, None, where)
    sender_names = site_names(model, sender_sites)
    receiver_names = site_names(model, receiver_sites)
    frozen_names = site_names(model, frozen_sites)
    overlap = set(receiver_names) & set(frozen_names)
    if overlap and receiver_sites.kind == frozen_sites.kind:
        raise SpecError(
            f"{where}: {sorted(overlap)} are receivers and frozen: their recorded value would be "
            "the frozen one. Name receivers apart from the frozen senders."
        )
    if sides.cache is not None:
        check_cache(model, sides.cache, sender_names, sender_sites.kind)
    base_name, source_name = sides.names
    base, n = sides.base, sides.base.n

    groups = [(sender_names, sender_sites.kind), (frozen_names, frozen_sites.kind)]
    metrics: dict[str, Tensor] = {}
    captures: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    with torch.no_grad():
        for role in ("clean", "corrupted"):
            side = base if role == base_name else sides.source
            if side is not None:
                spec = capture_spec(groups if role == base_name else groups[:1])
                outputs[role], captures[role] = run_with_hooks(model, side.args, spec)
        clean_lp = clean_logprobs(scorer, outputs.get("clean"), sides.clean)
        for role, output in outputs.items():
            side = base if role == base_name else sides.source
            metrics[role] = score(scorer, output, side, clean_lp)  # type: ignore[arg-type]
    base_acts = activations(captures[base_name], sender_names, sender_sites.kind, base_name)
    frozen_acts = activations(captures[base_name], frozen_names, frozen_sites.kind, base_name)
    source_acts = activations(
        sides.cache if sides.cache is not None else captures[source_name],
        sender_names,
        sender_sites.kind,
        source_name,
    )
    grid = site_patches(
        model, sender_sites, sender_names, axes, sides, source_acts, base_acts, tokens
    )

    parameters = forward_parameters(model)
    extra: dict[str, Any] = {"use_cache": False} if "use_cache" in parameters else {}
    cells = [
        (i, j)
        for i, patch in enumerate(grid.sites)
        for j, first in enumerate(first_changed(patch, base.seq))
        if first is not None  # a sender part equal in both runs changes nothing downstream
    ]
    values = metrics[base_name].expand(len(grid.sites), grid.sites[0].masks.shape[0], n).clone()
    per_run = max(1, (batch_size or 64) // n)
    chunks = [cells[k : k + per_run] for k in range(0, len(cells), per_run)]
    with torch.no_grad():
        for chunk in progress_bar(chunks, len(chunks), progress, "path patching"):
            pair = torch.arange(n).repeat(len(chunk))
            args = base.rows(pair)
            args = Args(*args.args, **{**args.kwargs, **extra})
            recorded = _sender_run(
                model, args, grid, chunk, n, frozen_sites, frozen_acts, receiver_names,
                receiver_sites.kind,
            )  # fmt: skip
            receiving: dict[str, Hook] = {}
            for name in receiver_names:
                everything = torch.ones(1, dtype=torch.bool, device=recorded[name].device)
                edit = Patch(0, len(chunk) * n, everything, recorded[name])
                _merge(receiving, name, receiver_sites.kind, edit, record=False)
            output, _ = run_with_hooks(model, args, receiving)
            scored = scorer(output, Rows(n, pair, base.last[pair]), clean_lp).view(len(chunk), n)
            for (i, j), row in zip(chunk, scored, strict=True):
                values[i, j] = row.to(values.dtype)
    return assemble(
        values, grid, metrics.get("clean"), metrics.get("corrupted"), n, per_pair, mode,
        "path patching", scorer.name,
    )  # fmt: skip


def _sender_run(
    model: nn.Module,
    args: Args,
    grid: Grid,
    chunk: list[tuple[int, int]],
    n: int,
    frozen: Sites,
    frozen_acts: dict[str, Tensor],
    receiver_names: list[str],
    receiver_kind: Kind,
) -> dict[str, Tensor]:
    """Runs 1 and 2: the senders patched, the frozen sites held, the receivers recorded."""
    rows, copies = len(chunk) * n, len(chunk)
    everything = torch.ones(1, dtype=torch.bool)
    spec: dict[str, Hook] = {}
    held: dict[str, Tensor] = {name: _repeat(value, copies) for name, value in frozen_acts.items()}
    for index, patch in enumerate(grid.sites):
        mine = [j if i == index else -1 for i, j in chunk]
        if all(j < 0 for j in mine):
            continue
        off = torch.zeros_like(patch.masks[0])
        mask = cell_rows(torch.stack([patch.masks[j] if j >= 0 else off for j in mine]), n)
        source = torch.where(mask, _repeat(patch.source, copies), _repeat(patch.base, copies))
        if patch.name in held and frozen.kind == patch.kind:
            # A frozen sender: held at the base value except for this cell's part.
            held[patch.name] = source
        else:
            _merge(spec, patch.name, patch.kind, Patch(0, rows, mask, source), record=False)
    for name, value in held.items():
        edit = Patch(0, rows, everything.to(value.device), value)
        _merge(spec, name, frozen.kind, edit, record=False)
    for name in receiver_names:
        _merge(spec, name, receiver_kind, None, record=True)
    _, captures = run_with_hooks(model, args, spec)
    return activations(captures, receiver_names, receiver_kind, "sender")


def _repeat(t: Tensor, copies: int) -> Tensor:
    return t.repeat(copies, *[1] * (t.dim() - 1))
