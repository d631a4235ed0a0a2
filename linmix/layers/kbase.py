"""The K-Operators base kernel (Kbase): a learned causal mixing along the sequence.

Two forms share one module:

* ``dense``: a position-indexed ``[W, W]`` matrix (the papers' Kbase), used through its lower
  triangle and cropped to the top-left ``T x T`` block; O(T^2).
* ``toeplitz``: an ``[L]`` filter over lags ``0..L-1`` shared by all channels; O(T * L).

Both start as a causal exponential smoother ``exp(-decay * lag)`` normalised to sum to 1 per row.
"""

import math

import torch
from torch import nn

from linmix.ops import causal_kernel, causal_kernel_step


def exponential_smoother(window: int, decay: float = 0.15) -> torch.Tensor:
    """Row-normalised causal exponential smoother `K0[t, s] = exp(-decay (t - s))`, s <= t. [W, W]."""
    pos = torch.arange(window, dtype=torch.float64)
    lag = pos[:, None] - pos[None, :]  # [W, W]
    weights = torch.where(lag >= 0, torch.exp(-decay * lag.clamp(min=0)), torch.zeros(()))
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def exponential_taps(taps: int, decay: float = 0.15) -> torch.Tensor:
    """Normalised causal filter `exp(-decay * lag)` over lags 0..taps-1. [L]."""
    weights = torch.exp(-decay * torch.arange(taps, dtype=torch.float64))
    return (weights / weights.sum()).float()


class BaseKernel(nn.Module):
    """Holds the Kbase parameter; one instance may be shared by several K2 layers.

    Args:
        form: "dense" (position-indexed [W, W]) or "toeplitz" ([L] lags).
        size: W for dense, L (number of taps) for toeplitz.
        init_decay: decay of the exponential smoother used at initialisation.
    """

    def __init__(self, form: str, size: int, init_decay: float = 0.15):
        super().__init__()
        if form not in ("dense", "toeplitz"):
            raise ValueError(f"form must be 'dense' or 'toeplitz', got {form!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.form = form
        init = exponential_smoother(size, init_decay) if form == "dense" else exponential_taps(size, init_decay)
        self.weight = nn.Parameter(init)

    @property
    def size(self) -> int:
        """W for the dense form, L for the Toeplitz form."""
        return self.weight.shape[0]

    def init_state(self, batch_size: int, dim: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The state before position 0: no input (dense) or ``L - 1`` zeros (Toeplitz), ``[B, P, d]``.

        It is float32 (float64 for a float64 model), as ``causal_kernel`` keeps its states.
        """
        past = 0 if self.form == "dense" else self.size - 1
        return torch.zeros(batch_size, past, dim, device=device, dtype=torch.promote_types(dtype, torch.float32))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the kernel: x [B, T, d] -> (y [B, T, d], state).

        Without a state the sequence starts at position 0 and no state is returned; with one (the
        inputs the kernel still reads, see ``causal_kernel``) it continues and the new state is returned.
        """
        return causal_kernel(x, self.weight.to(x.dtype), form=self.form, initial_state=state,
                             output_final_state=state is not None)

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding position: x_t [B, d] -> (y_t [B, d], state)."""
        return causal_kernel_step(x_t, self.weight, state, form=self.form)

    def lag_profile(self, max_lag: int) -> torch.Tensor:
        """Mean kernel weight at each lag 0..max_lag (dense: mean over rows of the diagonal)."""
        weight = self.weight.detach().float()
        if self.form == "toeplitz":
            profile = torch.zeros(max_lag + 1)
            n = min(max_lag + 1, weight.shape[0])
            profile[:n] = weight[:n]
            return profile
        lags = min(max_lag, weight.shape[0] - 1) + 1
        profile = [torch.diagonal(weight, offset=-lag).mean() for lag in range(lags)]
        return torch.stack(profile + [torch.tensor(math.nan)] * (max_lag + 1 - lags))
