"""Equilibrium refinement: the step size eta and the loop delta |F(h) - h| / |h| vs step."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from linmix.diagnostics.canvas import as_array, new_figure
from linmix.diagnostics.runs import Run, RunGroup


def eta_refinement_figure(labelled_runs: Sequence[tuple[str, Run]], title: str) -> Figure | None:
    """eta vs step and the refinement loop deltas vs step, one line per run (per refinement step).

    Args:
        labelled_runs: (legend label, run) pairs; runs without refinement are left out.
        title: the figure's title.

    Returns:
        The figure, or None when no run has refinement.
    """
    labelled_runs = [(label, run) for label, run in labelled_runs if run.has("refine_delta")]
    if not labelled_runs:
        return None
    figure, (eta_axes, delta_axes) = new_figure(2, title=title)
    for index, (label, run) in enumerate(labelled_runs):
        colour = f"C{index}"
        eta_axes.plot(*run.series("eta"), marker=".", color=colour, label=label)
        steps, deltas = run.series("refine_delta")
        deltas = as_array(deltas)  # [S, refinement steps]
        for k in range(deltas.shape[1]):
            suffix = f", step {k + 1}" if deltas.shape[1] > 1 else ""
            delta_axes.plot(steps, deltas[:, k], marker=".", color=colour, alpha=1.0 / (k + 1),
                            label=label + suffix)
    eta_axes.set_title("refinement step size η")
    eta_axes.set_ylabel("η")
    eta_axes.ticklabel_format(axis="y", useOffset=False)
    delta_axes.set_title("evaluation loop delta |F(h) - h| / |h|")
    delta_axes.set_yscale("log")
    for axes in (eta_axes, delta_axes):
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def group_eta_refinement_figure(group: RunGroup) -> Figure | None:
    """`eta_refinement_figure` of one group's runs, each labelled by its folder name.

    Args:
        group: the runs.

    Returns:
        The figure, or None when no run of the group has refinement.
    """
    return eta_refinement_figure([(run.name, run) for run in group.runs], f"{group.label}: equilibrium refinement")
