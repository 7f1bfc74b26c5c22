"""`attribution_patching`: the sweep's grid estimated from gradients, in a constant number of
passes.

Patching a part of a site moves the metric by about ``grad . (source - base)`` over that
part, the gradient taken in the base run: one source forward, one base forward and one
backward give every cell of every site. Where the model saturates, the gradient at the base
run says little about a large change; integrated gradients (``steps=k``) average the
gradient along the straight line from the base activation to the source one, each site on its
own (every other site as in the base run), as EAP-IG does, at the cost of ``k`` batched rows
per site and prompt pair. ``steps=1`` is plain attribution patching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from hookfn import Args, Edit, Hook, Site, SpecError, primary, run_with_hooks

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
from ._batches import DEFAULT_ROWS, check_sizes, forward_parameters, progress_bar
from ._exact import assemble
from ._grid import Over, as_axes
from ._metrics import MetricLike, Rows, Scorer, as_scorer
from ._prompts import Align
from ._result import Mode, PatchingResult
from ._sites import SitesLike, as_sites

__all__ = ["attribution_patching"]


class _Interpolate(Edit):
    """Rows ``start:stop`` move from the activation toward ``source`` by ``alpha`` (one value
    per row): ``x + alpha * (source - x)``."""

    __slots__ = ("alpha", "source", "start", "stop")

    def __init__(self, start: int, stop: int, alpha: Tensor, source: Tensor) -> None:
        self.start, self.stop, self.alpha, self.source = start, stop, alpha, source

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        start, stop = self.start, self.stop
        part = x[start:stop] + self.alpha * (self.source - x[start:stop])
        return torch.cat([x[:start], part, x[stop:]])

    def __repr__(self) -> str:
        return f"_Interpolate(rows {self.start}:{self.stop})"


def _estimates(patch: SitePatch, gradient: Tensor) -> Tensor:
    """``[cells, n]``: each part's sum of ``gradient * (source - base)``."""
    product = (gradient * (patch.source - patch.base)).float()
    rows = []
    for begin in range(0, patch.masks.shape[0], 16):  # bounded memory for large grids
        masks = patch.masks[begin : begin + 16]
        rows.append((masks * product[None]).flatten(2).sum(-1))
    return torch.cat(rows)


def _metric_sum(
    scorer: Scorer, rows: Rows, clean: Tensor | None, own_clean: bool
) -> Callable[[Any], Tensor]:
    def total(output: Any) -> Tensor:
        reference = clean
        if own_clean and reference is None and scorer.metric is not None:
            # Noising with kl_to_clean: the run is the clean one, its own reference.
            logits = primary(output)
            assert logits is not None
            at = torch.arange(logits.shape[0], device=logits.device)
            last = logits[at, rows.index.to(logits.device)]
            reference = last.detach().float().log_softmax(-1)
        return scorer(output, rows, reference).sum()

    return total


def _gradients_along_paths(
    model: nn.Module,
    sides: Sides,
    grid: Grid,
    scorer: Scorer,
    clean: Tensor | None,
    steps: int,
    batch_size: int | None,
    progress: bool | None,
) -> list[Tensor]:
    """Per site: the mean gradient at ``base + j/steps * (source - base)``, ``j < steps``."""
    base, n = sides.base, sides.base.n
    parameters = forward_parameters(model)
    units = [(i, j) for i in range(len(grid.sites)) for j in range(steps)]
    per_run = max(1, (batch_size or DEFAULT_ROWS) // n)
    sums = [torch.zeros_like(p.base, dtype=torch.float32) for p in grid.sites]
    chunks = [units[k : k + per_run] for k in range(0, len(units), per_run)]
    for chunk in progress_bar(chunks, len(chunks), progress, "integrated gradients"):
        pair = torch.arange(n).repeat(len(chunk))
        spec: dict[str, Hook] = {}
        spans: dict[int, tuple[int, int]] = {}
        row = 0
        for i in sorted({i for i, _ in chunk}):
            alphas = [j / steps for k, j in chunk if k == i]
            patch = grid.sites[i]
            count = len(alphas) * n
            shape = [count] + [1] * (patch.base.dim() - 1)
            alpha = torch.tensor(alphas, dtype=patch.base.dtype, device=patch.base.device)
            alpha = alpha.repeat_interleave(n).view(shape)
            source = patch.source.repeat(len(alphas), *[1] * (patch.base.dim() - 1))
            edit = _Interpolate(row, row + count, alpha, source)
            if patch.kind == "output":
                spec[patch.name] = Hook(edit, output=False, grad=True)
            else:
                spec[patch.name] = Hook(edit_input=edit, output=False, grad_input=True)
            spans[i] = (row, row + count)
            row += count
        args = base.rows(pair)
        if "use_cache" in parameters:
            args = Args(*args.args, **{**args.kwargs, "use_cache": False})
        rows = Rows(n, pair, base.last[pair])
        own = sides.mode == "noise"
        _, captures = run_with_hooks(
            model, args, spec, backward=_metric_sum(scorer, rows, clean, own)
        )
        for i, (start, stop) in spans.items():
            patch = grid.sites[i]
            capture = captures[patch.name]
            gradient = capture.grad_output if patch.kind == "output" else capture.grad_input
            sums[i] += gradient[start:stop].float().view(-1, *patch.base.shape).sum(0)
    return [total / steps for total in sums]


def attribution_patching(
    model: nn.Module,
    clean: object,
    corrupted: object,
    sites: SitesLike,
    *,
    metric: MetricLike,
    over: Over = None,
    mode: Mode = "denoise",
    steps: int = 1,
    per_pair: bool = False,
    align: Align = None,
    tokens: object = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> PatchingResult:
    """Attribution patching: each cell's patching effect estimated as gradient x difference.

    Takes the arguments of `activation_patching` (the same sites, axes, modes and metrics)
    and returns a result over the same cells, whose values are ``base + estimate``. With
    ``steps=1``: one source forward, one base forward, one backward, whatever the grid.

    Args:
        model: Any module that autograd can differentiate.
        clean: The clean prompts (or, as the source side, a ``{layer: Capture}`` cache).
        corrupted: The corrupted prompts.
        sites: Layer keys (globs included) or `Sites`.
        metric: A built-in metric or a callable ``metric(output) -> Tensor[pairs]``; it must
            be differentiable.
        over: What each site is cut into (see `activation_patching`).
        mode: ``"denoise"`` or ``"noise"``.
        steps: ``k`` > 1 averages the gradient at ``k`` points ``base + j/k (source -
            base)``, ``j < k``, along each site's straight path (integrated gradients); 1 is
            plain attribution patching.
        per_pair: Keep a ``"pair"`` axis.
        align: For prompts of different lengths (see `activation_patching`).
        tokens: A tokenizer or one string per position, for position labels.
        batch_size: The most rows per forward of the integrated-gradient runs (default 64).
        progress: Show a progress bar for the integrated-gradient runs.

    Returns:
        A `PatchingResult`, method ``"attribution patching"`` (or ``"integrated gradients,
        k steps"``).

    Examples:
        >>> import torch
        >>> from hookfn.demo import load_model, make_patching_pair
        >>> from hookfn.patching import attribution_patching, each_position, logit_diff
        >>> model, pair = load_model(), make_patching_pair(8, torch.Generator().manual_seed(0))
        >>> estimate = attribution_patching(
        ...     model, pair.clean_ids, pair.corrupted_ids, "transformer.h.*",
        ...     over=each_position(), metric=logit_diff(pair.clean_targets, pair.corrupted_targets))
        >>> estimate.method, tuple(estimate.values.shape)
        ('attribution patching', (2, 8))
    """
    where = "attribution_patching()"
    sides = read_sides(clean, corrupted, mode, align, where)
    site_set = as_sites(sites, f"{where}: sites=")
    axes = as_axes(over)
    scorer = as_scorer(metric, sides.base.n)
    check_sizes(batch_size, None, where)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SpecError(f"{where}: steps= takes a positive int (1: plain), got {steps!r}.")
    if not isinstance(per_pair, bool):
        raise SpecError(f"{where}: per_pair= takes True or False.")
    names = site_names(model, site_set)
    if sides.cache is not None:
        check_cache(model, sides.cache, names, site_set.kind)
    base_name, source_name = sides.names
    n = sides.base.n

    metrics: dict[str, Tensor] = {}
    clean_lp = None
    source_acts = None
    if sides.source is not None:
        with torch.no_grad():
            output, captures = run_with_hooks(
                model, sides.source.args, capture_spec([(names, site_set.kind)])
            )
            if source_name == "clean":
                clean_lp = clean_logprobs(scorer, output, sides.source)
            metrics[source_name] = score(scorer, output, sides.source, clean_lp)
        source_acts = activations(captures, names, site_set.kind, source_name)
    else:
        source_acts = activations(sides.cache, names, site_set.kind, "cache")  # type: ignore[arg-type]
        if source_name == "clean":
            clean_lp = clean_logprobs(scorer, None, None)  # raises for metrics that need it

    rows = Rows(n, torch.arange(n), sides.base.last)
    spec = capture_spec([(names, site_set.kind)], grad=True)
    output, captures = run_with_hooks(
        model,
        sides.base.args,
        spec,
        backward=_metric_sum(scorer, rows, clean_lp, sides.mode == "noise"),
    )
    with torch.no_grad():
        if base_name == "clean":
            clean_lp = clean_logprobs(scorer, output, sides.base)
        metrics[base_name] = score(scorer, output, sides.base, clean_lp).detach()
    base_acts = activations(captures, names, site_set.kind, base_name)
    gradients = activations(captures, names, site_set.kind, base_name, grad=True)
    grid = site_patches(model, site_set, names, axes, sides, source_acts, base_acts, tokens)

    if steps == 1:
        along = [gradients[name] for name in names]
    else:
        along = _gradients_along_paths(
            model, sides, grid, scorer, clean_lp, steps, batch_size, progress
        )
    with torch.no_grad():
        estimates = torch.stack([_estimates(p, g) for p, g in zip(grid.sites, along, strict=True)])
        values = metrics[base_name].float().cpu() + estimates.cpu()
    method = "attribution patching" if steps == 1 else f"integrated gradients, {steps} steps"
    return assemble(
        values, grid, metrics.get("clean"), metrics.get("corrupted"), n, per_pair, mode,
        method, scorer.name,
    )  # fmt: skip
