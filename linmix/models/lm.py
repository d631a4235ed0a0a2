"""The generic language-model backbone: embedding -> pre-norm blocks of any registered mixer -> head.

A model config names its mixer (`mixer="k2"`, `"attention"`, ...) and passes the mixer's own
config fields in `mixer_kwargs`; new mixers plug in through `linmix.layers.register_mixer`
without touching this file, the trainer or the CLI.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from linmix.layers.norms import make_norm
from linmix.layers.registry import mixer_config_in_model, mixer_entry
from linmix.models.blocks import Block
from linmix.models.heads import TiedHead, cross_entropy
from linmix.models.registry import register_model


def init_linear_and_embedding(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std^2) weights and zero biases for every Linear and Embedding (papers' init)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class DecodingMixin:
    """Token validation shared by the language models (which have `config.vocab_size` and `window`)."""

    def check_tokens(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Raise a clear error for token tensors of the wrong type, shape or range."""
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            got = f"{idx.dtype} {list(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise TypeError(f"idx must be a [B, T] torch.long tensor, got {got}")
        # The range check reads the values back (one wait for the device), which torch.compile
        # cannot trace: compiled graphs skip it and leave bad tokens to the embedding's device-side check.
        if idx.numel() and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(idx)
            lo, hi = torch.stack([lo, hi]).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"idx values must be in [0, {self.config.vocab_size}), got [{lo}, {hi}]")
        if idx.shape[1] > self.window:
            raise ValueError(f"sequence length T={idx.shape[1]} exceeds the model's window {self.window}")
        if targets is not None and (targets.shape != idx.shape or targets.dtype != torch.long):
            raise ValueError(f"targets must be a torch.long tensor shaped like idx {list(idx.shape)}, got {targets.dtype} {list(targets.shape)}")

    def check_step_tokens(self, idx_t: torch.Tensor) -> None:
        """Raise a clear error for the tokens of a decoding step that are not a [B] torch.long tensor in range."""
        if not isinstance(idx_t, torch.Tensor) or idx_t.dtype != torch.long or idx_t.dim() != 1:
            got = f"{idx_t.dtype} {list(idx_t.shape)}" if isinstance(idx_t, torch.Tensor) else type(idx_t).__name__
            raise TypeError(f"idx_t must be a [B] torch.long tensor, got {got}")
        self.check_tokens(idx_t[:, None])


@dataclass
class LMConfig:
    """Generic backbone: `n_layers` blocks of mixer `mixer`, each followed by an MLP.

    `mixer_kwargs` are the mixer config's own fields; `d_model` and `context_length` are filled in
    from this config when the mixer config has them.
    """

    vocab_size: int
    mixer: str
    d_model: int = 128
    n_layers: int = 4
    context_length: int = 256
    mixer_kwargs: dict = field(default_factory=dict)
    mlp_ratio: int = 4
    norm: str = "rmsnorm"
    bias: bool = True
    dropout: float = 0.0
    mlp_hidden_dropout: float = 0.0
    position_embedding: bool = False
    tie_embeddings: bool = True

    def __post_init__(self):
        self.mixer_kwargs = dict(self.mixer_kwargs)
        for name in ("vocab_size", "d_model", "n_layers", "context_length", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.mixer_config()  # an unknown mixer or a bad mixer field fails here, not when the model is built

    def mixer_config(self):
        """The config of every block's mixer: mixer_kwargs with the backbone's width and context length."""
        return mixer_config_in_model(
            self.mixer, self.mixer_kwargs, {"d_model": self.d_model, "context_length": self.context_length}
        )


@register_model("lm", LMConfig)
class LM(DecodingMixin, nn.Module):
    """Embedding (+ learned positions) -> pre-norm blocks -> final norm -> tied or untied head."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.position = nn.Embedding(config.context_length, d) if config.position_embedding else None
        self.embed_dropout = nn.Dropout(config.dropout)
        mixer_cls, mixer_config = mixer_entry(config.mixer).module_cls, config.mixer_config()
        self.blocks = nn.ModuleList(
            Block(
                d,
                mixer_cls(mixer_config),
                config.mlp_ratio * d,
                norm=config.norm,
                bias=config.bias,
                mixer_dropout=config.dropout,
                mlp_dropout=config.dropout,
                mlp_hidden_dropout=config.mlp_hidden_dropout,
            )
            for _ in range(config.n_layers)
        )
        self.norm = make_norm(config.norm, d, bias=config.bias)
        if config.tie_embeddings:
            self.head = TiedHead(self.embed, d)
        else:
            self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.apply(init_linear_and_embedding)

    @property
    def window(self) -> float:
        """Longest sequence the model accepts."""
        limits = [block.mixer.window for block in self.blocks]
        if self.position is not None:
            limits.append(self.config.context_length)
        return min(limits)

    def num_parameters(self, exclude_positions: bool = False) -> int:
        """Total number of parameters (tied ones once); optionally without position embeddings."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_positions and self.position is not None:
            total -= self.position.weight.numel()
        return total

    def _embed(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        """idx [B, T] from position `start` -> h [B, T, d]."""
        h = self.embed(idx)
        if self.position is not None:
            positions = torch.arange(start, start + idx.shape[1], device=idx.device)
            h = h + self.position(positions)
        return self.embed_dropout(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return self.head(h)[0] if isinstance(self.head, TiedHead) else self.head(h)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx [B, T] -> (logits [B, T, V], mean cross-entropy or None)."""
        self.check_tokens(idx, targets)
        h = self._embed(idx, 0)
        for block in self.blocks:
            h, _ = block(h)
        logits = self._logits(h)
        return logits, None if targets is None else cross_entropy(logits, targets)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
        """Empty decoding state: the position and one state per block."""
        return {"position": 0, "blocks": [b.init_state(batch_size, device, dtype) for b in self.blocks]}

    def prefill(self, idx: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Continue decoding with tokens idx [B, T]: (logits [B, T, V], state)."""
        self.check_tokens(idx)
        start = state["position"]
        if start + idx.shape[1] > self.window:
            raise ValueError(f"decoding past the model's window {self.window}")
        h = self._embed(idx, start)
        block_states = []
        for block, block_state in zip(self.blocks, state["blocks"]):
            h, block_state = block(h, block_state)
            block_states.append(block_state)
        return self._logits(h), {"position": start + idx.shape[1], "blocks": block_states}

    def step(self, idx_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Decode one token per sequence through every block's `step`: idx_t [B] -> (logits [B, V], state)."""
        self.check_step_tokens(idx_t)
        start = state["position"]
        if start + 1 > self.window:
            raise ValueError(f"decoding past the model's window {self.window}")
        h = self._embed(idx_t[:, None], start)[:, 0]  # [B, d]
        block_states = []
        for block, block_state in zip(self.blocks, state["blocks"]):
            h, block_state = block.step(h, block_state)
            block_states.append(block_state)
        return self._logits(h), {"position": start + 1, "blocks": block_states}


@register_model("transformer", LMConfig)
class TransformerLM(LM):
    """nanoGPT's GPT: LayerNorm without bias, learned positions, tied embeddings, GELU MLP x4.

    Output projections get nanoGPT's depth-scaled init N(0, (0.02 / sqrt(2 n_layers))^2).
    """

    def __init__(self, config: LMConfig):
        if config.mixer != "attention":
            raise ValueError(f"TransformerLM needs mixer='attention', got {config.mixer!r}")
        super().__init__(config)
        std = 0.02 / math.sqrt(2 * config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.mixer.out_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.fc_out.weight, mean=0.0, std=std)
