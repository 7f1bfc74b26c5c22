"""Draw the figures of docs/gallery.md from the shipped demo model.

Run from the repository root: ``python docs/gallery.py`` (writes into ``docs/``), or
``python docs/gallery.py DIR`` to write them elsewhere. ``tests/test_gallery.py`` runs
`make_figures` into a temporary folder and checks each figure's size and labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch

from hookfn import run_with_hooks
from hookfn.demo import decode, load_model, make_patching_pair
from hookfn.patching import (
    activation_patching,
    attribution_patching,
    each_head,
    each_position,
    head_out,
    logit_diff,
)

SITES = ["transformer.wte", "transformer.h.*"]

# Titles and axis labels, as docs/gallery.md names them (tests/test_gallery.py checks them).
LABELS = {
    "gallery-patching.png": {
        "title": "Activation patching: logit difference restored",
        "xlabel": "position",
        "ylabel": "site",
    },
    "gallery-attribution.png": {
        "title": "Attribution patching against exact patching",
        "xlabel": "exact patching effect",
        "ylabel": "attribution patching estimate",
    },
    "gallery-attention.png": {
        "title": "Attention pattern: block 0, head 0",
        "xlabel": "key position",
        "ylabel": "query position",
    },
    "components-pattern.png": {
        "title": "The head that moves the answer",
        "xlabel": "key position",
        "ylabel": "query position",
    },
}


def _pair():  # type: ignore[no-untyped-def]
    pair = make_patching_pair(16, torch.Generator().manual_seed(0), pair_index=1)
    metric = logit_diff(pair.clean_targets, pair.corrupted_targets)
    return pair, metric


def patching_figure(model: torch.nn.Module, path: Path) -> plt.Figure:
    """Exact patching of each position of the embedding and each block, normalized."""
    pair, _ = _pair()
    one = slice(0, 1)
    result = activation_patching(
        model,
        pair.clean_ids[one],
        pair.corrupted_ids[one],
        SITES,
        over=each_position(),
        tokens=decode(pair.clean_ids[0]).split(),
        metric=logit_diff(pair.clean_targets[one], pair.corrupted_targets[one]),
    )
    figure = result.normalized().plot()
    axes = figure.axes[0]
    axes.set_title(LABELS[path.name]["title"])
    axes.set_xlabel(LABELS[path.name]["xlabel"])
    axes.set_ylabel(LABELS[path.name]["ylabel"])
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure


def attribution_figure(model: torch.nn.Module, path: Path) -> plt.Figure:
    """Each cell's effect: exact patching on x, attribution patching (and IG) on y."""
    pair, metric = _pair()
    clean, corrupted = pair.clean_ids, pair.corrupted_ids
    exact = activation_patching(model, clean, corrupted, SITES, over=each_position(), metric=metric)
    plain = attribution_patching(
        model, clean, corrupted, SITES, over=each_position(), metric=metric
    )
    integrated = attribution_patching(
        model, clean, corrupted, SITES, over=each_position(), metric=metric, steps=16
    )
    x = exact.effect.flatten()
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.scatter(x, plain.effect.flatten(), label="attribution patching (1 step)", s=25)
    axes.scatter(
        x, integrated.effect.flatten(), label="integrated gradients (16 steps)", s=25, marker="x"
    )
    low, high = float(x.min()) - 1, float(x.max()) + 1
    axes.plot([low, high], [low, high], color="grey", linewidth=1, label="estimate = exact")
    axes.set_title(LABELS[path.name]["title"])
    axes.set_xlabel(LABELS[path.name]["xlabel"])
    axes.set_ylabel(LABELS[path.name]["ylabel"])
    axes.legend(loc="upper left", fontsize="small")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure


def _pattern_figure(ids: torch.Tensor, pattern: torch.Tensor, path: Path, note: str) -> plt.Figure:
    seq = pattern.shape[-1]
    tokens = decode(ids[0]).split()
    figure, axes = plt.subplots(figsize=(5, 4.5))
    image = axes.imshow(pattern.detach(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(seq), tokens)
    axes.set_yticks(range(seq), tokens)
    figure.colorbar(image, ax=axes, label="attention weight")
    axes.set_title(LABELS[path.name]["title"])
    axes.set_xlabel(LABELS[path.name]["xlabel"])
    axes.set_ylabel(LABELS[path.name]["ylabel"])
    if note:
        axes.text(0.02, 0.02, note, transform=axes.transAxes, fontsize="small", color="grey")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure


def attention_figure(model: torch.nn.Module, path: Path) -> plt.Figure:
    """Head 0 of block 0: the softmax inside its attention, captured as an op site (the
    model returns no weights)."""
    pair, _ = _pair()
    ids = pair.clean_ids[:1]
    _, caches = run_with_hooks(model, ids, ["transformer.h.0.attn:softmax"])
    return _pattern_figure(ids, caches["transformer.h.0.attn:softmax"].output[0, 0], path, "")


def head_pattern_figure(model: torch.nn.Module, path: Path) -> plt.Figure:
    """The head of block 0 whose patching restores the most, found by head patching; its
    pattern from the ``:pattern`` site."""
    pair, metric = _pair()
    heads = activation_patching(
        model, pair.clean_ids, pair.corrupted_ids, head_out(model), over=each_head(), metric=metric
    )
    head = int(heads.values[0].argmax())
    ids = pair.clean_ids[:1]
    _, caches = run_with_hooks(model, ids, ["transformer.h.0.attn:pattern"])
    pattern = caches["transformer.h.0.attn:pattern"].output[0, head]
    restored = float(heads.normalized().values[0, head])
    note = f"block 0, head {head}: patching it alone restores {restored:.0%}"
    return _pattern_figure(ids, pattern, path, note)


def make_figures(folder: str | Path) -> dict[str, plt.Figure]:
    """Draw every figure into ``folder``; return ``{file name: figure}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = load_model()
    figures = {}
    for name, draw in (
        ("gallery-patching.png", patching_figure),
        ("gallery-attribution.png", attribution_figure),
        ("gallery-attention.png", attention_figure),
        ("components-pattern.png", head_pattern_figure),
    ):
        figures[name] = draw(model, folder / name)
        plt.close(figures[name])
    return figures


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for name in make_figures(out):
        print(out / name)
