"""A tiny stand-in language model that follows the linmix model interface, for training tests."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ToyConfig:
    vocab_size: int = 65
    context_length: int = 64
    d_model: int = 32
    dropout: float = 0.1


class ToyCausalLM(nn.Module):
    """Embedding -> causal convolution over (previous, current) token -> GELU -> dropout -> head."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.mix = nn.Conv1d(config.d_model, config.d_model, kernel_size=2)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        h = self.embed(idx).transpose(1, 2)  # [B, d, T]
        h = self.mix(F.pad(h, (1, 0)))  # [B, d, T], position t sees t-1 and t
        h = self.drop(F.gelu(h)).transpose(1, 2)  # [B, T, d]
        logits = self.head(h)  # [B, T, V]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def diagnostics(self) -> dict:
        return {"toy_head_weight_norm": self.head.weight.norm()}


def toy_param_groups(model: nn.Module, mode: str, weight_decay: float) -> list[dict]:
    """Matrices decay at the full learning rate; vectors do not decay and train at half of it."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": matrices, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "matrices"},
        {"params": vectors, "weight_decay": 0.0, "lr_scale": 0.5, "name": "vectors"},
    ]
