"""`PatchingResult`: derived values by hand, the text table, and the heatmap (read back from
the saved image and from the figure object)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hookfn.patching import PatchingResult


def _result(per_pair: bool = False) -> PatchingResult:
    values = torch.tensor([[[1.0, 2.0, 3.0], [0.5, 1.5, 2.5]], [[3.0, 2.0, 1.0], [2.5, 0.5, 1.5]]])
    clean, corrupted = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    result = PatchingResult(
        values,
        ("pair", "site", "position"),
        (("0", "1"), ("h.0", "h.1"), ("0 a", "1 b", "2 c")),
        clean,
        corrupted,
        "denoise",
        "activation patching",
        "logit_diff(3, 5)",
    )
    return result if per_pair else result.averaged()


def test_derived_values_by_hand() -> None:
    per_pair = _result(per_pair=True)
    assert torch.equal(per_pair.to_tensor(), per_pair.values)
    want = (per_pair.values - torch.tensor([1.0, 0.0]).view(2, 1, 1)) / torch.tensor(
        [2.0, 4.0]
    ).view(2, 1, 1)
    torch.testing.assert_close(per_pair.normalized().values, want)
    torch.testing.assert_close(
        per_pair.effect, per_pair.values - torch.tensor([1.0, 0.0]).view(2, 1, 1)
    )
    averaged = per_pair.averaged()
    assert averaged.axes == ("site", "position")
    torch.testing.assert_close(averaged.values, per_pair.values.mean(0))
    torch.testing.assert_close(averaged.normalized().values, (averaged.values - 0.5) / 3.0)
    assert averaged.normalized().clean == 1.0
    noised = PatchingResult(
        averaged.values,
        averaged.axes,
        averaged.labels,
        averaged.clean,
        averaged.corrupted,
        "noise",
        "activation patching",
        "m",
    )
    torch.testing.assert_close(noised.effect, averaged.values - 3.5)


def test_table() -> None:
    assert _result().table(precision=2) == (
        "site  position=0 a  position=1 b  position=2 c\n"
        "h.0           2.00          2.00          2.00\n"
        "h.1           1.50          1.00          2.00"
    )
    lines = str(_result(per_pair=True)).splitlines()
    assert lines[0].split()[:2] == ["pair", "x"]
    assert lines[1].startswith("0 h.0")
    assert len(lines) == 5
    assert "site[2] x position[3]" in repr(_result())


def test_plot_saves_a_labelled_heatmap(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    path = tmp_path / "heatmap.png"
    figure = _result().plot(path)
    image = imread(path)
    width, height = figure.get_size_inches() * 120  # saved at 120 dpi
    assert image.shape[:2] == (round(height), round(width))
    heatmap, colorbar = figure.axes
    assert heatmap.get_xlabel() == "position"
    assert heatmap.get_ylabel() == "site"
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["0 a", "1 b", "2 c"]
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["h.0", "h.1"]
    assert colorbar.get_ylabel() == "logit_diff(3, 5)"
    assert heatmap.get_title() == "activation patching (denoise)"
    # The colour scale is centred on the corrupted baseline: no effect is white.
    low, high = heatmap.images[0].get_clim()
    assert (low + high) / 2 == pytest.approx(0.5)


def test_plot_into_given_axes_and_three_axes() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    values = torch.arange(12.0).reshape(2, 3, 2)
    result = PatchingResult(
        values,
        ("site", "position", "head"),
        (("a", "b"), ("0", "1", "2"), ("H0", "H1")),
        torch.tensor(1.0),
        torch.tensor(0.0),
        "noise",
        "attribution patching",
        "m",
    )
    figure = Figure()
    ax = figure.add_subplot()
    assert result.plot(ax=ax, title="heads") is figure
    assert ax.get_ylabel() == "site x position"
    assert ax.get_xlabel() == "head"
    assert len(ax.get_yticklabels()) == 6
    assert ax.get_title() == "heads"
