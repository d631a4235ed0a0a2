"""How much each K2 layer uses its base kernel: gate sigma(beta), Kbase norm share and alpha vs step."""

from __future__ import annotations

from matplotlib.figure import Figure

from linmix.diagnostics.canvas import as_array, new_figure
from linmix.diagnostics.runs import RunGroup

PANELS = (
    ("gate", "gate g = σ(β)"),
    ("kbase_share", "Kbase norm share ρ = |gKx| / (|gKx| + |αAx|)"),
    ("alpha", "decay-path scale α"),
)


def kbase_gate_share_figure(group: RunGroup) -> Figure | None:
    """Three panels, one line per K2 layer each: the gate, the Kbase norm share and alpha.

    Args:
        group: the runs; the first that logged a Kbase gate is drawn.

    Returns:
        The figure, or None when no run has a Kbase gate.
    """
    run = next((run for run in group.runs if _has_gate(run.series("gate")[1])), None)
    if run is None:
        return None
    figure, panels = new_figure(len(PANELS), title=f"{group.run_label(run)}: Kbase use per K2 layer")
    for axes, (key, title) in zip(panels, PANELS, strict=True):
        steps, values = run.series(key)
        values = as_array(values)  # [S, layers]
        for layer in range(values.shape[1] if values.ndim == 2 else 0):
            axes.plot(steps, values[:, layer], marker=".", label=f"layer {layer}")
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.ticklabel_format(axis="y", useOffset=False)
        axes.grid(True, alpha=0.3)
    panels[0].legend(fontsize="small", ncols=2)
    return figure


def _has_gate(gates: list) -> bool:
    return any(value is not None for layers in gates for value in layers)
