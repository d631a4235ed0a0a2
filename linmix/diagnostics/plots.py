"""Every figure of `linmix plot`, written as PNG files (spec/k_operators.md section 5)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from matplotlib.figure import Figure

from linmix.diagnostics.canvas import file_slug, save_figure
from linmix.diagnostics.curves import learning_curves_figure
from linmix.diagnostics.gamma import gamma_spectrum_figure, gamma_trajectory_figure
from linmix.diagnostics.gates import kbase_gate_share_figure
from linmix.diagnostics.kbase import kbase_structure_figure
from linmix.diagnostics.refinement import eta_refinement_figure, group_eta_refinement_figure
from linmix.diagnostics.runs import RunGroup

GROUP_FIGURES: tuple[tuple[str, Callable[[RunGroup], Figure | None]], ...] = (
    ("gamma_spectrum", gamma_spectrum_figure),
    ("gamma_trajectory", gamma_trajectory_figure),
    ("kbase_gate_share", kbase_gate_share_figure),
    ("kbase_structure", kbase_structure_figure),
    ("eta_refinement", group_eta_refinement_figure),
)


def unique_labels(groups: Sequence[RunGroup]) -> list[RunGroup]:
    """The groups, where labels repeat (two runs both called seed-42) prefixed by their parent folder.

    Args:
        groups: groups labelled by their folder names.

    Returns:
        Copies with distinct labels where the parent folder tells them apart.
    """
    counts = Counter(group.label for group in groups)
    return [
        replace(group, label=f"{group.runs[0].folder.resolve().parent.name}/{group.label}")
        if counts[group.label] > 1 and len(group.runs) == 1 else group
        for group in groups
    ]


def write_figures(
    groups: Sequence[RunGroup], out_dir: str | os.PathLike, reference: RunGroup | None = None
) -> list[Path]:
    """Write every figure the runs have data for.

    `learning_curves.png` holds all groups (and the reference, dashed); each group then gets
    `gamma_spectrum_`, `gamma_trajectory_`, `kbase_gate_share_`, `kbase_structure_` and
    `eta_refinement_<label>.png` where it logged what they show. When several groups used
    refinement, `eta_refinement_comparison.png` draws all their runs together (e.g. two LRs).

    Args:
        groups: the runs and sweeps.
        out_dir: the folder for the PNG files (created if needed).
        reference: a group drawn only as a dashed learning curve (e.g. nanoGPT), or None.

    Returns:
        The files written, in order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = unique_labels(groups)
    figures: list[tuple[str, Callable[[], Figure | None]]] = [
        ("learning_curves.png", lambda: learning_curves_figure(groups, reference))
    ]
    for group in groups:
        for stem, build in GROUP_FIGURES:
            figures.append((f"{stem}_{file_slug(group.label)}.png", lambda build=build, group=group: build(group)))
    refined = [group for group in groups if group.has("refine_delta")]
    if len(refined) > 1:
        labelled = [(group.run_label(run), run) for group in refined for run in group.runs]
        figures.append(("eta_refinement_comparison.png",
                        lambda: eta_refinement_figure(labelled, "Equilibrium refinement across runs")))
    written = []
    for name, build in figures:
        figure = build()
        if figure is not None:
            written.append(save_figure(figure, out_dir / name))
    return written
