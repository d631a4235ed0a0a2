"""Output heads: each maps hidden states to (logits, mean cross-entropy)."""

import torch
from torch import nn
from torch.nn import functional as F

from linmix.layers.norms import RMSNorm


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in float32. logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class GeluHead(nn.Module):
    """RMSNorm -> Linear(d -> max(d, mult d)) -> GELU -> Dropout -> Linear(-> V, no bias)."""

    def __init__(self, dim: int, vocab_size: int, mult: int = 1, dropout: float = 0.0):
        super().__init__()
        hidden = max(dim, mult * dim)
        self.norm = RMSNorm(dim)
        self.hidden = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        """h [B, T, d] (or [B, d]) -> (logits [B, T, V] (or [B, V]), loss or None)."""
        logits = self.out(self.dropout(F.gelu(self.hidden(self.norm(h)))))
        return logits, None if targets is None else cross_entropy(logits, targets)


class TiedHead(nn.Module):
    """Logits = h @ E^T with the input embedding E, through a Linear(d -> e) when e != d."""

    def __init__(self, embedding: nn.Embedding, dim: int):
        super().__init__()
        self.embedding = [embedding]  # not a submodule: its weight is owned by the model
        embed_dim = embedding.embedding_dim
        self.proj = nn.Linear(dim, embed_dim, bias=False) if embed_dim != dim else None

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        """h [B, T, d] (or [B, d]) -> (logits [B, T, V] (or [B, V]), loss or None)."""
        if self.proj is not None:
            h = self.proj(h)
        logits = F.linear(h, self.embedding[0].weight)
        return logits, None if targets is None else cross_entropy(logits, targets)


class AdaptiveHead(nn.Module):
    """Dropout -> adaptive softmax (Grave et al.) with frequency-sorted cutoffs and no head bias.

    With targets it returns no logits (the point of the adaptive softmax); without, the full
    log-probabilities, which serve as logits for sampling.
    """

    def __init__(self, dim: int, vocab_size: int, cutoffs: tuple[int, ...], div_value: float, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(
            dim, vocab_size, cutoffs=list(cutoffs), div_value=div_value, head_bias=False
        )

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        """h [B, T, d] (or [B, d]) -> (log-probs [B, T, V] (or [B, V]) or None, loss or None)."""
        flat = self.dropout(h).reshape(-1, h.shape[-1])  # [B * T, d]
        if targets is None:
            return self.softmax.log_prob(flat).view(*h.shape[:-1], -1), None
        return None, self.softmax(flat, targets.flatten()).loss
