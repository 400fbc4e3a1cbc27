"""What a saved plot shows: the figure behind each PNG (its curves and images), and its pixels.

A plot test that only checks that a PNG exists passes for an empty axes, a curve of the wrong
column or a figure saved before anything was drawn. ``capture_figures`` keeps every matplotlib
figure a report saves, by file name, so a test can compare the plotted numbers with the data;
``assert_drawn`` decodes the file and checks that it is not one flat colour.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
from matplotlib.figure import Figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def capture_figures(monkeypatch) -> dict[str, Figure]:
    """From now on (for this test), every ``Figure.savefig`` also lands in the returned dict,
    keyed by the file's name; the file is written as usual."""
    saved: dict[str, Figure] = {}
    real_savefig = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved[Path(fname).name] = self
        return real_savefig(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def curves(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{label: (x, y)}`` of an axes' labelled lines (matplotlib's own ``_child`` lines left out)."""
    return {line.get_label(): (np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float))
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def assert_curve(ax, label: str, x, y) -> None:
    """The axes holds a line ``label`` through exactly the points (x, y)."""
    found = curves(ax)
    assert label in found, f"no curve {label!r} in {ax.get_title()!r}; curves: {sorted(found)}"
    got_x, got_y = found[label]
    np.testing.assert_array_equal(got_x, np.asarray(x, dtype=float), err_msg=f"{label}: steps")
    np.testing.assert_allclose(got_y, np.asarray(y, dtype=float), rtol=1e-12, atol=1e-12, err_msg=f"{label}: values")


def band_range(ax, index: int) -> tuple[float, float]:
    """(lowest, highest) y of the ``index``-th filled band (``fill_between``) of an axes."""
    vertices = ax.collections[index].get_paths()[0].vertices
    return float(vertices[:, 1].min()), float(vertices[:, 1].max())


def assert_drawn(path: Path) -> None:
    """A decodable PNG of a real size whose pixels are not all one colour."""
    path = Path(path)
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 100, f"{path}: {pixels.shape} is no plot"
    assert pixels[..., :3].std() > 0, f"{path} is one flat colour"
