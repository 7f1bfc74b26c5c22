"""The two runs every experiment starts from, and what is read off them.

`read_sides` checks the prompt pairs (before any forward); `site_names` resolves the sites'
keys without running anything; the clean and corrupted runs capture the sites; `site_patches`
turns their activations into what each cell writes (the source, aligned to the base prompt's
positions) and where (the masks of the sweep's axes), checking the shapes the runs revealed
before any patched run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hookfn import (
    Capture,
    EditError,
    Hook,
    HookfnError,
    LayerNotFoundError,
    SpecError,
    TraceMultiple,
    primary,
)

from ._grid import Axis, PartContext, parts_of
from ._metrics import Rows, Scorer
from ._prompts import Align, Prompts, alignment, position_labels, prompts
from ._result import Mode
from ._sites import Kind, Sites, n_heads_of

__all__ = [
    "Grid",
    "SitePatch",
    "Sides",
    "activations",
    "capture_spec",
    "clean_logprobs",
    "read_sides",
    "score",
    "site_names",
    "site_patches",
]


@dataclass(frozen=True, slots=True, eq=False)
class Sides:
    """The prompt pairs of an experiment, by role.

    Attributes:
        base: The prompts of the run that is patched (corrupted when denoising).
        source: The prompts the patches come from, or ``None`` when they come from ``cache``.
        cache: The source's activations, when given as a ``{layer: Capture}`` dict.
        mode: ``"denoise"`` or ``"noise"``.
        mapping: ``[base seq]`` source position of each base position, or ``None``.
    """

    base: Prompts
    source: Prompts | None
    cache: Mapping[str, Capture] | None
    mode: Mode
    mapping: Tensor | None

    @property
    def names(self) -> tuple[str, str]:
        """The (base, source) sides' names."""
        return ("corrupted", "clean") if self.mode == "denoise" else ("clean", "corrupted")

    @property
    def clean(self) -> Prompts | None:
        return self.source if self.mode == "denoise" else self.base


def _is_cache(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, Capture) for v in value.values())
    )


def read_sides(clean: object, corrupted: object, mode: object, align: Align, where: str) -> Sides:
    """Check and read the prompt pairs; nothing runs.

    Raises:
        SpecError: A bad ``mode``, prompt pairs of different counts, shapes that ``align``
            does not match, or a cache on the side that is patched.
    """
    if mode not in ("denoise", "noise"):
        raise SpecError(
            f"{where}: mode= is 'denoise' (clean activations into the corrupted run) or "
            f"'noise' (corrupted into the clean run), got {mode!r}."
        )
    base_value, source_value = (corrupted, clean) if mode == "denoise" else (clean, corrupted)
    base_name, source_name = ("corrupted", "clean") if mode == "denoise" else ("clean", "corrupted")
    if _is_cache(base_value):
        raise SpecError(
            f"{where}: the {base_name} side is the run that is patched (mode={mode!r}), so it "
            "must be model inputs, not a cache."
        )
    base = prompts(base_value, f"{where}: {base_name}")
    if _is_cache(source_value):
        assert isinstance(source_value, Mapping)
        return Sides(base, None, source_value, mode, None)  # type: ignore[arg-type]
    source = prompts(source_value, f"{where}: {source_name}")
    if source.n != base.n:
        raise SpecError(
            f"{where}: {base.n} {base_name} prompts but {source.n} {source_name} ones; give one "
            "of each per prompt pair."
        )
    mapping = alignment(base, source, align, (base_name, source_name))
    return Sides(base, source, None, mode, mapping)  # type: ignore[arg-type]


def site_names(model: nn.Module, sites: Sites) -> list[str]:
    """The concrete layer names the sites' keys resolve to, in model order (no forward)."""
    return list(TraceMultiple(model, list(sites.keys)))


def check_cache(
    model: nn.Module, cache: Mapping[str, Capture], names: list[str], kind: Kind
) -> None:
    """Check a source cache against the model and the sites (before any forward).

    Raises:
        SpecError: The cache names layers this model does not have, or lacks a site.
    """
    try:
        TraceMultiple(model, list(cache))
    except LayerNotFoundError as error:
        raise SpecError(
            f"the source cache names layers this model does not have ({error}); it was taken "
            "on another model: capture it with run_with_hooks(model, inputs, [...]) on this one."
        ) from None
    for name in names:
        capture = cache.get(name)
        records = (
            ()
            if capture is None
            else (capture.raw_outputs if kind == "output" else capture.raw_inputs)
        )
        if not records:
            how = "'capture'" if kind == "output" else "Hook(input=True)"
            raise SpecError(
                f"the source cache has no {kind} of {name!r}; capture it with {how} in the run "
                "that makes the cache."
            )


def capture_spec(groups: list[tuple[list[str], Kind]], *, grad: bool = False) -> dict[str, Hook]:
    """One capture `Hook` per layer: its output and/or input (and their gradients)."""
    kinds: dict[str, set[str]] = {}
    for names, kind in groups:
        for name in names:
            kinds.setdefault(name, set()).add(kind)
    spec = {}
    for name, wanted in kinds.items():
        out, inp = "output" in wanted, "input" in wanted
        spec[name] = Hook(output=out, input=inp, grad=grad and out, grad_input=grad and inp)
    return spec


def activations(
    captures: Mapping[str, Capture], names: list[str], kind: Kind, side: str, *, grad: bool = False
) -> dict[str, Tensor]:
    """Each site's activation (or its gradient) in one run.

    Raises:
        HookfnError: A site ran more than once (a shared module): a cell would be ambiguous.
    """
    result = {}
    for name in names:
        capture = captures[name]
        if capture.n_calls != 1:
            raise HookfnError(
                f"{name!r} ran {capture.n_calls} times in the {side} run; patching sweeps need "
                "sites that run once per forward (name each use's own module)."
            )
        if grad:
            result[name] = capture.grad_output if kind == "output" else capture.grad_input
        else:
            result[name] = capture.output if kind == "output" else capture.input
    return result


def score(scorer: Scorer, output: Any, side: Prompts, clean: Tensor | None) -> Tensor:
    """The metric of a run on the prompts themselves: ``[n]``."""
    rows = Rows(side.n, torch.arange(side.n), side.last)
    return scorer(output, rows, clean)


def clean_logprobs(scorer: Scorer, output: Any, side: Prompts | None) -> Tensor | None:
    """The clean run's log-probabilities at each last real position, for metrics that need
    them."""
    if scorer.metric is None or not scorer.metric.needs_clean:
        return None
    if side is None:
        raise SpecError(
            f"the metric {scorer.name} needs the clean run's distribution; pass clean inputs, "
            "not a cache."
        )
    logits = primary(output)
    assert logits is not None
    at = torch.arange(logits.shape[0], device=logits.device)
    return logits[at, side.last.to(logits.device)].detach().float().log_softmax(-1)


@dataclass(frozen=True, slots=True, eq=False)
class SitePatch:
    """What the cells of one site write, and where.

    Attributes:
        name: The layer name.
        kind: ``"output"`` or ``"input"``.
        source: ``[n, *rest]``: the source activation at the base prompt's positions (the base
            activation where a base position has no source position).
        base: ``[n, *rest]``: the base run's activation.
        masks: ``[cells, ...]`` boolean masks, broadcastable to ``[n, *rest]``.
    """

    name: str
    kind: Kind
    source: Tensor
    base: Tensor
    masks: Tensor


@dataclass(frozen=True, slots=True, eq=False)
class Grid:
    """The sites' patches and the labelled axes of the result (after ``"site"``)."""

    sites: list[SitePatch]
    axes: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(labels) for labels in self.labels)


def site_patches(
    model: nn.Module,
    sites: Sites,
    names: list[str],
    axes: tuple[Axis, ...],
    sides: Sides,
    source: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    tokens: object,
) -> Grid:
    """The cells of the sweep: each site's aligned source and its parts' masks.

    Raises:
        EditError: A source activation's shape does not fit the base run's (a cache from
            another model or other prompts), or an axis does not fit a site.
    """
    seq = sides.base.seq
    labels = position_labels(sides.base, tokens)
    n_heads = sites.n_heads or n_heads_of(model)
    mapped = None if sides.mapping is None else sides.mapping >= 0
    patches = []
    axis_labels: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    for name in names:
        theirs, ours = source[name].detach(), base[name].detach()
        aligned = _aligned(name, sites.kind, theirs, ours, sides)
        context = PartContext(name, ours.shape, seq, mapped, labels, n_heads)
        each, masks = parts_of(axes, context)
        found = tuple((p.name, p.labels) for p in each)
        if axis_labels is None:
            axis_labels = found
        elif found != axis_labels:
            raise EditError(
                f"the sites cut into different parts: {names[0]!r} into "
                f"{[len(names_) for _, names_ in axis_labels]} and {name!r} into "
                f"{[len(names_) for _, names_ in found]}; sweep sites of one shape together."
            )
        patches.append(SitePatch(name, sites.kind, aligned, ours, masks.to(ours.device)))
    assert axis_labels is not None
    return Grid(
        patches,
        ("site", *(a for a, _ in axis_labels)),
        (tuple(names), *(labels_ for _, labels_ in axis_labels)),
    )


def _aligned(name: str, kind: Kind, theirs: Tensor, ours: Tensor, sides: Sides) -> Tensor:
    source_name = sides.names[1]
    what = "the cache" if sides.cache is not None else f"the {source_name} run"
    mapping = sides.mapping
    if mapping is None:
        if theirs.shape != ours.shape:
            raise EditError(
                f"the {kind} of {name!r} has shape {tuple(theirs.shape)} in {what} but "
                f"{tuple(ours.shape)} in the {sides.names[0]} run; "
                + (
                    "the cache was taken on another model or other prompts: capture it on this "
                    "model with prompts of the same shape."
                    if sides.cache is not None
                    else "patch between prompts of one shape, or pass align= for other lengths."
                )
            )
        return theirs.to(ours.dtype)
    if theirs.dim() < 2 or theirs.shape[0] != ours.shape[0] or theirs.shape[2:] != ours.shape[2:]:
        raise EditError(
            f"the {kind} of {name!r} has shape {tuple(theirs.shape)} in {what} and "
            f"{tuple(ours.shape)} in the {sides.names[0]} run: with align=, they may differ in "
            "their positions (dim 1) only."
        )
    mapping = mapping.to(ours.device)
    keep = mapping >= 0
    aligned = ours.clone()
    aligned[:, keep] = theirs[:, mapping[keep]].to(ours.dtype)
    return aligned
