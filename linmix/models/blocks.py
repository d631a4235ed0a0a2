"""Residual blocks shared by the backbones: pre-norm mixer + pre-norm MLP."""

import torch
from torch import nn

from linmix.layers.base import Mixer
from linmix.layers.mlp import MLP
from linmix.layers.norms import make_norm


class PointwiseLinear(Mixer):
    """A stateless position-wise Linear(d -> d) that follows the mixer contract (the K1 "mixer")."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=bias)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """A position-wise map keeps no state."""
        return None

    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        """x [B, T, d] -> (y [B, T, d], None)."""
        return self.linear(x), None

    def step(self, x_t: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        """x_t [B, d] -> (y_t [B, d], None)."""
        return self.linear(x_t), None


class Block(nn.Module):
    """h <- h + Dropout(mixer(norm_1(h)));  h <- h + Dropout(MLP(norm_2(h))).

    Args:
        dim: model width d.
        mixer: a ``Mixer`` (forward/step/init_state).
        mlp_hidden: hidden width of the MLP.
        norm: "rmsnorm" or "layernorm".
        bias: biases in the MLP and the norms.
        mixer_dropout: dropout on the mixer branch output.
        mlp_dropout: dropout on the MLP branch output.
        mlp_hidden_dropout: dropout after the MLP's GELU.
    """

    def __init__(
        self,
        dim: int,
        mixer: Mixer,
        mlp_hidden: int,
        norm: str = "rmsnorm",
        bias: bool = True,
        mixer_dropout: float = 0.0,
        mlp_dropout: float = 0.0,
        mlp_hidden_dropout: float = 0.0,
    ):
        super().__init__()
        self.mixer_norm = make_norm(norm, dim, bias=bias)
        self.mixer = mixer
        self.mixer_dropout = nn.Dropout(mixer_dropout)
        self.mlp_norm = make_norm(norm, dim, bias=bias)
        self.mlp = MLP(dim, mlp_hidden, bias=bias, dropout=mlp_hidden_dropout)
        self.mlp_dropout = nn.Dropout(mlp_dropout)

    def forward(self, h: torch.Tensor, state=None) -> tuple[torch.Tensor, object]:
        """h [B, T, d] -> (h [B, T, d], mixer state)."""
        mixed, state = self.mixer(self.mixer_norm(h), state)
        h = h + self.mixer_dropout(mixed)
        h = h + self.mlp_dropout(self.mlp(self.mlp_norm(h)))
        return h, state

    def step(self, h_t: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """One position through the mixer's ``step`` and the MLP: h_t [B, d] -> (h_t [B, d], mixer state)."""
        mixed, state = self.mixer.step(self.mixer_norm(h_t), state)
        h_t = h_t + self.mixer_dropout(mixed)
        h_t = h_t + self.mlp_dropout(self.mlp(self.mlp_norm(h_t)))
        return h_t, state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        """The mixer's empty decoding state."""
        return self.mixer.init_state(batch_size, device, dtype)
