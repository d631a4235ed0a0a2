"""Benchmark figures: time against sequence length, one line per backend and one panel per mode
(log-log); and decoding latency and memory against generated tokens, one line per model."""

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
    machine = report["machine"]
    figure.suptitle(f"{settings['title']} ({settings['dtype']}, {machine['gpu'] or machine['cpu']})")
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


def plot_decode(report: dict, path: str | Path) -> Path:
    """Draw ms/token (median with its 20-80% band) and memory of every model against generated tokens.

    Args:
        report: from ``linmix.bench.decode.run_decode``.
        path: the PNG file to write; its folder is created.

    Returns:
        the path.
    """
    settings, machine = report["settings"], report["machine"]
    figure = Figure(figsize=(PANEL_SIZE[0] * 2, PANEL_SIZE[1]), layout="constrained")
    latency_ax, memory_ax = figure.subplots(1, 2)
    figure.suptitle(f"decoding ({settings['dtype']}, batch {settings['batch_size']}, "
                    f"{machine['gpu'] or machine['cpu']})")
    for model in report["models"]:
        rows = [row for row in report["rows"] if row["model"] == model["name"]]
        tokens = [row["tokens"] for row in rows]
        style = "--" if model["role"] == "baseline" else "-"
        line = latency_ax.plot(tokens, [row["median_ms"] for row in rows], marker="o", linestyle=style,
                               label=model["name"])
        color = line[0].get_color()
        latency_ax.fill_between(tokens, [row["p20_ms"] for row in rows], [row["p80_ms"] for row in rows],
                                color=color, alpha=0.2)
        memory_ax.plot(tokens, [row["state_bytes"] / 2**20 for row in rows], marker="o", linestyle=style,
                       color=color, label=f"{model['name']} state")
        if rows[0]["allocated_bytes"] is not None:
            memory_ax.plot(tokens, [row["allocated_bytes"] / 2**20 for row in rows], marker="x", linestyle=":",
                           color=color, label=f"{model['name']} allocated")
    measured = settings["checkpoints"]
    for ax, label in ((latency_ax, "median ms / token"), (memory_ax, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(measured, [str(n) for n in measured])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("generated tokens")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend()
    latency_ax.set_ylim(bottom=0)
    latency_ax.set_title("per-token latency")
    memory_ax.set_yscale("log")
    on_cuda = report["rows"][0]["allocated_bytes"] is not None
    memory_ax.set_title("decoding state and CUDA allocated" if on_cuda else "decoding state")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _is_baseline(rows: list[dict], backend: str) -> bool:
    return any(row["baseline"] for row in rows if row["backend"] == backend)
