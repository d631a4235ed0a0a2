"""Causal multi-head softmax attention (scaled_dot_product_attention) with a KV cache."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from linmix.layers.base import Mixer
from linmix.layers.registry import register_mixer

KV_PAGE = 64  # the KV cache grows in whole pages of this many positions
# With a cache, every step has a new key length; cuDNN attention builds an execution plan for each
# (about 6 ms a call on an H100 with torch 2.11), so cached attention leaves it out.
CACHED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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


def bench_heads(d_model: int) -> int:
    """Heads of the layer benchmark's attention: heads of width 64 (the most heads, at most d_model // 64,
    that divide d_model)."""
    return max(h for h in range(1, max(1, d_model // 64) + 1) if d_model % h == 0)


@register_mixer(
    "attention",
    AttentionConfig,
    test_configs={"two_heads": {"n_heads": 2}},
    bench_config=lambda d_model: {"n_heads": bench_heads(d_model)},
)
class CausalSelfAttention(Mixer):
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
        """An empty KV cache. It grows a page (``KV_PAGE`` positions) at a time, up to ``window``."""
        heads = self.config.n_heads
        shape = (batch_size, heads, 0, self.config.d_model // heads)
        return {
            "position": 0,
            "keys": torch.empty(shape, device=device, dtype=dtype),
            "values": torch.empty(shape, device=device, dtype=dtype),
        }

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.config.n_heads, -1).transpose(1, 2)  # [B, H, T, hd]

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """x [B, T, d] -> (y [B, T, d], state). With a state, the new keys/values join the cache.

        The cache is written in place, so a step reads the cached positions once and copies them
        only when it grows by a page: a state passed in does not stay valid after the call.
        """
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
            keys, values = _reserve(state["keys"], end), _reserve(state["values"], end)
            keys[:, :, start:end] = k.to(keys.dtype)
            values[:, :, start:end] = v.to(values.dtype)
            # Imported here: torch.nn.attention.bias imports torch._dynamo (1.7 s), which a run
            # without a KV cache never needs.
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(length, end) if length > 1 else None  # query i sees keys 0..start + i
            with sdpa_kernel(CACHED_SDPA_BACKENDS):
                out = F.scaled_dot_product_attention(
                    q, keys[:, :, :end].to(q.dtype), values[:, :, :end].to(q.dtype), attn_mask=mask, dropout_p=dropout
                )
            new_state = {"position": end, "keys": keys, "values": values}
        out = out.transpose(1, 2).reshape(batch, length, d)
        return self.out_proj(out), new_state


def _reserve(cache: torch.Tensor, positions: int) -> torch.Tensor:
    """``cache`` [B, H, capacity, hd], or a copy of it with room for ``positions`` (whole pages)."""
    capacity = cache.shape[2]
    if positions <= capacity:
        return cache
    grown = cache.new_empty((*cache.shape[:2], -(-positions // KV_PAGE) * KV_PAGE, cache.shape[3]))
    grown[:, :, :capacity] = cache
    return grown
