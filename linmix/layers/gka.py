"""Gated KalmaNet (GKA): the output of a decayed test-time ridge regression (spec/gated_kalmanet.md §2, §5, §7).

For a normalised input x [B, T, d], with H heads of width K (queries, keys and values alike):

    q, k, v  = SiLU(ShortConv_4(W_{q,k,v} x)),   q, k <- q, k * rsqrt(|.|^2 + 1e-6)   (L2 norm per head)
    beta_t   = sigmoid(w_b . x_t + b_b) + 1e-6       input gate: the op scales k and v by it (1 without it)
    alpha_t  = sigmoid(w_a . x_t + b_a)              alpha connection (without it alpha = 1: pure ridge readout)
    g_t      = -exp(A_log) softplus(w_g . x_t + dt_bias)   Mamba2-style forgetting gate (0 without it)
    H_t      = e^{g_t} H_{t-1} + k_t k_t^T,   U_t = e^{g_t} U_{t-1} + k_t v_t^T     (k, v scaled by beta_t)
    x_t      ~ (H_t + ridge ||H_t||_F I)^{-1} q_t      by ``iters`` Chebyshev steps
    o_t      = U_t^T (q_t + alpha_t (x_t - q_t)) / sqrt(K)
    y_t      = W_o (RMSNorm(o_t) * SiLU(W_o_gate x_t))  (RMSNorm(o_t) alone without the output gate)

The recurrence is the op ``linmix.ops.gated_kalman``; its one-token step ``gated_kalman_step`` decodes.

Initialisation: projections and short-conv filters N(0, 0.02^2), gate biases 0, A_log = log U(0, 16)
(GKA's range, spec §5 item 9; GDN's starts at 1), dt_bias the softplus inverse of a log-uniform dt in
[1e-3, 0.1] floored at 1e-4. A_log and dt_bias take no weight decay.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from linmix.layers.base import Mixer, check_head_config, check_mixer_input, init_linear_layers
from linmix.layers.delta import INIT_STD, bench_config, log_uniform_a_log, mamba_dt_bias, mamba_log_decay
from linmix.layers.norms import RMSNorm
from linmix.layers.registry import register_mixer
from linmix.layers.short_conv import ShortConv
from linmix.ops import gated_kalman, gated_kalman_step

L2_EPS = 1e-6  # fla's form of the q/k L2 norm: x * rsqrt(sum x^2 + eps) (spec §5 item 4)
BETA_FLOOR = 1e-6  # keys and values are scaled by beta + 1e-6 (spec §2 item 3)


@dataclass
class GKAConfig:
    """Gated KalmaNet's settings.

    Attributes:
        d_model: model width d.
        n_heads: H, the heads (queries, keys and values alike).
        head_dim: K, the query, key and value width per head; None means d_model // n_heads.
        ridge: the adaptive ridge ratio a, lambda_t = a ||H_t||_F (0.02 in the paper; the solve's
            condition number is at most (1 + a) / a).
        iters: Chebyshev steps per position (30 in the paper).
        use_forget_gate: the Mamba2-style decay of H and U; without it g = 0 (no forgetting).
        use_alpha: the learned alpha connection; without it alpha = 1, the pure ridge readout (the
            reference code's "no alpha connection", spec §2 "Readout").
        use_beta_gate: the input gate scaling keys and values by sigmoid(.) + 1e-6; without it beta = 1
            (the paper's runs).
        use_gate: output gate, RMSNorm(o) * SiLU(W_g x); without it RMSNorm(o) alone.
        conv_size: the width of the short convolutions on q, k and v.
        norm_eps: epsilon of the output RMSNorm (inside the square root).
        backend: backend of ``linmix.ops.gated_kalman`` ("auto", "naive", "exact", "chunk", ...).
        context_length: filled in by the models and benchmarks like every mixer's; the recurrence
            itself has no window, so it bounds nothing.
    """

    d_model: int
    n_heads: int = 4
    head_dim: int | None = None
    ridge: float = 0.02
    iters: int = 30
    use_forget_gate: bool = True
    use_alpha: bool = True
    use_beta_gate: bool = True
    use_gate: bool = True
    conv_size: int = 4
    norm_eps: float = 1e-6
    backend: str = "auto"
    context_length: int = 256

    def __post_init__(self):
        check_head_config(self)
        if not (math.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"ridge must be a finite number > 0 (lambda = ridge * ||H||_F), got {self.ridge}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be an int >= 0 (Chebyshev steps), got {self.iters!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def key_head_dim(self) -> int:
        """K."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + 1e-6) over the last dim, computed in at least float32. [..., K] -> [..., K]"""
    x_float = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x_float * torch.rsqrt(x_float.pow(2).sum(dim=-1, keepdim=True) + L2_EPS)).to(x.dtype)


@register_mixer(
    "gka", GKAConfig,
    test_configs={
        "two_heads": {"n_heads": 2},
        "ridge_readout_plain": {"n_heads": 1, "head_dim": 8, "use_forget_gate": False, "use_alpha": False,
                                "use_beta_gate": False, "use_gate": False, "iters": 12, "backend": "naive"},
    },
    bench_config=bench_config, backend_field="backend", backend_op="gated_kalman",
)
class GatedKalmaNet(Mixer):
    """Gated KalmaNet: readout of the decayed ridge regression of values on keys.

    The decoding state is ``{"recurrent": (H [B, H, K, K], U [B, H, K, K]), "conv": the short
    convolutions' last W - 1 inputs [B, W-1, 3HK]}``; H and U are float32 (float64 for a float64 model).
    """

    def __init__(self, config: GKAConfig):
        super().__init__()
        self.config = config
        d, H, K = config.d_model, config.n_heads, config.key_head_dim
        self.qkv_proj = nn.Linear(d, 3 * H * K, bias=False)
        self.conv = ShortConv(3 * H * K, config.conv_size, init_std=INIT_STD)
        # One projection, with biases, for the sigmoid gates: beta, then alpha.
        self.gate_names = tuple(name for name, on in (("beta", config.use_beta_gate), ("alpha", config.use_alpha))
                                if on)
        self.gate_proj = nn.Linear(d, len(self.gate_names) * H) if self.gate_names else None
        self.decay_proj = None
        if config.use_forget_gate:
            self.decay_proj = nn.Linear(d, H, bias=False)
            self.A_log = nn.Parameter(log_uniform_a_log(H, 0.0))
            self.dt_bias = nn.Parameter(mamba_dt_bias(H))
            self.no_weight_decay = ("A_log", "dt_bias")
        self.o_norm = RMSNorm(K, eps=config.norm_eps)
        self.o_gate_proj = nn.Linear(d, H * K, bias=False) if config.use_gate else None
        self.o_proj = nn.Linear(H * K, d, bias=False)
        init_linear_layers(self, INIT_STD)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict:
        """The state before position 0: zero H and U and zero conv inputs."""
        H, K = self.config.n_heads, self.config.key_head_dim
        state_dtype = torch.promote_types(dtype, torch.float32)
        gram = torch.zeros(batch_size, H, K, K, device=device, dtype=state_dtype)
        return {"recurrent": (gram, torch.zeros_like(gram)), "conv": self.conv.init_cache(batch_size, device, dtype)}

    def _qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., 3HK] after the convolution -> L2-normalised q, k and v, each [..., H, K]."""
        q, k, v = qkv.unflatten(-1, (3, self.config.n_heads, self.config.key_head_dim)).unbind(-3)
        return l2_normalize(q), l2_normalize(k), v

    def _gates(self, x: torch.Tensor) -> dict:
        """The op's per-head gates at every position of x [..., d]: g [..., H] (float32 or wider), beta
        [..., H] and alpha ([..., H] or None)."""
        H = self.config.n_heads
        parts = {}
        if self.gate_proj is not None:
            parts = dict(zip(self.gate_names, torch.sigmoid(self.gate_proj(x)).split(H, dim=-1)))
        beta = parts["beta"] + BETA_FLOOR if "beta" in parts else x.new_ones(*x.shape[:-1], H)
        if self.decay_proj is not None:
            g = mamba_log_decay(self.decay_proj(x), self.A_log, self.dt_bias)  # [..., H]
        else:
            g = x.new_zeros(*x.shape[:-1], H, dtype=torch.promote_types(x.dtype, torch.float32))
        return {"g": g, "beta": beta, "alpha": parts.get("alpha")}

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """W_o (RMSNorm(o) * SiLU(W_g x)): o [..., H, K], x [..., d] -> [..., d]."""
        o = self.o_norm(o)
        if self.o_gate_proj is not None:
            o = o * F.silu(self.o_gate_proj(x).unflatten(-1, (self.config.n_heads, self.config.key_head_dim)))
        return self.o_proj(o.flatten(-2))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """x [B, T, d] -> (y [B, T, d], state). With state=None no state is returned."""
        check_mixer_input(x, 3, self.config.d_model)
        cfg = self.config
        qkv, conv_cache = self.conv(self.qkv_proj(x), None if state is None else state["conv"])  # [B, T, 3HK]
        q, k, v = self._qkv(qkv)  # [B, T, H, K] each
        o, recurrent = gated_kalman(
            q, k, v, **self._gates(x), ridge=cfg.ridge, iters=cfg.iters,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=state is not None,
            backend=cfg.backend,
            check_values=False,  # the gates are in range by construction and H comes from the op
        )  # o [B, T, H, K]
        y = self._output(o, x)
        if state is None:
            return y, None
        return y, {"recurrent": recurrent, "conv": conv_cache}

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Decode one position in O(iters H K^2) time and O(H K^2) memory: x_t [B, d] -> (y_t [B, d], state)."""
        check_mixer_input(x_t, 2, self.config.d_model)
        cfg = self.config
        qkv, conv_cache = self.conv.step(self.qkv_proj(x_t), state["conv"])  # [B, 3HK]
        q, k, v = self._qkv(qkv)  # [B, H, K] each
        o, recurrent = gated_kalman_step(q, k, v, **self._gates(x_t), ridge=cfg.ridge, iters=cfg.iters,
                                         state=state["recurrent"])  # o [B, H, K]
        return self._output(o, x_t), {"recurrent": recurrent, "conv": conv_cache}
