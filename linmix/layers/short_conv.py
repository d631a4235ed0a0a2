"""Short causal depthwise convolution with a decoding cache (the q/k/v convolutions of the delta-rule mixers).

Per channel c, ``y_t[c] = act(sum_{j < W} w[c, j] x_{t - W + 1 + j}[c])`` with zeros before position 0:
fla's ``ShortConvolution`` without a bias. The cache holds the last ``W - 1`` inputs, so a step
costs O(W * C) whatever the position.
"""

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"silu": F.silu, "identity": lambda x: x}


class ShortConv(nn.Module):
    """Causal depthwise convolution of width ``kernel_size`` over ``channels``, then an activation.

    Args:
        channels: C, the number of channels (each has its own filter).
        kernel_size: W, the filter length (lags 0..W-1).
        activation: "silu" (the delta-rule mixers') or "identity".
        init_std: the filter's N(0, init_std^2) initialisation (fla's model-level init of Conv1d).
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str = "silu", init_std: float = 0.02):
        super().__init__()
        if channels < 1 or kernel_size < 1:
            raise ValueError(f"channels and kernel_size must be >= 1, got {channels} and {kernel_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(channels, kernel_size) * init_std)  # [C, W], lag W-1-j at j

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[1]

    def init_cache(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The cache before position 0: ``W - 1`` zero inputs. [B, W-1, C]"""
        return torch.zeros(batch_size, self.kernel_size - 1, self.weight.shape[0], device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, C] -> (y [B, T, C], cache).

        Without a cache the sequence starts at position 0 and no cache is returned; with one (the
        ``W - 1`` inputs before x) the new cache (the last ``W - 1`` inputs) is returned.
        """
        batch, length, channels = x.shape
        past = x.new_zeros(batch, self.kernel_size - 1, channels) if cache is None else cache.to(x.dtype)
        padded = torch.cat([past, x], dim=1)  # [B, W-1+T, C]
        y = F.conv1d(padded.transpose(1, 2), self.weight.to(x.dtype)[:, None], groups=channels).transpose(1, 2)
        new_cache = None if cache is None else padded[:, length:]
        return ACTIVATIONS[self.activation](y), new_cache

    def step(self, x_t: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One position: x_t [B, C] -> (y_t [B, C], cache [B, W-1, C])."""
        window = torch.cat([cache.to(x_t.dtype), x_t[:, None]], dim=1)  # [B, W, C]
        y_t = torch.einsum("bwc,cw->bc", window, self.weight.to(x_t.dtype))
        return ACTIVATIONS[self.activation](y_t), window[:, 1:]
