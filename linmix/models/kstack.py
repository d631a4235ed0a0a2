"""K-Operators language model: Embedding -> [K1 -> K2 x N -> K1 -> K0] (refined) -> RMSNorm -> head.

The K-Stack F is optionally applied as a damped fixed-point refinement
`h <- h + eta (F(h) - h)`, eta = sigmoid(learned logit), run for `refine_steps_train` steps in
training and `refine_steps_eval` in evaluation; 0 steps means `h = F(h0)`.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from linmix.layers.k2 import K2Config, K2Mixer
from linmix.layers.kbase import BaseKernel
from linmix.layers.norms import RMSNorm
from linmix.models.blocks import Block, PointwiseLinear
from linmix.models.heads import AdaptiveHead, GeluHead, TiedHead
from linmix.models.lm import DecodingMixin, init_linear_and_embedding

HEADS = ("gelu", "tied", "adaptive")


@dataclass
class KStackConfig:
    """A complete K-Operators model. Field meanings follow spec/k_operators.md section 3."""

    vocab_size: int = 65
    d_model: int = 128
    embed_dim: int | None = None
    n_k2: int = 6
    rank: int = 32
    context_length: int = 256
    kbase: str = "shared"
    kbase_taps: int = 8
    gamma_min: float = 0.15
    gamma_max: float = 0.995
    gamma_init: str = "v2"
    alpha_cap: float = 0.95
    gate_init: float = 8.0
    gate_floor: float = 0.0
    refine_steps_train: int = 0
    refine_steps_eval: int = 0
    eta_init: float = 0.3
    head: str = "gelu"
    head_mult: int = 1
    adaptive_cutoffs: tuple[int, ...] = (1024, 4096)
    adaptive_div: float = 4.0
    dropout_emb: float = 0.08
    dropout_mlp: float = 0.10
    dropout_resid: float = 0.05
    dropout_head: float = 0.15
    decay_backend: str = "auto"

    def __post_init__(self):
        self.adaptive_cutoffs = tuple(self.adaptive_cutoffs)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if min(self.refine_steps_train, self.refine_steps_eval) < 0:
            raise ValueError("refine_steps_train and refine_steps_eval must be >= 0")
        if not 0.0 < self.eta_init < 1.0:
            raise ValueError(f"eta_init must be in (0, 1), got {self.eta_init}")
        for name in ("vocab_size", "d_model", "n_k2", "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def k2_config(self) -> K2Config:
        """The config shared by every K2 layer of the stack."""
        return K2Config(
            d_model=self.d_model,
            rank=self.rank,
            context_length=self.context_length,
            kbase="shared" if self.kbase == "toeplitz" else self.kbase,
            kbase_taps=self.kbase_taps,
            gamma_min=self.gamma_min,
            gamma_max=self.gamma_max,
            gamma_init=self.gamma_init,
            alpha_cap=self.alpha_cap,
            gate_init=self.gate_init,
            gate_floor=self.gate_floor,
            decay_backend=self.decay_backend,
        )


class K0(nn.Module):
    """Final rescaling: h <- h + (RMSNorm(h) * gain + bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.gain = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.norm(h) * self.gain + self.bias


class KStackLM(DecodingMixin, nn.Module):
    """The K-Operators language model of both papers (see KStackConfig for the variants)."""

    def __init__(self, config: KStackConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        embed_dim = config.embed_dim or d
        self.embed = nn.Embedding(config.vocab_size, embed_dim)
        self.embed_proj = nn.Linear(embed_dim, d, bias=False) if embed_dim != d else None
        self.embed_dropout = nn.Dropout(config.dropout_emb)
        self.shared_kernel = self._shared_kernel()
        k2 = config.k2_config()
        self.k1_in = self._k1_block()
        self.k2_blocks = nn.ModuleList(
            Block(
                d,
                K2Mixer(k2, kernel=self.shared_kernel),
                2 * d,
                mixer_dropout=config.dropout_resid,
                mlp_hidden_dropout=config.dropout_mlp,
            )
            for _ in range(config.n_k2)
        )
        self.k1_out = self._k1_block()
        self.k0 = K0(d)
        self.eta_logit = nn.Parameter(torch.tensor(math.log(config.eta_init / (1 - config.eta_init))))
        self.norm = RMSNorm(d)
        self.head = self._head()
        self.apply(init_linear_and_embedding)
        # Per refinement step: summed relative loop deltas |F(h) - h| / |h| and the number of
        # evaluation forwards, read and reset by `diagnostics`.
        steps = max(config.refine_steps_eval, 1)
        self.register_buffer("eval_refine_deltas", torch.zeros(steps + 1), persistent=False)

    def _shared_kernel(self) -> BaseKernel | None:
        cfg = self.config
        if cfg.kbase == "shared":
            return BaseKernel("dense", cfg.context_length)
        if cfg.kbase == "toeplitz":
            return BaseKernel("toeplitz", cfg.kbase_taps)
        return None

    def _k1_block(self) -> Block:
        d = self.config.d_model
        return Block(d, PointwiseLinear(d), 2 * d, mlp_hidden_dropout=self.config.dropout_mlp)

    def _head(self) -> nn.Module:
        cfg = self.config
        if cfg.head == "gelu":
            return GeluHead(cfg.d_model, cfg.vocab_size, cfg.head_mult, cfg.dropout_head)
        if cfg.head == "adaptive":
            return AdaptiveHead(cfg.d_model, cfg.vocab_size, cfg.adaptive_cutoffs, cfg.adaptive_div, cfg.dropout_head)
        return TiedHead(self.embed, cfg.d_model)

    @property
    def blocks(self) -> list[Block]:
        """The stack's blocks in order: K1, K2 x N, K1 (K0 has no mixer)."""
        return [self.k1_in, *self.k2_blocks, self.k1_out]

    @property
    def window(self) -> float:
        """Longest sequence the model accepts (W with a dense Kbase, unbounded otherwise)."""
        return min(block.mixer.window for block in self.blocks)

    def eta(self) -> torch.Tensor:
        """Refinement step size sigmoid(eta_logit)."""
        return torch.sigmoid(self.eta_logit)

    def refine_steps(self) -> int:
        """Refinement steps in the current mode (train or eval)."""
        return self.config.refine_steps_train if self.training else self.config.refine_steps_eval

    def num_parameters(self) -> int:
        """Total number of parameters, shared ones counted once."""
        return sum(p.numel() for p in self.parameters())

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> h0 [B, T, d]."""
        h = self.embed(idx)
        if self.embed_proj is not None:
            h = self.embed_proj(h)
        return self.embed_dropout(h)

    def stack(self, h: torch.Tensor, states: list | None = None) -> tuple[torch.Tensor, list | None]:
        """One application of F = K0 o K1 o K2_N o ... o K2_1 o K1. h [B, T, d]."""
        new_states = None if states is None else []
        for i, block in enumerate(self.blocks):
            h, state = block(h, None if states is None else states[i])
            if new_states is not None:
                new_states.append(state)
        return self.k0(h), new_states

    def hidden(self, h: torch.Tensor, states: list | None = None) -> tuple[torch.Tensor, list | None]:
        """Refined hidden states before the final norm; states hold one entry per application of F."""
        steps = self.refine_steps()
        if steps == 0:
            h, state = self.stack(h, None if states is None else states[0])
            return h, None if states is None else [state]
        eta = self.eta().to(h.dtype)
        new_states = None if states is None else []
        for i in range(steps):
            f, state = self.stack(h, None if states is None else states[i])
            if not self.training and i < self.eval_refine_deltas.numel() - 1:
                with torch.no_grad():
                    delta = (f - h).float().norm() / (h.float().norm() + 1e-6)
                    self.eval_refine_deltas[i].add_(delta)
                    if i == 0:
                        self.eval_refine_deltas[-1].add_(1.0)
            h = h + eta * (f - h)
            if new_states is not None:
                new_states.append(state)
        return h, new_states

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx [B, T] -> (logits [B, T, V] or None, mean cross-entropy or None)."""
        self.check_tokens(idx, targets)
        h, _ = self.hidden(self.embed_tokens(idx))
        return self.head(self.norm(h), targets)

    @torch.no_grad()
    def diagnostics(self) -> dict:
        """Learned dynamics for the metrics log (spec section 5), per K2 layer in order.

        gamma (r decays per layer), gate sigma(beta) (None without Kbase), alpha, eta, the Kbase
        norm shares and the refinement loop deltas measured over the evaluation forwards since the
        last call (None when there were none), and the Kbase lag profile for lags 0..32.
        """
        mixers = [block.mixer for block in self.k2_blocks]
        shares = [m.path_shares() for m in mixers]
        gates = [m.gate() for m in mixers]
        runs = self.eval_refine_deltas[-1].item()
        deltas = (self.eval_refine_deltas[:-1] / runs).tolist() if runs else None
        self.eval_refine_deltas.zero_()
        return {
            "gamma": [m.gamma().tolist() for m in mixers],
            "gate": [None if g is None else g.item() for g in gates],
            "alpha": [m.alpha().item() for m in mixers],
            "eta": self.eta().item(),
            "kbase_share": [None if s is None else s["kbase_share"] for s in shares],
            "kbase_to_mix": [None if s is None else s["kbase_to_mix"] for s in shares],
            "refine_delta": deltas if self.config.refine_steps_eval else None,
            "kbase_lag_profile": [None if m.kernel is None else m.kernel.lag_profile(32).tolist() for m in mixers],
        }

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list:
        """Empty decoding state for the current mode's number of refinement steps."""
        applications = max(self.refine_steps(), 1)
        return [[block.init_state(batch_size, device, dtype) for block in self.blocks] for _ in range(applications)]

    def prefill(self, idx: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """Continue decoding with tokens idx [B, T]: (logits [B, T, V], state)."""
        self.check_tokens(idx)
        h, state = self.hidden(self.embed_tokens(idx), state)
        logits, _ = self.head(self.norm(h))
        return logits, state
