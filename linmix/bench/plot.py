"""Time against sequence length, one line per backend and one panel per mode (log-log)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

PANEL_SIZE = (5.2, 3.8)  # inches per panel
DPI = 120


def plot_times(report: dict, path: str | Path) -> Path:
    """Draw the median time (with its 20-80% band) of every timed backend against T.

    Args:
        report: from ``linmix.bench.run_benchmark``; most useful for a sweep over T ("tsweep", "k2").
        path: the PNG file to write; its folder is created.

    Returns:
        the path.
    """
    rows = [row for row in report["rows"] if row["status"] == "ok"]
    settings = report["settings"]
    modes = settings["modes"]
    figure = Figure(figsize=(PANEL_SIZE[0] * len(modes), PANEL_SIZE[1]), layout="constrained")
    axes = figure.subplots(1, len(modes), squeeze=False)[0]
    figure.suptitle(f"{settings['op']} ({settings['dtype']}, {report['machine']['gpu'] or report['machine']['cpu']})")
    for ax, mode in zip(axes, modes):
        for backend in settings["backends"]:
            points = sorted((row["shape"]["T"], row["median_ms"], row["p20_ms"], row["p80_ms"])
                            for row in rows if row["mode"] == mode and row["backend"] == backend)
            if not points:
                continue
            lengths, medians, low, high = zip(*points)
            style = "--" if _is_baseline(rows, backend) else "-"
            line = ax.plot(lengths, medians, marker="o", linestyle=style, label=backend)
            ax.fill_between(lengths, low, high, color=line[0].get_color(), alpha=0.2)
        ax.set_xscale("log", base=2)
        measured = sorted({row["shape"]["T"] for row in rows if row["mode"] == mode})
        ax.set_xticks(measured, [str(T) for T in measured])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median time (ms)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _is_baseline(rows: list[dict], backend: str) -> bool:
    return any(row["baseline"] for row in rows if row["backend"] == backend)
