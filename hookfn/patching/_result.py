"""What an experiment returns: `PatchingResult` (labelled values, baselines, table, heatmap),
and `agreement`, the report that compares an estimate with exact patching."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from typing_extensions import TypeAlias

from hookfn import SpecError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Agreement", "Disagreement", "Mode", "PatchingResult", "agreement"]

Mode: TypeAlias = Literal["denoise", "noise"]


@dataclass(frozen=True, slots=True, eq=False)
class PatchingResult:
    """The metric after each patch, with named, labelled axes and the two baselines.

    Attributes:
        values: The metric of each patched run (or its estimate), shaped by ``axes``.
        axes: The axis names: ``"site"``, then the sweep's axes (``"position"``, ``"head"``,
            ``"index"``); ``"pair"`` first for per-pair results.
        labels: One label per entry of each axis: layer names, positions (with their tokens
            when ``tokens=`` was given), ``"H3"`` for heads.
        clean: The metric of the clean run (per pair, or averaged like ``values``).
        corrupted: The metric of the corrupted run.
        mode: ``"denoise"`` (clean patched into the corrupted run) or ``"noise"``
            (corrupted patched into the clean run).
        method: How the values were obtained (``"activation patching"``, ...).
        metric: The metric's name.

    Examples:
        >>> import torch
        >>> result = PatchingResult(
        ...     torch.tensor([[1.0, 3.0]]), ("site", "position"), (("h.0",), ("0", "1")),
        ...     clean=torch.tensor(3.0), corrupted=torch.tensor(1.0), mode="denoise",
        ...     method="activation patching", metric="logit_diff(3, 5)")
        >>> result.normalized().values
        tensor([[0., 1.]])
        >>> print(result.table())
        site  position=0  position=1
        h.0       1.000       3.000
    """

    values: Tensor
    axes: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    clean: Tensor
    corrupted: Tensor
    mode: Mode
    method: str
    metric: str

    @property
    def base(self) -> Tensor:
        """The metric of the run that was patched: corrupted (denoising) or clean (noising)."""
        return self.corrupted if self.mode == "denoise" else self.clean

    @property
    def effect(self) -> Tensor:
        """``values - base``: how much each patch moved the metric."""
        return self.values - self._broadcast(self.base)

    def normalized(self) -> PatchingResult:
        """``(values - corrupted) / (clean - corrupted)``: 1 is the clean run, 0 the corrupted.

        Per pair for per-pair results; from the averages otherwise.
        """
        clean, corrupted = self._broadcast(self.clean), self._broadcast(self.corrupted)
        values = (self.values - corrupted) / (clean - corrupted)
        one = torch.ones_like(self.clean)
        return replace(
            self,
            values=values,
            clean=one,
            corrupted=torch.zeros_like(self.clean),
            metric=f"normalized {self.metric}",
        )

    def averaged(self) -> PatchingResult:
        """A per-pair result averaged over its prompt pairs (itself when it has no pair axis)."""
        if not self.axes or self.axes[0] != "pair":
            return self
        return replace(
            self,
            values=self.values.mean(0),
            axes=self.axes[1:],
            labels=self.labels[1:],
            clean=self.clean.mean(0),
            corrupted=self.corrupted.mean(0),
        )

    def to_tensor(self) -> Tensor:
        """The values as a plain tensor (axes in the order of ``axes``)."""
        return self.values

    def _broadcast(self, baseline: Tensor) -> Tensor:
        if baseline.dim() == 0:
            return baseline
        return baseline.view(-1, *[1] * (self.values.dim() - 1))

    def _grid(self) -> tuple[Tensor, list[str], list[str], str, str]:
        """The values as rows x columns: every axis but the last down, the last across."""
        values = self.values.detach().float().cpu()
        if len(self.axes) == 1:
            return values[:, None], list(self.labels[0]), [""], self.axes[0], ""
        rows = _product(self.labels[:-1])
        grid = values.reshape(len(rows), len(self.labels[-1]))
        return grid, rows, list(self.labels[-1]), " x ".join(self.axes[:-1]), self.axes[-1]

    def table(self, precision: int = 3) -> str:
        """The values as a text table: every axis but the last down, the last across."""
        grid, rows, columns, row_name, column_name = self._grid()
        header = [row_name] + [f"{column_name}={c}" if column_name else "value" for c in columns]
        body = [
            [row] + [_number(float(v), precision) for v in grid[i]] for i, row in enumerate(rows)
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
            for row in [header, *body]
        ]
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        shape = " x ".join(
            f"{axis}[{len(labels)}]" for axis, labels in zip(self.axes, self.labels, strict=True)
        )
        return f"PatchingResult({self.method}, {self.mode}, {self.metric}: {shape})"

    def plot(
        self,
        path: str | Path | None = None,
        *,
        ax: Axes | None = None,
        title: str | None = None,
    ) -> Figure:
        """A labelled heatmap of the values (needs matplotlib: ``pip install hookfn[plots]``).

        Every axis but the last runs down, the last across; the colour scale is centred on
        the patched run's baseline (white: no effect). Per-pair results are averaged.

        Args:
            path: Save the figure there (the suffix picks the format: ``.png``, ``.svg``).
            ax: Draw into these matplotlib axes instead of a new figure.
            title: The title (default: method, mode and metric).

        Returns:
            The matplotlib ``Figure``.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:  # pragma: no cover - matplotlib is a test extra
            raise ModuleNotFoundError(
                "PatchingResult.plot() needs matplotlib: pip install 'hookfn[plots]'."
            ) from None
        result = self.averaged()
        grid, rows, columns, row_name, column_name = result._grid()
        centre = float(result.base.float().mean())
        finite = grid[torch.isfinite(grid)]
        spread = float((finite - centre).abs().max()) if finite.numel() else 1.0
        spread = spread or 1.0
        if ax is None:
            height = min(2.5 + 0.35 * len(rows), 14.0)  # room for the colour bar's label
            width = min(2.5 + 0.45 * len(columns), 18.0)
            figure = Figure(figsize=(width, height), layout="constrained")
            ax = figure.add_subplot()
        else:
            figure = ax.figure  # type: ignore[assignment]
        image = ax.imshow(
            grid.numpy(),
            cmap="RdBu",
            vmin=centre - spread,
            vmax=centre + spread,
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > 8 else 0)
        ax.set_ylabel(row_name)
        ax.set_xlabel(column_name)
        ax.set_title(title or f"{self.method} ({self.mode})")
        colorbar = figure.colorbar(image, ax=ax)
        colorbar.set_label(self.metric)
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure


def _product(labels: Sequence[Sequence[str]]) -> list[str]:
    rows = [""]
    for axis in labels:
        rows = [f"{row} {label}".strip() for row in rows for label in axis]
    return rows


def _number(value: float, precision: int) -> str:
    return f"{value:.{precision}f}" if math.isfinite(value) else str(value)


# -- estimate against exact ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Disagreement:
    """One cell where an estimate and the exact effect differ."""

    cell: str
    estimate: float
    exact: float


@dataclass(frozen=True, slots=True)
class Agreement:
    """How well an estimate (attribution patching) matches exact patching (see `agreement`).

    Attributes:
        pearson: Correlation of the effects.
        spearman: Correlation of their ranks.
        top_k: The ``k`` of ``top_k_overlap``.
        top_k_overlap: The share of the ``k`` cells of largest exact ``|effect|`` that are
            also among the estimate's ``k`` largest.
        disagreements: The cells where the two differ most, largest first.
    """

    pearson: float
    spearman: float
    top_k: int
    top_k_overlap: float
    disagreements: tuple[Disagreement, ...]

    def __str__(self) -> str:
        lines = [
            f"pearson {self.pearson:+.3f}   spearman {self.spearman:+.3f}   "
            f"top-{self.top_k} overlap {self.top_k_overlap:.0%}",
            "largest disagreements (estimate vs exact effect):",
        ]
        width = max((len(d.cell) for d in self.disagreements), default=0)
        lines += [
            f"  {d.cell.ljust(width)}  {d.estimate:+10.4f}  {d.exact:+10.4f}"
            for d in self.disagreements
        ]
        return "\n".join(lines)


def agreement(
    estimate: PatchingResult, exact: PatchingResult, *, top_k: int = 10, worst: int = 5
) -> Agreement:
    """Compare an estimate's effects with exact patching's, cell by cell.

    Both results must cover the same cells (same axes and labels). The effects (``values -
    base``) are compared, averaged over pairs for per-pair results.

    Args:
        estimate: From `attribution_patching`, say.
        exact: From `activation_patching` over the same sites and axes.
        top_k: The ``k`` of the top-k overlap (at most the number of cells).
        worst: How many of the largest disagreements to list.

    Raises:
        SpecError: The results cover different cells.

    Examples:
        >>> import torch
        >>> def result(values):
        ...     return PatchingResult(torch.tensor(values), ("site",), (("a", "b", "c"),),
        ...         torch.tensor(1.0), torch.tensor(0.0), "denoise", "m", "metric")
        >>> report = agreement(result([0.1, 0.5, 0.2]), result([0.0, 0.9, 0.3]), top_k=1)
        >>> round(report.spearman, 3), report.top_k_overlap, report.disagreements[0].cell
        (1.0, 1.0, 'b')
    """
    a, b = estimate.averaged(), exact.averaged()
    if a.axes != b.axes or a.labels != b.labels:
        raise SpecError(
            f"agreement(): the results cover different cells ({a!r} against {b!r}); compare "
            "results over the same sites and axes."
        )
    x = a.effect.detach().double().flatten().cpu()
    y = b.effect.detach().double().flatten().cpu()
    k = max(1, min(top_k, x.numel()))
    top_x = set(x.abs().topk(k).indices.tolist())
    top_y = set(y.abs().topk(k).indices.tolist())
    cells = _product(a.labels)
    order = (x - y).abs().argsort(descending=True)[:worst]
    return Agreement(
        pearson=_pearson(x, y),
        spearman=_pearson(_ranks(x), _ranks(y)),
        top_k=k,
        top_k_overlap=len(top_x & top_y) / k,
        disagreements=tuple(
            Disagreement(cells[i], float(x[i]), float(y[i])) for i in order.tolist()
        ),
    )


def _pearson(x: Tensor, y: Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    scale = float(x.norm() * y.norm())
    return float((x * y).sum()) / scale if scale > 0 else math.nan


def _ranks(x: Tensor) -> Tensor:
    """Ranks with ties given their average rank."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    ranks: Tensor = average[inverse]
    return ranks
