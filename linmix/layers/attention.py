"""Causal multi-head softmax attention (scaled_dot_product_attention) with a KV cache."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from linmix.layers.registry import register_mixer


@dataclass
class AttentionConfig:
    """Causal self-attention: n_heads heads of width d_model / n_heads, cache up to context_length."""

    d_model: int
    n_heads: int
    context_length: int
    bias: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a positive multiple of n_heads={self.n_heads}")


@register_mixer("attention", AttentionConfig)
class CausalSelfAttention(nn.Module):
    """nanoGPT-style attention: fused qkv projection, causal SDPA, output projection."""

    def __init__(self, config: AttentionConfig):
        super().__init__()
        self.config = config
        self.qkv_proj = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    @property
    def window(self) -> int:
        """Capacity of the KV cache."""
        return self.config.context_length

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict:
        """Empty KV cache of capacity context_length."""
        heads = self.config.n_heads
        head_dim = self.config.d_model // heads
        shape = (batch_size, heads, self.config.context_length, head_dim)
        return {
            "position": 0,
            "keys": torch.zeros(shape, device=device, dtype=dtype),
            "values": torch.zeros(shape, device=device, dtype=dtype),
        }

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.config.n_heads, -1).transpose(1, 2)  # [B, H, T, hd]

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """x [B, T, d] -> (y [B, T, d], state). With a state, the new keys/values join the cache."""
        batch, length, d = x.shape
        if d != self.config.d_model:
            raise ValueError(f"x must be [B, T, {self.config.d_model}], got {list(x.shape)}")
        q, k, v = (self._split_heads(t) for t in self.qkv_proj(x).split(d, dim=-1))
        dropout = self.config.dropout if self.training else 0.0
        if state is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            new_state = None
        else:
            start = state["position"]
            end = start + length
            if end > self.window:
                raise ValueError(f"KV cache holds {self.window} positions; position {end - 1} does not fit")
            keys, values = state["keys"].clone(), state["values"].clone()
            keys[:, :, start:end] = k.to(keys.dtype)
            values[:, :, start:end] = v.to(values.dtype)
            query_pos = torch.arange(start, end, device=x.device)[:, None]
            key_pos = torch.arange(end, device=x.device)[None, :]
            mask = key_pos <= query_pos  # [T, end]
            out = F.scaled_dot_product_attention(
                q, keys[:, :, :end].to(q.dtype), values[:, :, :end].to(q.dtype), attn_mask=mask, dropout_p=dropout
            )
            new_state = {"position": end, "keys": keys, "values": values}
        out = out.transpose(1, 2).reshape(batch, length, d)
        return self.out_proj(out), new_state

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Decode one token: x_t [B, d] -> (y_t [B, d], state)."""
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state
