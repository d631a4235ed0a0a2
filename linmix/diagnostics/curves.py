"""Learning curves: validation perplexity vs step, mean and min-max band over a group's seeds."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullLocator

from linmix.diagnostics.canvas import new_figure
from linmix.diagnostics.runs import RunGroup

PROTOCOL_KEYS = (("full", "val_ppl_full"), ("random", "val_ppl_random"))
Y_LOW_MARGIN = 0.98
Y_HIGH_FACTOR = 3.0


def curve_protocol(group: RunGroup) -> tuple[str, str] | None:
    """The protocol drawn for a group: full-pass if logged, else random batches.

    Args:
        group: the runs.

    Returns:
        (protocol name, record key), or None when the group logged no validation perplexity.
    """
    return next(((name, key) for name, key in PROTOCOL_KEYS if group.has(key)), None)


def common_unit(groups: Sequence[RunGroup]) -> str | None:
    """The perplexity unit that every evaluation record of the groups' runs states.

    Args:
        groups: the groups drawn.

    Returns:
        The unit ("char", "piece"), or None when the records state several units or some state
        none (runs written before units were recorded).
    """
    units = {record.get("ppl_unit") for group in groups for run in group.runs for record in run.evals}
    return units.pop() if len(units) == 1 else None


def seed_band(group: RunGroup, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max of `key` over the group's runs at every evaluated step.

    A step that only some runs reached (unfinished runs) is averaged over those runs.

    Args:
        group: the runs.
        key: an evaluation record field.

    Returns:
        (steps, mean, min, max), each [S].
    """
    by_step: dict[int, list[float]] = defaultdict(list)
    for run in group.runs:
        for step, value in zip(*run.series(key), strict=True):
            by_step[step].append(value)
    steps = sorted(by_step)
    mean = [statistics.fmean(by_step[s]) for s in steps]
    low = [min(by_step[s]) for s in steps]
    high = [max(by_step[s]) for s in steps]
    return np.array(steps), np.array(mean), np.array(low), np.array(high)


def learning_curves_figure(groups: Sequence[RunGroup], reference: RunGroup | None = None) -> Figure | None:
    """Validation perplexity vs step: one colour per group, the reference dashed.

    The y range runs from just below the best value to the smaller of the first evaluations'
    values and 3x the best, on a log scale, so that the low end stays readable. The y label
    names the perplexity unit when every drawn group's evaluations state the same one.

    Args:
        groups: the groups to draw.
        reference: a group drawn dashed in black (e.g. nanoGPT), or None.

    Returns:
        The figure, or None when no group logged a validation perplexity.
    """
    drawn = [(group, False) for group in groups] + ([(reference, True)] if reference else [])
    drawn = [(group, dashed, curve_protocol(group)) for group, dashed in drawn]
    drawn = [(group, dashed, protocol) for group, dashed, protocol in drawn if protocol]
    if not drawn:
        return None
    figure, (axes,) = new_figure(1, title="Validation perplexity (line: mean over seeds, band: min-max)")
    figure.set_size_inches(8.5, 5.2)
    lows, firsts = [], []
    for index, (group, dashed, (protocol, key)) in enumerate(drawn):
        steps, mean, low, high = seed_band(group, key)
        colour = "black" if dashed else f"C{index}"
        label = f"{group.label} ({protocol}, n={len(group.runs)})" + (" reference" if dashed else "")
        axes.plot(steps, mean, color=colour, linestyle="--" if dashed else "-", label=label)
        if len(group.runs) > 1:
            axes.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
        lows.append(low.min())
        firsts.append(mean[0])
    bottom = min(lows) * Y_LOW_MARGIN
    top = min(max(firsts), Y_HIGH_FACTOR * min(lows))
    if top <= bottom / Y_LOW_MARGIN:
        top = max(firsts) / Y_LOW_MARGIN
    axes.set_yscale("log")
    axes.set_yticks(MaxNLocator(10).tick_values(bottom, top))
    axes.set_ylim(bottom, top)
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("step")
    unit = common_unit([group for group, _, _ in drawn])
    axes.set_ylabel(f"validation perplexity{f' per {unit}' if unit else ''} (log scale)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return figure
