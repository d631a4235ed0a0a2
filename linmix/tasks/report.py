"""Tables and plots of a synthetic-task sweep folder.

A *group* is one (task, cell, model, d_model): its runs differ in lr and seed. For each lr the
seeds' accuracies are averaged; the group's row reports the lr with the best mean and the seeds'
spread at it (zoology reports the best accuracy over learning rates). Files written to the folder:

* `summary.md`: the table of groups, then, where a cell has several test segments (zoology's
  whole protocol, length extrapolation), the accuracy on each segment.
* `summary.json`: the same rows.
* `<task>_acc_vs_d_model.png`: accuracy against width, one panel per cell, one line per model.
* `<task>_acc_vs_<axis>.png` for each axis of the task's cells (MQAR: T and kv): accuracy
  against that axis, one panel per value of the other axes, one line per model and width.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from linmix.tasks.runner import finished_results

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"


def _spread(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarize(results: list[dict]) -> dict:
    """Group the runs and pick each group's best lr.

    Args:
        results: finished runs' results.

    Returns:
        {"rows": one per group (task, cell, model, d_model, params, lr (the best), lrs (tried),
        accuracy {n, mean, std, min, max} over seeds at the best lr, solved (seeds at the target),
        steps and wall_s (means at the best lr), segments {label: {"axes", "mean", "min", "max"}})}.
    """
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        key = (result["task"], result["cell"], result["model"], result["d_model"])
        groups[key][result["lr"]].append(result)
    rows = []
    for (task, cell, model, d_model), by_lr in groups.items():
        means = {lr: statistics.fmean(r["accuracy"] for r in runs) for lr, runs in by_lr.items()}
        best_lr = max(sorted(means), key=lambda lr: means[lr])
        runs = sorted(by_lr[best_lr], key=lambda r: r["seed"])
        segments = {}
        for index, segment in enumerate(runs[0]["test"]):
            values = [r["test"][index]["accuracy"] for r in runs]
            segments[segment["label"]] = {"axes": segment["axes"], "primary": segment["primary"],
                                          "mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        rows.append({
            "task": task, "cell": cell, "model": model, "d_model": d_model, "params": runs[0]["params"],
            "lr": best_lr, "lrs": sorted(by_lr), "seeds": [r["seed"] for r in runs],
            "accuracy": _spread([r["accuracy"] for r in runs]),
            "solved": sum(r["stopped"] == "target" for r in runs),
            "steps": statistics.fmean(r["steps"] for r in runs),
            "wall_s": statistics.fmean(r["wall_s"] for r in runs),
            "segments": segments,
        })
    rows.sort(key=lambda row: (row["task"], row["cell"], row["model"], row["d_model"]))
    return {"rows": rows}


def _accuracy_cell(spread: dict) -> str:
    text = f"{spread['mean']:.4f}"
    if spread["std"] is not None:
        text += f" ± {spread['std']:.4f} (min {spread['min']:.4f}, max {spread['max']:.4f})"
    return text


def summary_markdown(summary: dict) -> str:
    """The summary as Markdown tables.

    Args:
        summary: as `summarize` returns it.

    Returns:
        The text.
    """
    lines = ["# Synthetic tasks", "",
             "Accuracy on the held-out test set at the best learning rate (mean over seeds ± sample std).", "",
             "| task | cell | model | d_model | params | best lr (of) | seeds | accuracy | solved | steps | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(
            f"| {row['task']} | {row['cell']} | {row['model']} | {row['d_model']} | {row['params']:,} | "
            f"{row['lr']:g} ({len(row['lrs'])}) | {len(row['seeds'])} | {_accuracy_cell(row['accuracy'])} | "
            f"{row['solved']}/{len(row['seeds'])} | {row['steps']:.0f} | {row['wall_s']:.1f} |"
        )
    multi = [row for row in summary["rows"] if len(row["segments"]) > 1]
    for task in dict.fromkeys(row["task"] for row in multi):
        rows = [row for row in multi if row["task"] == task]
        axes = {label: tuple(s["axes"].values()) for row in rows for label, s in row["segments"].items()}
        labels = sorted(axes, key=axes.get)
        lines += ["", f"## {task}: accuracy per test segment",
                  "", "Mean over seeds at the best lr; * marks the segments the run's accuracy is taken over.",
                  "", "| cell | model | d_model | " + " | ".join(labels) + " |",
                  "|---|---|---|" + "---|" * len(labels)]
        for row in rows:
            cells = []
            for label in labels:
                segment = row["segments"].get(label)
                cells.append("-" if segment is None else f"{segment['mean']:.4f}{'*' if segment['primary'] else ''}")
            lines.append(f"| {row['cell']} | {row['model']} | {row['d_model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _log2_axis(ax, values: list) -> None:
    """A base-2 log x axis with a labelled tick at each value."""
    ticks = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.minorticks_off()


def _plot_d_model(rows: list[dict], task: str, path: Path) -> Path:
    from linmix.diagnostics.canvas import new_figure, save_figure

    cells = list(dict.fromkeys(row["cell"] for row in rows))
    figure, axes = new_figure(len(cells), title=f"{task}: accuracy vs d_model (best lr, min-max over seeds)")
    for ax, cell in zip(axes, cells):
        for model in dict.fromkeys(row["model"] for row in rows if row["cell"] == cell):
            points = sorted((row["d_model"], row["accuracy"]) for row in rows
                            if row["cell"] == cell and row["model"] == model)
            x = [d for d, _ in points]
            mean = [a["mean"] for _, a in points]
            err = [[a["mean"] - a["min"] for _, a in points], [a["max"] - a["mean"] for _, a in points]]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=model)
        _log2_axis(ax, [row["d_model"] for row in rows if row["cell"] == cell])
        ax.set_xlabel("d_model")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"cell {cell}")
        ax.legend(fontsize="small")
    return save_figure(figure, path)


def _plot_axis(rows: list[dict], task: str, axis: str, path: Path) -> Path | None:
    """Accuracy against one axis of the test segments: panels by the other axes' values, lines by
    (model, d_model, training): "on the cell" for runs tested on their own cell, else the cell trained on."""
    points: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for row in rows:
        trained = "on the cell" if len(row["segments"]) == 1 else f"trained on {row['cell']}"
        for segment in row["segments"].values():
            if axis not in segment["axes"]:
                continue
            others = tuple((k, v) for k, v in segment["axes"].items() if k != axis)
            line = (row["model"], row["d_model"], trained)
            points[others].setdefault(line, {})[segment["axes"][axis]] = segment["mean"]
    if not points:
        return None
    from linmix.diagnostics.canvas import new_figure, save_figure

    panels = sorted(points)
    figure, axes = new_figure(len(panels), title=f"{task}: accuracy vs {axis} (best lr, mean over seeds)")
    for ax, others in zip(axes, panels):
        for (model, d_model, trained), values in points[others].items():
            x = sorted(values)
            ax.plot(x, [values[v] for v in x], marker="o", label=f"{model} d={d_model} ({trained})")
        _log2_axis(ax, [x for values in points[others].values() for x in values])
        ax.set_xlabel(axis)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(", ".join(f"{k}={v}" for k, v in others) or task)
        ax.legend(fontsize="x-small")
    return save_figure(figure, path)


def write_report(out_dir: str | Path) -> list[Path]:
    """Write summary.md, summary.json and the plots of the finished runs in a sweep folder.

    Args:
        out_dir: the sweep folder.

    Returns:
        The files written (none when no run has finished).
    """
    out_dir = Path(out_dir)
    results = list(finished_results(out_dir).values())
    if not results:
        return []
    summary = summarize(results)
    written = [out_dir / SUMMARY_MD, out_dir / SUMMARY_JSON]
    written[0].write_text(summary_markdown(summary), encoding="utf-8")
    written[1].write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    for task in dict.fromkeys(row["task"] for row in summary["rows"]):
        rows = [row for row in summary["rows"] if row["task"] == task]
        written.append(_plot_d_model(rows, task, out_dir / f"{task}_acc_vs_d_model.png"))
        axes = dict.fromkeys(axis for row in rows for s in row["segments"].values() for axis in s["axes"])
        for axis in axes:
            path = _plot_axis(rows, task, axis, out_dir / f"{task}_acc_vs_{axis}.png")
            if path is not None:
                written.append(path)
    return written
