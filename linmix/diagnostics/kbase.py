"""The learned base kernel, read from a run's best.pt: heatmaps, lag profile and row sums."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from linmix.diagnostics.canvas import new_figure
from linmix.diagnostics.runs import RunGroup
from linmix.layers.kbase import BaseKernel
from linmix.models import build_from_spec
from linmix.train.checkpoint import load_checkpoint

HEATMAP_CORNER = 64
MAX_LAG = 32


def kernel_matrix(kernel: BaseKernel, size: int) -> torch.Tensor:
    """The causal mixing matrix a kernel applies to a sequence of `size` positions.

    Args:
        kernel: a dense or Toeplitz base kernel.
        size: the number of positions (at most W for the dense form).

    Returns:
        [size, size], lower triangular: K[t, s] is the weight of position s in output t.
    """
    weight = kernel.weight.detach().float()
    if kernel.form == "dense":
        return torch.tril(weight[:size, :size])
    positions = torch.arange(size)
    lag = positions[:, None] - positions[None, :]  # [size, size]
    inside = (lag >= 0) & (lag < kernel.size)
    return torch.where(inside, weight[lag.clamp(0, kernel.size - 1)], torch.zeros(()))


def load_model(checkpoint: Path) -> tuple[torch.nn.Module, int] | None:
    """Rebuild the model stored in a checkpoint written by `linmix train`.

    Args:
        checkpoint: a best.pt or last.pt.

    Returns:
        (model in eval mode, the checkpoint's step), or None when the checkpoint's meta does not
        describe its model.
    """
    state = load_checkpoint(checkpoint, map_location="cpu")
    spec = state.get("meta", {}).get("model")
    if spec is None:
        return None
    model = build_from_spec(spec)
    model.load_state_dict(state["model"])
    return model.eval(), state["step"]


def _distinct_kernels(mixers: list) -> list[tuple[str, BaseKernel, float]]:
    """(label, kernel, init decay) per distinct kernel: one shared, or one per layer."""
    layers_of: dict[int, list[int]] = {}
    for layer, mixer in enumerate(mixers):
        layers_of.setdefault(id(mixer.kernel), []).append(layer)
    shared = len(layers_of) == 1 and len(mixers) > 1
    kernels = []
    for layers in layers_of.values():
        mixer = mixers[layers[0]]
        label = f"shared (layers {layers[0]}-{layers[-1]})" if shared else f"layer {layers[0]}"
        kernels.append((label, mixer.kernel, mixer.config.kbase_init_decay))
    return kernels


def _heatmap(figure: Figure, axes: Axes, matrix: torch.Tensor, title: str) -> None:
    limit = float(matrix.abs().max()) or 1.0
    image = axes.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.85)
    axes.set_title(title, fontsize="medium")
    axes.set_xlabel("source position s")
    axes.set_ylabel("output position t")


def kbase_structure_figure(group: RunGroup) -> Figure | None:
    """Heatmaps of g * tril(Kbase) (first 64 x 64 and the full window), the lag profile
    mean_t K[t, t - lag] against the exponential initialisation, and the row sums vs t.

    Args:
        group: the runs; the first one with a best.pt is drawn.

    Returns:
        The figure, or None when there is no best.pt or its model has no base kernel.
    """
    run = next((run for run in group.runs if run.best_checkpoint), None)
    loaded = load_model(run.best_checkpoint) if run else None
    mixers = [block.mixer for block in getattr(loaded[0], "k2_blocks", [])] if loaded else []
    if not mixers or getattr(mixers[0], "kernel", None) is None:
        return None
    model, step = loaded
    window = int(model.config.context_length)
    if mixers[0].kernel.form == "dense":
        window = min(window, mixers[0].kernel.size)
    kernels = _distinct_kernels(mixers)
    figure, (corner, full, profile, rows) = new_figure(
        4, columns=2, title=f"{group.run_label(run)}: learned Kbase at step {step} (best.pt)"
    )
    gate = float(mixers[0].gate().detach())
    whose = "shared kernel, layer 0's gate" if kernels[0][0].startswith("shared") else "layer 0"
    gated = gate * kernel_matrix(mixers[0].kernel, window)
    size = min(HEATMAP_CORNER, window)
    _heatmap(figure, corner, gated[:size, :size], f"g·tril(K), first {size}×{size} ({whose}, g = {gate:.3f})")
    _heatmap(figure, full, gated, f"g·tril(K), full {window}×{window} ({whose})")

    lags = np.arange(MAX_LAG + 1)
    for index, (label, kernel, decay) in enumerate(kernels):
        colour = f"C{index}"
        initial = BaseKernel(kernel.form, kernel.size, decay)
        profile.plot(lags, kernel.lag_profile(MAX_LAG).numpy(), marker=".", color=colour, label=label)
        rows.plot(kernel_matrix(kernel, window).sum(dim=1).numpy(), color=colour, label=label)
        if index == 0:
            profile.plot(lags, initial.lag_profile(MAX_LAG).numpy(), "k--",
                         label=f"init exp(-{decay:g} lag), normalised")
            rows.plot(kernel_matrix(initial, window).sum(dim=1).numpy(), "k--", label="init")
    profile.axhline(0.0, color="grey", linewidth=0.8)
    profile.set_title("lag profile mean_t K[t, t-lag] (without the gate)", fontsize="medium")
    profile.set_xlabel("lag")
    rows.set_title("row sums Σ_s K[t, s] (without the gate)", fontsize="medium")
    rows.set_xlabel("position t")
    for axes in (profile, rows):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small", ncols=2)
    return figure
