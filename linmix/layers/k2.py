"""The K-Operators K2 token mixer.

For a normalised input x [B, T, d] (the block's pre-norm output) the mixer returns
`W_o m + b_o` with

    m = sigmoid(beta) * Kbase(x)  +  alpha * sum_j q_j(t) S_j(t),
    S_j(t) = gamma_j S_j(t-1) + k_j(t) x(t),

q = l2norm(x U), k = l2norm(x V) over the r rank channels, gamma_j in (gamma_min, gamma_max)
learned per rank channel, and alpha = alpha_cap * sigmoid(a). The decay path is single-head
gated linear attention with key dim r, value dim d and scale 1 (`linmix.ops.decayed_attention`).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from linmix.layers.base import Mixer
from linmix.layers.kbase import BaseKernel
from linmix.layers.registry import register_mixer
from linmix.ops import decayed_attention, decayed_attention_step

KBASE_MODES = ("per_layer", "shared", "none", "toeplitz")
GAMMA_INITS = ("v1", "v2")


@dataclass
class K2Config:
    """Configuration of one K2 mixer.

    kbase: "per_layer" (own dense [W, W] kernel), "shared" (dense kernel owned by the stack and
    passed in), "toeplitz" ([L] filter; own unless one is passed in), or "none" (no kernel, no gate).
    gamma_init: "v1" (paper 1 code: sigmoid(theta) in [0.95, 0.995], so gamma starts near 1) or
    "v2" (paper 2: gamma itself starts evenly in [0.95, 0.995]).
    """

    d_model: int
    rank: int = 32
    context_length: int = 256
    kbase: str = "per_layer"
    kbase_taps: int = 8
    kbase_init_decay: float = 0.15
    gamma_min: float = 0.15
    gamma_max: float = 0.995
    gamma_init: str = "v2"
    alpha_cap: float = 0.95
    gate_init: float = 8.0
    gate_floor: float = 0.0
    decay_backend: str = "auto"

    def __post_init__(self):
        if self.kbase not in KBASE_MODES:
            raise ValueError(f"kbase must be one of {KBASE_MODES}, got {self.kbase!r}")
        if self.gamma_init not in GAMMA_INITS:
            raise ValueError(f"gamma_init must be one of {GAMMA_INITS}, got {self.gamma_init!r}")
        if not 0.0 <= self.gamma_min < self.gamma_max <= 1.0:
            raise ValueError(
                f"need 0 <= gamma_min < gamma_max <= 1, got gamma_min={self.gamma_min}, gamma_max={self.gamma_max}"
            )
        if not 0.0 <= self.gate_floor < 1.0:
            raise ValueError(f"gate_floor must be in [0, 1), got {self.gate_floor}")
        for name in ("d_model", "rank", "context_length", "kbase_taps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def initial_decay_logits(config: K2Config) -> torch.Tensor:
    """theta [r] so that gamma = gamma_min + (gamma_max - gamma_min) sigmoid(theta) follows the paper's init."""
    if config.gamma_init == "v1":
        return torch.logit(torch.linspace(0.95, 0.995, config.rank, dtype=torch.float64)).float()
    lo = max(config.gamma_min + 1e-4, 0.95)
    hi = min(config.gamma_max - 1e-4, 0.995)
    target = torch.linspace(lo, hi, config.rank, dtype=torch.float64)
    unit = (target - config.gamma_min) / (config.gamma_max - config.gamma_min)
    return torch.logit(unit).float()


@register_mixer(
    "k2",
    K2Config,
    test_configs={
        "dense_per_layer_kbase": {"rank": 6, "kbase": "per_layer"},
        "toeplitz_kbase": {"rank": 6, "kbase": "toeplitz", "kbase_taps": 4},
        "no_kbase_chunk": {"rank": 6, "kbase": "none", "decay_backend": "chunk"},
    },
    bench_config=lambda d_model: {"rank": 32, "kbase": "toeplitz", "kbase_taps": 16},
    backend_field="decay_backend",
    backend_op="decayed_attention",
)
class K2Mixer(Mixer):
    """K2 mixer: gated base kernel plus a rank-r gamma-decayed recurrence, then an output projection.

    Args:
        config: the mixer's K2Config.
        kernel: a BaseKernel shared with other layers (kbase="shared", or "toeplitz" shared);
            None builds the layer's own kernel where the mode needs one.
    """

    no_weight_decay = ("decay_logits", "alpha_logit", "gate_logit")

    def __init__(self, config: K2Config, kernel: BaseKernel | None = None):
        super().__init__()
        self.config = config
        d, r = config.d_model, config.rank
        if config.kbase == "shared" and kernel is None:
            raise ValueError("kbase='shared' needs the stack's shared BaseKernel passed as `kernel`")
        if config.kbase == "none" and kernel is not None:
            raise ValueError("kbase='none' takes no kernel")
        if kernel is None and config.kbase == "per_layer":
            kernel = BaseKernel("dense", config.context_length, config.kbase_init_decay)
        if kernel is None and config.kbase == "toeplitz":
            kernel = BaseKernel("toeplitz", config.kbase_taps, config.kbase_init_decay)
        self.kernel = kernel
        self.gate_logit = nn.Parameter(torch.tensor(config.gate_init)) if kernel is not None else None
        self.query_proj = nn.Parameter(torch.randn(d, r) * 0.05)  # U [d, r]
        self.key_proj = nn.Parameter(torch.randn(d, r) * 0.05)  # V [d, r]
        self.decay_logits = nn.Parameter(initial_decay_logits(config))  # theta [r]
        self.alpha_logit = nn.Parameter(torch.zeros(()))
        self.out_proj = nn.Linear(d, d)
        # Sums of squared Frobenius norms of (base path, decay path, their sum) over evaluation
        # forwards, read and reset by `path_shares`.
        self.register_buffer("eval_path_sq_norms", torch.zeros(3), persistent=False)

    @property
    def window(self) -> float:
        """Longest sequence the mixer can process (inf unless it has a dense Kbase)."""
        if self.kernel is not None and self.kernel.form == "dense":
            return self.kernel.size
        return math.inf

    def gamma(self) -> torch.Tensor:
        """Decay per rank channel, float32. [r]"""
        cfg = self.config
        return cfg.gamma_min + (cfg.gamma_max - cfg.gamma_min) * torch.sigmoid(self.decay_logits.float())

    def log_gamma(self) -> torch.Tensor:
        """Natural log of the decay, computed stably in float32. [r]"""
        cfg = self.config
        if cfg.gamma_max == 1.0:
            # log(1 - (1 - gamma_min) * sigmoid(-theta)) keeps precision as gamma -> 1.
            return torch.log1p(-(1.0 - cfg.gamma_min) * torch.sigmoid(-self.decay_logits.float()))
        return torch.log(self.gamma())

    def alpha(self) -> torch.Tensor:
        """Decay-path gain alpha = alpha_cap * sigmoid(a)."""
        return self.config.alpha_cap * torch.sigmoid(self.alpha_logit)

    def gate(self) -> torch.Tensor | None:
        """Kbase gate g = floor + (1 - floor) sigmoid(beta); None without a kernel."""
        if self.gate_logit is None:
            return None
        floor = self.config.gate_floor
        return floor + (1.0 - floor) * torch.sigmoid(self.gate_logit)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict:
        """Empty decoding state: the position, the decay path's state and the Kbase's (its input history)."""
        d, r = self.config.d_model, self.config.rank
        state = {"position": 0, "decay": torch.zeros(batch_size, 1, r, d, device=device, dtype=torch.float32)}
        if self.kernel is not None:
            state["history"] = self.kernel.init_state(batch_size, d, device, dtype)
        return state

    def _check(self, x: torch.Tensor, start: int, length: int) -> None:
        """Raise ValueError for an input of the wrong width or one reaching past the dense Kbase window."""
        if x.shape[-1] != self.config.d_model:
            raise ValueError(f"x must be [B, T, {self.config.d_model}] (or [B, {self.config.d_model}] for a step), "
                             f"got {list(x.shape)}")
        if start + length > self.window:
            raise ValueError(
                f"sequence reaches position {start + length - 1}, beyond the dense Kbase window W={self.window}"
            )

    def _queries_and_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q = l2norm(x U) and k = l2norm(x V) over the rank channels: [..., r] each."""
        q = F.normalize(x @ self.query_proj.to(x.dtype), dim=-1, eps=1e-8)
        k = F.normalize(x @ self.key_proj.to(x.dtype), dim=-1, eps=1e-8)
        return q, k

    def paths(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor | None, torch.Tensor, dict | None]:
        """The two mixing paths before the output projection.

        Args:
            x: [B, T, d] normalised input.
            state: decoding state from `init_state`/a previous call, or None to start at position 0.
        Returns:
            (gated base [B, T, d] or None, scaled decay [B, T, d], new state or None when state was None).
        """
        start = 0 if state is None else state["position"]
        self._check(x, start, x.shape[1])
        q, k = self._queries_and_keys(x)  # [B, T, r]
        decay_out, decay_state = decayed_attention(
            q[:, :, None],
            k[:, :, None],
            x[:, :, None],
            self.log_gamma()[None],  # [1, r]
            scale=1.0,
            initial_state=None if state is None else state["decay"],
            output_final_state=state is not None,
            backend=self.config.decay_backend,
            check_values=False,  # log_gamma() lies in [log gamma_min, log gamma_max] by construction
        )
        decay = self.alpha().to(x.dtype) * decay_out[:, :, 0]  # [B, T, d]
        new_state = None if state is None else {"position": start + x.shape[1], "decay": decay_state}
        if self.kernel is None:
            return None, decay, new_state
        base, history = self.kernel(x, None if state is None else state["history"])  # [B, T, d]
        if new_state is not None:
            new_state["history"] = history
        return self.gate().to(x.dtype) * base, decay, new_state

    def _mix(self, base: torch.Tensor | None, decay: torch.Tensor) -> torch.Tensor:
        """``W_o m + b_o`` of the mixed paths; evaluation forwards add their norms to `eval_path_sq_norms`."""
        mixed = decay if base is None else base + decay
        if not self.training and base is not None:
            with torch.no_grad():
                norms = torch.stack([base.float().square().sum(), decay.float().square().sum(), mixed.float().square().sum()])
                self.eval_path_sq_norms.add_(norms)
        return self.out_proj(mixed)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """x [B, T, d] -> (y [B, T, d], state). With state=None no state is returned."""
        base, decay, new_state = self.paths(x, state)
        return self._mix(base, decay), new_state

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Decode one token: x_t [B, d] -> (y_t [B, d], state), through the ops' one-token steps."""
        self._check(x_t, state["position"], 1)
        q, k = self._queries_and_keys(x_t)  # [B, r]
        decay_out, decay_state = decayed_attention_step(
            q[:, None], k[:, None], x_t[:, None], self.log_gamma()[None], state["decay"], scale=1.0
        )
        decay = self.alpha().to(x_t.dtype) * decay_out[:, 0]  # [B, d]
        new_state = {"position": state["position"] + 1, "decay": decay_state}
        base = None
        if self.kernel is not None:
            base, new_state["history"] = self.kernel.step(x_t, state["history"])
            base = self.gate().to(x_t.dtype) * base
        return self._mix(base, decay), new_state

    def path_shares(self) -> dict[str, float] | None:
        """Kbase norm share over the evaluation forwards since the last call, then reset.

        Returns `{"kbase_share": |gKx| / (|gKx| + |aAx|), "kbase_to_mix": |gKx| / |m|}` with
        Frobenius norms summed over all evaluated tokens, or None without a kernel or data.
        """
        base_sq, decay_sq, mixed_sq = self.eval_path_sq_norms.sqrt().tolist()
        self.eval_path_sq_norms.zero_()
        if self.kernel is None or mixed_sq == 0.0:
            return None
        return {"kbase_share": base_sq / (base_sq + decay_sq), "kbase_to_mix": base_sq / mixed_sq}
