"""The delta-rule token mixers: DeltaNet, Gated DeltaNet (GDN), Kimi Delta Attention (KDA) and their
preconditioned forms PDN, PGDN and PKDA (spec/preconditioned_delta.md, section 2).

For a normalised input x [B, T, d], with H key heads of width K and HV value heads of width V
(HV a multiple of H: grouped value heads share a key head):

    q, k, v = SiLU(ShortConv_4(W_{q,k,v} x))          q and k are L2-normalised inside the op
    beta_t  = sigmoid(w_b . x_t)                        per value head, in (0, 1)
    g_t     = 0                                         DeltaNet
            | -exp(A_log) softplus(w_a . x_t + dt_bias)     GDN: one log decay per value head
            | -exp(A_log) softplus(F x_t + dt_bias)         KDA: one per value head and key channel,
                                                            F a rank-r product d -> r -> HV * K
    S_t     = (I - beta_t k~_t k_t^T) Diag(e^{g_t}) S_{t-1} + beta_t k~_t v_t^T,   o_t = S_t^T q_t / sqrt(K)
    y_t     = W_o (RMSNorm(o_t) * act(W_g x_t))         act: SiLU (DeltaNet, GDN) or sigmoid (KDA)

with the write key k~ = k for DeltaNet, GDN and KDA. The preconditioned forms write with
k~_t = B(P_t) k_t, where per key head P_t = e^{g^P_t} P_{t-1} + beta^P_t k_t^2 is a decayed running
second moment of the keys with its own Mamba2-style gate g^P and strength beta^P = sigmoid(w . x_t),
and B(P) = exp(-log(x) s(log(P + eps) - c)), s(r) = r / (1 + |r|), lies in (1/x, x) with a learnable
centre c per key head. The recurrence is the op ``linmix.ops.delta_rule``; its one-token step
``delta_rule_step`` decodes.

Initialisation (spec section 8, the paper's model-level init): projections N(0, 0.02^2) (the LM
backbone re-draws them the same way), short-conv filters N(0, 0.02^2), every A_log = log U(a_log_min,
16), every dt_bias the softplus inverse of a log-uniform dt in [1e-3, 0.1] floored at 1e-4, centres
-0.2. A_log, dt_bias and the centres take no weight decay.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from linmix.layers.base import Mixer, check_head_config, check_mixer_input, init_linear_layers
from linmix.layers.norms import RMSNorm
from linmix.layers.registry import register_mixer
from linmix.layers.short_conv import ShortConv
from linmix.ops import DiagonalPreconditioner, delta_rule, delta_rule_step

DECAYS = ("none", "scalar", "channel")
GATE_ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}
INIT_STD = 0.02


@dataclass
class DeltaRuleConfig:
    """Fields shared by the delta-rule mixers; each mixer's config class fixes its variant.

    Attributes:
        d_model: model width d.
        n_heads: H, the query/key heads.
        head_dim: K, the key (and query) width per head; None means d_model // n_heads.
        n_v_heads: HV, the value heads, a multiple of n_heads (grouped value heads); None means n_heads.
        expand_v: V = head_dim * expand_v, the value width per head (an integer).
        use_short_conv: SiLU(short causal depthwise conv) on q, k and v; without it SiLU alone.
        conv_size: the short convolutions' width.
        use_gate: output gate, RMSNorm(o) * act(W_g x); without it RMSNorm(o) alone.
        gate_activation: the output gate's act, "silu" or "sigmoid".
        norm_eps: epsilon of the output RMSNorm (inside the square root).
        a_log_min: A_log = log U(a_log_min, 16) for the decay gates (spec section 8: 0).
        backend: backend of ``linmix.ops.delta_rule`` ("auto", "naive", "chunk", ...).
        context_length: filled in by the models and benchmarks like every mixer's; the recurrence
            itself has no window, so it bounds nothing.
    """

    decay: ClassVar[str] = "none"
    preconditioned: ClassVar[bool] = False

    d_model: int
    n_heads: int = 4
    head_dim: int | None = None
    n_v_heads: int | None = None
    expand_v: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    use_gate: bool = True
    gate_activation: str = "silu"
    norm_eps: float = 1e-6
    a_log_min: float = 0.0
    backend: str = "auto"
    context_length: int = 256

    def __post_init__(self):
        check_head_config(self)
        if self.n_v_heads is not None and (self.n_v_heads < 1 or self.n_v_heads % self.n_heads):
            raise ValueError(f"n_v_heads={self.n_v_heads} must be a positive multiple of n_heads={self.n_heads}")
        value_width = self.key_head_dim * self.expand_v
        if value_width < 1 or not math.isclose(value_width, round(value_width)):
            raise ValueError(f"head_dim * expand_v = {self.key_head_dim} * {self.expand_v} must be a positive integer")
        if self.gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be one of {sorted(GATE_ACTIVATIONS)}, got {self.gate_activation!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not 0.0 <= self.a_log_min < 16.0:
            raise ValueError(f"a_log_min must be in [0, 16), got {self.a_log_min}")

    @property
    def key_head_dim(self) -> int:
        """K."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def value_head_dim(self) -> int:
        """V."""
        return round(self.key_head_dim * self.expand_v)

    @property
    def value_heads(self) -> int:
        """HV."""
        return self.n_v_heads if self.n_v_heads is not None else self.n_heads


@dataclass(kw_only=True)
class PreconditionerFields:
    """The diagonal preconditioner's settings (spec section 2), mixed into the preconditioned configs.

    Attributes:
        precond_x: B(P) lies in (1/x, x); x = 1 is the unpreconditioned mixer, and x <= 2 keeps the
            transition's eigenvalues in the unit disk (beta <= 1).
        precond_eps: the epsilon inside log(P + eps).
        precond_center_init: the initial centre c of every key head.
        precond_a_log_min: A_log^P = log U(precond_a_log_min, 16) for the preconditioner's decay gate.
    """

    precond_x: float = 1.5
    precond_eps: float = 1e-6
    precond_center_init: float = -0.2
    precond_a_log_min: float = 0.0

    def check_preconditioner(self) -> None:
        """Raise ValueError for settings outside the preconditioner's stable range."""
        if not 1.0 <= self.precond_x <= 2.0:
            raise ValueError(f"precond_x must be in [1, 2] (eigenvalues in the unit disk), got {self.precond_x}")
        if not self.precond_eps > 0:
            raise ValueError(f"precond_eps must be > 0, got {self.precond_eps}")
        if not 0.0 <= self.precond_a_log_min < 16.0:
            raise ValueError(f"precond_a_log_min must be in [0, 16), got {self.precond_a_log_min}")


@dataclass
class DeltaNetConfig(DeltaRuleConfig):
    """DeltaNet: no decay (alpha = 1)."""


@dataclass
class GDNConfig(DeltaRuleConfig):
    """Gated DeltaNet: a Mamba2-style scalar decay per value head."""

    decay: ClassVar[str] = "scalar"


@dataclass
class KDAConfig(DeltaRuleConfig):
    """Kimi Delta Attention: a decay per value head and key channel from a rank-``low_rank`` projection,
    and a rank-``low_rank`` sigmoid output gate (fla's KDA).

    Attributes:
        low_rank: the inner width of the decay and output-gate projections; None means V.
    """

    decay: ClassVar[str] = "channel"

    gate_activation: str = "sigmoid"
    low_rank: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.low_rank is not None and self.low_rank < 1:
            raise ValueError(f"low_rank must be >= 1, got {self.low_rank}")

    @property
    def rank(self) -> int:
        """The inner width of the low-rank projections."""
        return self.low_rank if self.low_rank is not None else self.value_head_dim


@dataclass
class PDeltaNetConfig(DeltaNetConfig, PreconditionerFields):
    """Preconditioned DeltaNet (PDN): the PGDN recurrence with g = 0 (spec section 5, item 4)."""

    preconditioned: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        self.check_preconditioner()


@dataclass
class PGDNConfig(GDNConfig, PreconditionerFields):
    """Preconditioned Gated DeltaNet (PGDN)."""

    preconditioned: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        self.check_preconditioner()


@dataclass
class PKDAConfig(KDAConfig, PreconditionerFields):
    """Preconditioned KDA (PKDA)."""

    preconditioned: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        self.check_preconditioner()


def log_uniform_a_log(size: int | tuple[int, ...], low: float, high: float = 16.0) -> torch.Tensor:
    """A_log = log A with A ~ U(low, high) (kept above float32's smallest normal). [size]"""
    return torch.empty(size).uniform_(low, high).clamp_(min=torch.finfo(torch.float32).tiny).log()


def mamba_dt_bias(size: int | tuple[int, ...], dt_min: float = 1e-3, dt_max: float = 0.1,
                  floor: float = 1e-4) -> torch.Tensor:
    """softplus^-1(dt) with dt log-uniform on [dt_min, dt_max], floored at ``floor`` (Mamba's init). [size]"""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def mamba_log_decay(logits: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """g = -exp(A_log) softplus(logits + dt_bias) <= 0, in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return -torch.exp(a_log.to(dtype)) * F.softplus(logits.to(dtype) + dt_bias.to(dtype))


def bench_config(d_model: int) -> dict:
    """The layer benchmark's heads at width d: heads of width 128 from d = 256 on, else of width 64."""
    head_dim = 128 if d_model >= 256 else 64
    return {"n_heads": max(1, d_model // head_dim), "head_dim": head_dim}


class DeltaRuleMixer(Mixer):
    """The delta-rule mixer family; the config's class picks the decay and the preconditioner.

    The decoding state is ``{"recurrent": S [B, HV, K, V]`` (preconditioned: the pair
    ``(S, P [B, H, K])``), ``"conv": the short convolutions' last W - 1 inputs [B, W-1, 2HK + HV V]}``
    (no "conv" without short convolutions); S and P are float32 (float64 for a float64 model).
    """

    def __init__(self, config: DeltaRuleConfig):
        super().__init__()
        self.config = config
        d, H, HV = config.d_model, config.n_heads, config.value_heads
        K, V = config.key_head_dim, config.value_head_dim
        self.qkv_sizes = (H * K, H * K, HV * V)
        self.qkv_proj = nn.Linear(d, sum(self.qkv_sizes), bias=False)
        self.conv = None
        if config.use_short_conv:
            self.conv = ShortConv(sum(self.qkv_sizes), config.conv_size, init_std=INIT_STD)
        # One projection for every scalar gate: beta, then GDN's decay, then the preconditioner's decay and beta.
        self.gate_sizes = {"beta": HV}
        if config.decay == "scalar":
            self.gate_sizes["decay"] = HV
        if config.preconditioned:
            self.gate_sizes.update(precond_decay=H, precond_beta=H)
        self.gate_proj = nn.Linear(d, sum(self.gate_sizes.values()), bias=False)
        no_decay = []
        if config.decay == "channel":
            rank = config.rank
            self.decay_proj = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, HV * K, bias=False))
        if config.decay != "none":
            self.A_log = nn.Parameter(log_uniform_a_log(HV, config.a_log_min))
            self.dt_bias = nn.Parameter(mamba_dt_bias(HV * K if config.decay == "channel" else HV))
            no_decay += ["A_log", "dt_bias"]
        if config.preconditioned:
            self.precond_A_log = nn.Parameter(log_uniform_a_log(H, config.precond_a_log_min))
            self.precond_dt_bias = nn.Parameter(mamba_dt_bias(H))
            self.precond_center = nn.Parameter(torch.full((H,), config.precond_center_init))
            no_decay += ["precond_A_log", "precond_dt_bias", "precond_center"]
        self.no_weight_decay = tuple(no_decay)
        self.o_norm = RMSNorm(V, eps=config.norm_eps)
        if not config.use_gate:
            self.o_gate_proj = None
        elif config.decay == "channel":
            self.o_gate_proj = nn.Sequential(nn.Linear(d, config.rank, bias=False), nn.Linear(config.rank, HV * V))
        else:
            self.o_gate_proj = nn.Linear(d, HV * V, bias=False)
        self.o_proj = nn.Linear(HV * V, d, bias=False)
        init_linear_layers(self, INIT_STD)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict:
        """The state before position 0: zero recurrent state(s) and zero conv inputs."""
        cfg = self.config
        H, HV, K, V = cfg.n_heads, cfg.value_heads, cfg.key_head_dim, cfg.value_head_dim
        state_dtype = torch.promote_types(dtype, torch.float32)
        recurrent = torch.zeros(batch_size, HV, K, V, device=device, dtype=state_dtype)
        if cfg.preconditioned:
            recurrent = (recurrent, torch.zeros(batch_size, H, K, device=device, dtype=state_dtype))
        state = {"recurrent": recurrent}
        if self.conv is not None:
            state["conv"] = self.conv.init_cache(batch_size, device, dtype)
        return state

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., 2HK + HV V] -> q, k [..., H, K] and v [..., HV, V]."""
        cfg = self.config
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        K, V = cfg.key_head_dim, cfg.value_head_dim
        return q.unflatten(-1, (-1, K)), k.unflatten(-1, (-1, K)), v.unflatten(-1, (-1, V))

    def _gates(self, x: torch.Tensor) -> dict:
        """The op's gate arguments at every position of x [..., d]: beta [..., HV], g (None, [..., HV] or
        [..., HV, K]) and precond (None or a DiagonalPreconditioner of [..., H] gates)."""
        cfg = self.config
        parts = dict(zip(self.gate_sizes, self.gate_proj(x).split(list(self.gate_sizes.values()), dim=-1)))
        g = None
        if cfg.decay == "scalar":
            g = mamba_log_decay(parts["decay"], self.A_log, self.dt_bias)  # [..., HV]
        elif cfg.decay == "channel":
            logits = self.decay_proj(x).unflatten(-1, (cfg.value_heads, cfg.key_head_dim))  # [..., HV, K]
            g = mamba_log_decay(logits, self.A_log[:, None], self.dt_bias.view(cfg.value_heads, cfg.key_head_dim))
        precond = None
        if cfg.preconditioned:
            precond = DiagonalPreconditioner(
                mamba_log_decay(parts["precond_decay"], self.precond_A_log, self.precond_dt_bias),  # [..., H]
                torch.sigmoid(parts["precond_beta"]),
                self.precond_center,
                x=cfg.precond_x,
                eps=cfg.precond_eps,
            )
        return {"beta": torch.sigmoid(parts["beta"]), "g": g, "precond": precond}

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """W_o (RMSNorm(o) * act(W_g x)): o [..., HV, V], x [..., d] -> [..., d]."""
        o = self.o_norm(o)
        if self.o_gate_proj is not None:
            gate = self.o_gate_proj(x).unflatten(-1, (self.config.value_heads, self.config.value_head_dim))
            o = o * GATE_ACTIVATIONS[self.config.gate_activation](gate)
        return self.o_proj(o.flatten(-2))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """x [B, T, d] -> (y [B, T, d], state). With state=None no state is returned."""
        check_mixer_input(x, 3, self.config.d_model)
        qkv = self.qkv_proj(x)  # [B, T, 2HK + HV V]
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv, None if state is None else state["conv"])
        else:
            qkv = F.silu(qkv)
        q, k, v = self._split_qkv(qkv)
        o, recurrent = delta_rule(
            q, k, v, **self._gates(x),
            initial_state=None if state is None else state["recurrent"],
            output_final_state=state is not None,
            backend=self.config.backend,
            check_values=False,  # beta, the decays and the preconditioner's gates are in range by construction
        )  # o [B, T, HV, V]
        if state is None:
            return self._output(o, x), None
        new_state = {"recurrent": recurrent}
        if conv_cache is not None:
            new_state["conv"] = conv_cache
        return self._output(o, x), new_state

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Decode one position in O(HV K V) time and memory: x_t [B, d] -> (y_t [B, d], state)."""
        check_mixer_input(x_t, 2, self.config.d_model)
        qkv = self.qkv_proj(x_t)  # [B, 2HK + HV V]
        new_state = {}
        if self.conv is not None:
            qkv, new_state["conv"] = self.conv.step(qkv, state["conv"])
        else:
            qkv = F.silu(qkv)
        q, k, v = self._split_qkv(qkv)
        o, new_state["recurrent"] = delta_rule_step(q, k, v, **self._gates(x_t), state=state["recurrent"])
        return self._output(o, x_t), new_state


TEST_CONFIGS = {
    "two_heads": {"n_heads": 2},
    "grouped_values_plain": {"n_heads": 1, "n_v_heads": 2, "head_dim": 8, "expand_v": 0.5, "use_short_conv": False,
                             "use_gate": False, "backend": "naive"},
}
_REGISTRATION = dict(test_configs=TEST_CONFIGS, bench_config=bench_config, backend_field="backend",
                     backend_op="delta_rule")


@register_mixer("deltanet", DeltaNetConfig, **_REGISTRATION)
class DeltaNet(DeltaRuleMixer):
    """DeltaNet: S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""


@register_mixer("gdn", GDNConfig, **_REGISTRATION)
class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet: DeltaNet with a Mamba2-style scalar decay per value head."""


@register_mixer("kda", KDAConfig, **_REGISTRATION)
class KimiDeltaAttention(DeltaRuleMixer):
    """Kimi Delta Attention: DeltaNet with a decay per value head and key channel."""


@register_mixer("pdeltanet", PDeltaNetConfig, **_REGISTRATION)
class PreconditionedDeltaNet(DeltaRuleMixer):
    """PDN: DeltaNet writing with the preconditioned key B(P_t) k_t."""


@register_mixer("pgdn", PGDNConfig, **_REGISTRATION)
class PreconditionedGatedDeltaNet(DeltaRuleMixer):
    """PGDN: Gated DeltaNet writing with the preconditioned key."""


@register_mixer("pkda", PKDAConfig, **_REGISTRATION)
class PreconditionedKDA(DeltaRuleMixer):
    """PKDA: KDA writing with the preconditioned key."""
