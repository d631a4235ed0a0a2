"""The decay spectrum of the K2 layers: final gamma per channel as memory lengths, and its trajectory."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from linmix.diagnostics.canvas import as_array, new_figure
from linmix.diagnostics.runs import RunGroup

REFERENCE_GAMMAS = (0.15, 0.995)  # the gamma range of the paper-2 configs (spec section 6, item 1)
GAMMA_CEILING = 1.0 - 1e-6  # gamma = 1 (v1's upper bound) would be an infinite memory length
TAU_LABEL = "memory length τ = 1/(1-γ)"


def memory_length(gamma: np.ndarray | float) -> np.ndarray:
    """tau = 1 / (1 - gamma), the number of tokens a decay gamma remembers.

    Args:
        gamma: decays in [0, 1].

    Returns:
        tau, with gamma clipped just below 1 so that tau stays finite.
    """
    return 1.0 / (1.0 - np.minimum(np.asarray(gamma, dtype=float), GAMMA_CEILING))


def _mark_reference_gammas(axes: Axes, vertical: bool) -> None:
    for gamma in REFERENCE_GAMMAS:
        tau = float(memory_length(gamma))
        line = axes.axvline if vertical else axes.axhline
        line(tau, color="grey", linestyle="--", linewidth=1, label=f"γ = {gamma} (τ = {tau:.3g})")


def gamma_spectrum_figure(group: RunGroup) -> Figure | None:
    """One panel per K2 layer: each run's final gamma_j as memory lengths, one row per run.

    Args:
        group: the runs; those that logged "gamma" are drawn.

    Returns:
        The figure, or None when no run logged gamma.
    """
    finals = []
    for run in group.runs:
        steps, gammas = run.series("gamma")
        if steps:
            finals.append((run.name, steps[-1], as_array(gammas[-1])))  # [layers, r]
    if not finals:
        return None
    layers = max(len(gammas) for _, _, gammas in finals)
    last_steps = sorted({step for _, step, _ in finals})
    at = f"step {last_steps[0]}" if len(last_steps) == 1 else "the last evaluation of each run"
    figure, panels = new_figure(layers, title=f"{group.label}: decay spectrum at {at}")
    for layer, axes in enumerate(panels):
        for row, (_, _, gammas) in enumerate(finals):
            if layer < len(gammas):
                taus = np.sort(memory_length(gammas[layer]))
                axes.scatter(taus, np.full_like(taus, row), marker="|", s=200, color=f"C{row}")
        _mark_reference_gammas(axes, vertical=True)
        axes.set_xscale("log")
        axes.set_yticks(range(len(finals)), [name for name, _, _ in finals])
        axes.set_ylim(-0.6, len(finals) - 0.4)
        axes.set_xlabel(TAU_LABEL)
        axes.set_title(f"K2 layer {layer}")
        axes.grid(True, axis="x", alpha=0.3)
    panels[0].legend(fontsize="small", loc="upper center")
    return figure


def gamma_trajectory_figure(group: RunGroup) -> Figure | None:
    """The first run's gamma_j over steps for layer 0, and per-layer min/mean/max bands.

    Args:
        group: the runs; the first that logged "gamma" is drawn.

    Returns:
        The figure, or None when no run logged gamma.
    """
    run = next((run for run in group.runs if run.has("gamma")), None)
    if run is None:
        return None
    steps, gammas = run.series("gamma")
    gammas = as_array(gammas)  # [S, layers, r]
    figure, (channels, bands) = new_figure(2, title=f"{group.run_label(run)}: decay trajectories")
    layer0 = gammas[:, 0, :]
    order = np.argsort(layer0[-1])
    shades = colormaps["viridis"](np.linspace(0.0, 0.9, len(order)))
    for shade, channel in zip(shades, order, strict=True):
        channels.plot(steps, memory_length(layer0[:, channel]), linewidth=0.8, color=shade)
    channels.set_title(f"K2 layer 0: {layer0.shape[1]} channels (colour: final rank)")
    for layer in range(gammas.shape[1]):
        colour = f"C{layer}"
        bands.plot(steps, memory_length(gammas[:, layer].mean(axis=1)), color=colour, label=f"layer {layer}")
        bands.fill_between(steps, memory_length(gammas[:, layer].min(axis=1)),
                           memory_length(gammas[:, layer].max(axis=1)), color=colour, alpha=0.15, linewidth=0)
    bands.set_title("per layer: mean γ (line), min-max γ (band)")
    for axes in (channels, bands):
        _mark_reference_gammas(axes, vertical=False)
        axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel(TAU_LABEL)
        axes.grid(True, alpha=0.3)
    bands.legend(fontsize="small", ncols=2)
    return figure
