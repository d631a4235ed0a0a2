"""Figure creation and saving shared by the plots (matplotlib's object API, no pyplot state)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DPI = 120
PANEL_SIZE = (5.2, 3.6)  # inches per panel


def new_figure(panels: int, columns: int = 3, title: str | None = None) -> tuple[Figure, list[Axes]]:
    """A figure with `panels` axes on a grid of at most `columns` columns.

    Args:
        panels: how many axes.
        columns: the most axes per row.
        title: the figure's title.

    Returns:
        (figure, its axes in reading order); grid cells beyond `panels` are hidden.
    """
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in grid[panels:]:
        unused.set_visible(False)
    if title:
        figure.suptitle(title)
    return figure, grid[:panels]


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a figure as PNG.

    Args:
        figure: the figure.
        path: the .png file (its folder must exist).

    Returns:
        `path`.
    """
    figure.savefig(path, dpi=DPI)
    return path


def file_slug(label: str) -> str:
    """A file-name-safe form of a group label ("runs/lr 1e-2" -> "runs_lr_1e-2")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def as_array(values: list) -> np.ndarray:
    """Nested lists of numbers, with None as NaN, as a float array."""
    return np.array(values, dtype=object).astype(float) if values else np.zeros(0)
