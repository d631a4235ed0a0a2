"""The synthetic tasks' model: embedding -> pre-norm blocks of any registered mixer -> tied head.

It follows `linmix.models.LM` (same mixers, norms and init) with the two knobs the task recipes
need and the LM lacks: blocks without an MLP (zoology) and zoology's BaseConv, a gated short
causal convolution, in front of each mixer. Zoology alternates BaseConv layers and mixer layers
(its "2 layers" are one of each); here each block holds both, so `n_layers` counts mixers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from linmix.layers.mlp import MLP
from linmix.layers.norms import make_norm
from linmix.layers.registry import mixer_config_in_model, mixer_entry
from linmix.models.lm import init_linear_and_embedding


@dataclass
class TaskModelConfig:
    """A task model.

    Attributes:
        vocab_size: token ids.
        mixer: a registered mixer's name.
        d_model: width.
        n_layers: mixer blocks.
        context_length: longest sequence (mixers with a window and position embeddings need it).
        mixer_kwargs: the mixer config's own fields (d_model and context_length come from here).
        mlp_ratio: MLP hidden width over d_model after each mixer; 0 for none.
        short_conv: BaseConv kernel size in front of each mixer; 0 for none.
        position_embedding: learned absolute positions added to the token embedding.
        norm: "layernorm" (zoology) or "rmsnorm".
    """

    vocab_size: int
    mixer: str
    d_model: int = 64
    n_layers: int = 2
    context_length: int = 256
    mixer_kwargs: dict = field(default_factory=dict)
    mlp_ratio: int = 0
    short_conv: int = 0
    position_embedding: bool = False
    norm: str = "layernorm"

    def __post_init__(self):
        self.mixer_kwargs = dict(self.mixer_kwargs)
        for name in ("vocab_size", "d_model", "n_layers", "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mlp_ratio", "short_conv"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        self.mixer_config()

    def mixer_config(self):
        """Every block's mixer config: mixer_kwargs with this model's width and context length."""
        return mixer_config_in_model(
            self.mixer, self.mixer_kwargs, {"d_model": self.d_model, "context_length": self.context_length}
        )


class BaseConv(nn.Module):
    """Zoology's BaseConv: `y = conv(u) * W u + u`, conv a depthwise causal convolution of `kernel` taps."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, padding=kernel - 1)
        self.projection = nn.Linear(dim, dim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, T, d] -> [B, T, d]."""
        conv = self.conv(u.transpose(1, 2))[..., : u.shape[1]].transpose(1, 2)  # causal: drop the look-ahead
        return conv * self.projection(u) + u


class TaskBlock(nn.Module):
    """h <- h + mixer(conv(norm(h)));  h <- h + MLP(norm(h)) when the block has an MLP."""

    def __init__(self, config: TaskModelConfig):
        super().__init__()
        d = config.d_model
        self.mixer_norm = make_norm(config.norm, d)
        self.conv = BaseConv(d, config.short_conv) if config.short_conv else None
        self.mixer = mixer_entry(config.mixer).module_cls(config.mixer_config())
        self.mlp_norm = make_norm(config.norm, d) if config.mlp_ratio else None
        self.mlp = MLP(d, config.mlp_ratio * d) if config.mlp_ratio else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, d] -> [B, T, d]."""
        x = self.mixer_norm(h)
        if self.conv is not None:
            x = self.conv(x)
        h = h + self.mixer(x)[0]
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h))
        return h


class TaskModel(nn.Module):
    """Embedding (+ learned positions) -> TaskBlocks -> final norm; logits through the tied embedding."""

    def __init__(self, config: TaskModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.context_length, config.d_model) if config.position_embedding else None
        self.blocks = nn.ModuleList(TaskBlock(config) for _ in range(config.n_layers))
        self.norm = make_norm(config.norm, config.d_model)
        self.apply(init_linear_and_embedding)

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> normalised hidden states [B, T, d] (`logits` maps them to the vocabulary)."""
        if idx.shape[1] > self.config.context_length:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds context_length {self.config.context_length}")
        h = self.embed(idx)
        if self.position is not None:
            h = h + self.position(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits [..., V] (tied embedding)."""
        return F.linear(hidden, self.embed.weight)
