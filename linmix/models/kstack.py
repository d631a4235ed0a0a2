"""K-Operators language model: Embedding -> [K1 -> K2 x N -> K1 -> K0] (refined) -> RMSNorm -> head.

The K-Stack F is optionally applied as a damped fixed-point refinement
`h <- h + eta (F(h) - h)`, eta = sigmoid(learned logit), run for `refine_steps_train` steps in
training and `refine_steps_eval` in evaluation; 0 steps means `h = F(h0)`.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from linmix.layers.kbase import BaseKernel
from linmix.layers.norms import RMSNorm
from linmix.layers.registry import mixer_config_in_model, mixer_entry
from linmix.models.blocks import Block, PointwiseLinear
from linmix.models.heads import AdaptiveHead, GeluHead, TiedHead
from linmix.models.lm import DecodingMixin, init_linear_and_embedding
from linmix.models.registry import register_model

HEADS = ("gelu", "tied", "adaptive")
# Stack Kbase mode -> the `kbase` field of each layer's mixer: the stack owns the dense or Toeplitz
# kernel it shares and passes it to every mixer as `kernel`.
STACK_KBASE_MODES = {"shared": "shared", "toeplitz": "shared", "per_layer": "per_layer", "none": "none"}
# K2 fields that configs written before `mixer_kwargs` held at the top level (see `migrate_flat_k2_config`).
FLAT_K2_FIELDS = (
    "rank", "gamma_min", "gamma_max", "gamma_init", "alpha_cap", "gate_init", "gate_floor", "decay_backend",
)


@dataclass
class KStackConfig:
    """A complete K-Operators model. Field meanings follow spec/k_operators.md section 3.

    `mixer` names the registered mixer of the N middle layers and `mixer_kwargs` its own config
    fields (for K2: rank, gamma_min, gamma_max, gamma_init, alpha_cap, gate_init, gate_floor,
    decay_backend). The stack fills in `d_model`, `context_length`, `kbase` (each layer's mode) and
    `kbase_taps` where the mixer's config has them. kbase: "shared" (one dense [W, W] kernel owned by
    the stack), "toeplitz" (one shared [L] filter), "per_layer" (each layer's own dense kernel) or
    "none".
    """

    vocab_size: int = 65
    d_model: int = 128
    embed_dim: int | None = None
    n_k2: int = 6
    context_length: int = 256
    mixer: str = "k2"
    mixer_kwargs: dict = field(default_factory=dict)
    kbase: str = "shared"
    kbase_taps: int = 8
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

    def __post_init__(self):
        self.adaptive_cutoffs = tuple(self.adaptive_cutoffs)
        self.mixer_kwargs = dict(self.mixer_kwargs)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.kbase not in STACK_KBASE_MODES:
            raise ValueError(f"kbase must be one of {tuple(STACK_KBASE_MODES)}, got {self.kbase!r}")
        if min(self.refine_steps_train, self.refine_steps_eval) < 0:
            raise ValueError("refine_steps_train and refine_steps_eval must be >= 0")
        if not 0.0 < self.eta_init < 1.0:
            raise ValueError(f"eta_init must be in (0, 1), got {self.eta_init}")
        for name in ("vocab_size", "d_model", "n_k2", "context_length", "kbase_taps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.mixer_config()  # an unknown mixer or a bad mixer field fails here, not when the model is built

    def mixer_config(self):
        """The config shared by the stack's N mixers: mixer_kwargs with the stack's fields filled in."""
        if self.kbase != "none" and "kbase" not in mixer_entry(self.mixer).field_names:
            raise ValueError(
                f"mixer {self.mixer!r} has no Kbase (no 'kbase' config field): use kbase='none', got {self.kbase!r}"
            )
        stack_fields = {
            "d_model": self.d_model,
            "context_length": self.context_length,
            "kbase": STACK_KBASE_MODES[self.kbase],
            "kbase_taps": self.kbase_taps,
        }
        return mixer_config_in_model(self.mixer, self.mixer_kwargs, stack_fields)


def migrate_flat_k2_config(config: dict) -> dict:
    """A KStackConfig dict written before `mixer`/`mixer_kwargs` (K2 fields at the top level) in
    the current form: those fields move into mixer_kwargs of mixer "k2". Current dicts pass unchanged.

    Args:
        config: KStackConfig fields as a checkpoint's model spec stores them.

    Returns:
        A new dict of current KStackConfig fields.
    """
    flat = {key: config[key] for key in FLAT_K2_FIELDS if key in config}
    if not flat:
        return dict(config)
    rest = {key: value for key, value in config.items() if key not in flat}
    return {**rest, "mixer": "k2", "mixer_kwargs": {**rest.get("mixer_kwargs", {}), **flat}}


class K0(nn.Module):
    """Final rescaling: h <- h + (RMSNorm(h) * gain + bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.gain = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.norm(h) * self.gain + self.bias


@register_model("kstack", KStackConfig, migrate_config=migrate_flat_k2_config)
class KStackLM(DecodingMixin, nn.Module):
    """The K-Operators language model of both papers (see KStackConfig for the variants)."""

    no_weight_decay = ("eta_logit",)

    def __init__(self, config: KStackConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        embed_dim = config.embed_dim or d
        self.embed = nn.Embedding(config.vocab_size, embed_dim)
        self.embed_proj = nn.Linear(embed_dim, d, bias=False) if embed_dim != d else None
        self.embed_dropout = nn.Dropout(config.dropout_emb)
        self.shared_kernel = self._shared_kernel()
        mixer_cls, mixer_config = mixer_entry(config.mixer).module_cls, config.mixer_config()
        kernel = {} if self.shared_kernel is None else {"kernel": self.shared_kernel}
        self.k1_in = self._k1_block()
        self.k2_blocks = nn.ModuleList(
            Block(
                d,
                mixer_cls(mixer_config, **kernel),
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
        """idx [B, T] -> h0 [B, T, d] (or idx [B] -> h0 [B, d])."""
        h = self.embed(idx)
        if self.embed_proj is not None:
            h = self.embed_proj(h)
        return self.embed_dropout(h)

    def stack(
        self, h: torch.Tensor, states: list | None = None, *, step: bool = False
    ) -> tuple[torch.Tensor, list | None]:
        """One application of F = K0 o K1 o K2_N o ... o K2_1 o K1.

        Args:
            h: [B, T, d], or [B, d] with `step`.
            states: one decoding state per block, or None (only without `step`).
            step: decode one position through the blocks' `step`.

        Returns:
            (F(h), the blocks' new states or None).
        """
        new_states = None if states is None else []
        for i, block in enumerate(self.blocks):
            state = None if states is None else states[i]
            h, state = block.step(h, state) if step else block(h, state)
            if new_states is not None:
                new_states.append(state)
        return self.k0(h), new_states

    def hidden(
        self, h: torch.Tensor, states: list | None = None, *, step: bool = False
    ) -> tuple[torch.Tensor, list | None]:
        """Refined hidden states before the final norm.

        Args:
            h: h0 [B, T, d], or [B, d] with `step`.
            states: one list of block states per application of F, or None (only without `step`).
            step: decode one position (see `stack`).

        Returns:
            (h [B, T, d] or [B, d], the new states or None).
        """
        steps = self.refine_steps()
        if steps == 0:
            h, state = self.stack(h, None if states is None else states[0], step=step)
            return h, None if states is None else [state]
        eta = self.eta().to(h.dtype)
        new_states = None if states is None else []
        for i in range(steps):
            f, state = self.stack(h, None if states is None else states[i], step=step)
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
        """Learned dynamics for the metrics log (spec section 5), per mixer layer in order.

        gamma (r decays per layer), gate sigma(beta) (None without Kbase), alpha, eta, the Kbase
        norm shares and the refinement loop deltas measured over the evaluation forwards since the
        last call (None when there were none), and the Kbase lag profile for lags 0..32. A layer
        whose mixer has no such quantity (a mixer other than K2) reports None for it.
        """
        mixers = [block.mixer for block in self.k2_blocks]
        gammas = [_reading(m, "gamma") for m in mixers]
        gates = [_reading(m, "gate") for m in mixers]
        alphas = [_reading(m, "alpha") for m in mixers]
        shares = [_reading(m, "path_shares") for m in mixers]
        kernels = [getattr(m, "kernel", None) for m in mixers]
        runs = self.eval_refine_deltas[-1].item()
        deltas = (self.eval_refine_deltas[:-1] / runs).tolist() if runs else None
        self.eval_refine_deltas.zero_()
        return {
            "gamma": [None if g is None else g.tolist() for g in gammas],
            "gate": [None if g is None else g.item() for g in gates],
            "alpha": [None if a is None else a.item() for a in alphas],
            "eta": self.eta().item(),
            "kbase_share": [None if s is None else s["kbase_share"] for s in shares],
            "kbase_to_mix": [None if s is None else s["kbase_to_mix"] for s in shares],
            "refine_delta": deltas if self.config.refine_steps_eval else None,
            "kbase_lag_profile": [None if k is None else k.lag_profile(32).tolist() for k in kernels],
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

    def step(self, idx_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """Decode one token per sequence through every block's `step`: idx_t [B] -> (logits [B, V], state)."""
        self.check_step_tokens(idx_t)
        h, state = self.hidden(self.embed_tokens(idx_t), state, step=True)  # [B, d]
        logits, _ = self.head(self.norm(h))
        return logits, state


def _reading(mixer: nn.Module, method: str):
    """``mixer.method()``, or None for a mixer without that method."""
    read = getattr(mixer, method, None)
    return None if read is None else read()
