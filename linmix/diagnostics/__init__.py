"""Learned-dynamics figures of training runs: learning curves, decay spectra, Kbase use and
structure, and equilibrium refinement (`linmix plot`)."""

from linmix.diagnostics.plots import unique_labels, write_figures
from linmix.diagnostics.runs import Run, RunGroup, load_group, load_run

__all__ = ["Run", "RunGroup", "load_group", "load_run", "unique_labels", "write_figures"]
