"""docs/gallery.py draws the figures of docs/gallery.md: each is a real image, labelled as the
page says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread

ROOT = Path(__file__).resolve().parent.parent


def _gallery():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gallery", ROOT / "docs" / "gallery.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_figures_are_regenerated_with_the_labels_the_page_names(tmp_path: Path) -> None:
    gallery = _gallery()
    figures = gallery.make_figures(tmp_path)
    page = (ROOT / "docs" / "gallery.md").read_text()
    assert set(figures) == set(gallery.LABELS)
    for name, figure in figures.items():
        assert f"]({name})" in page, name  # the page shows it
        assert (ROOT / "docs" / name).is_file(), name  # and it is checked in
        image = imread(tmp_path / name)
        height, width = image.shape[:2]
        assert 300 <= width <= 1200, (name, width)
        assert 300 <= height <= 1200, (name, height)
        assert image[..., :3].std() > 0.05, name  # not a blank image
        axes = figure.axes[0]
        labels = gallery.LABELS[name]
        assert axes.get_title() == labels["title"]
        assert axes.get_xlabel() == labels["xlabel"]
        assert axes.get_ylabel() == labels["ylabel"]
        for text in labels.values():  # the page names them
            assert re.search(rf"\*{re.escape(text)}\*", page), (name, text)
