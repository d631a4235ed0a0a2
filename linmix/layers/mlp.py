"""Position-wise feed-forward block."""

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Linear(d -> hidden) -> GELU (erf) -> Dropout -> Linear(hidden -> d)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.dropout(F.gelu(self.fc_in(x))))
