"""Structured generalized linear mixing: ``y = (I - B)^{-1} diag(alpha) x`` per head over a sparse
pattern of past outputs (spec/structured_mixing.md §2, §3, §5.3).

For a normalised input u [B, T, d], with H heads of width K:

    q, k, v   = W_{q,k,v} u                  (then ShortConv_W, no activation, with use_short_conv)
    slots(t)  = {direct: t} ∪ {level j: p = t - f(j) >= 0}          f: the pattern's offsets
    coefficients, from u only (never from y, so the map stays linear and the op's solve applies):
      slot_softmax:      (alpha_t, beta_{t,.}) = softmax over the valid slots of
                         <q_t, k_t> / sqrt(K) + b_dir  and  <q_t, k_p> / sqrt(K) + b_j
                         (every row of A + B sums to 1: M is row-stochastic, outputs are convex
                         combinations of values)
      normalized_gates:  alpha_t = sigmoid(r_0), beta_{t,j} = sigmoid(r_j) (tanh(r_j) if signed),
                         r = W_r u_t + b_r, invalid levels zeroed, then all divided by
                         max(1, alpha_t + sum_j |beta_{t,j}|)     (total L1 <= 1: non-expansive)
    y_t       = alpha_t x_t + sum_j beta_{t,j} y_{t - f(j)}     the op ``linmix.ops.structured_mix``
      readout "direct": x = v and o_t = y_t                      (vector-valued GLR, §2.2 reading 1)
      readout "kernel": x = k ⊗ v and o_t = y_t^T q_t / sqrt(K)  (state-valued GLR, §2.2 reading 2)
    out_t     = W_o RMSNorm(o_t)

For a lattice pattern p = the position level j reads at t (``Lattice.index_table``), which depends on
t's absolute position: the state then carries it, and the keys of the positions the levels read sit
in a shift register laid out as the op's. Levels before position 0 are masked out of the
coefficients (spec A13). The level biases b start at
0 (§4.3); positions enter through them (the offset of a level is fixed), there is no RoPE. Short
convolutions are off by default (§4.3 isolates B). The level biases take no weight decay.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from linmix.layers.base import Mixer, check_head_config, check_mixer_input, init_linear_layers
from linmix.layers.delta import INIT_STD
from linmix.layers.norms import RMSNorm
from linmix.layers.registry import register_mixer
from linmix.layers.short_conv import ShortConv
from linmix.ops import structured_mix, structured_mix_step
from linmix.ops.structured_mix import as_pattern
from linmix.ops.structured_mix.patterns import (
    Lattice,
    Offsets,
    dense_window,
    first_order,
    kth_order,
    levels_below,
    powers_of_two,
    squares_plus_one,
)

PATTERNS = ("first_order", "kth_order", "pow2", "sq1", "dense", "pow2_lattice", "sq1_lattice")
COEFFICIENTS = ("slot_softmax", "normalized_gates")
READOUTS = ("direct", "kernel")


def default_pattern_size(pattern: str, context_length: int) -> int:
    """The pattern's size at context length n (spec §3.1 and §4.3): the levels with ``f(k) < n`` for
    ``2^k`` and ``k^2 + 1`` (and their lattices), the order ``ceil(log2 n)`` for the k-th order
    recurrence, the window ``n - 1`` for the dense one; at least 1."""
    if pattern in ("pow2", "pow2_lattice"):
        size = levels_below(lambda k: 2**k, context_length)
    elif pattern in ("sq1", "sq1_lattice"):
        size = levels_below(lambda k: k * k + 1, context_length)
    elif pattern == "kth_order":
        size = math.ceil(math.log2(context_length)) if context_length > 1 else 1
    else:  # dense
        size = context_length - 1
    return max(1, size)


def build_pattern(pattern: str, size: int | None) -> Offsets | Lattice:
    """The pattern object called ``pattern`` (one of ``PATTERNS``) with its size (None for first_order)."""
    if pattern == "first_order":
        return first_order()
    base = {"kth_order": kth_order, "pow2": powers_of_two, "sq1": squares_plus_one, "dense": dense_window,
            "pow2_lattice": powers_of_two, "sq1_lattice": squares_plus_one}[pattern](size)
    return Lattice.of(base) if pattern.endswith("_lattice") else base


@dataclass
class StructuredConfig:
    """The structured mixer's settings.

    Attributes:
        d_model: model width d.
        n_heads: H.
        head_dim: K, the query, key and value width per head; None means d_model // n_heads.
        pattern: the support of B: "first_order" (offset 1, the diagonal SSM), "kth_order" (1..order),
            "pow2" (2^j), "sq1" (j^2 + 1), "dense" (every one of the last window outputs), or the
            cache-efficient "pow2_lattice" and "sq1_lattice" (spec §3.4), which the op must accept.
        pattern_size: the order (kth_order), the number of levels (pow2, sq1 and their lattices) or the
            window (dense); None chooses it from context_length (``default_pattern_size``); must be
            None for first_order.
        coefficients: "slot_softmax" (a joint softmax over the direct slot and the levels, spec §5.3)
            or "normalized_gates" (sigmoid gates, L1-normalised to a total of at most 1).
        signed: normalized_gates only: tanh gates on the levels, so that beta can be negative (parity,
            S5; spec §4.3, A12).
        readout: "direct" (the head output is y) or "kernel" (y is a K x K state fed with k ⊗ v,
            read by q; memory T K^2 per head).
        use_short_conv: a causal depthwise convolution (no activation) on q, k and v.
        conv_size: its width.
        norm_eps: epsilon of the per-head output RMSNorm.
        backend: backend of ``linmix.ops.structured_mix`` ("auto", "naive", "dense", "chunk").
        context_length: filled in by the models and benchmarks; it picks the pattern's size when
            pattern_size is None. The recurrence has no window: longer sequences use the same levels.
    """

    d_model: int
    n_heads: int = 4
    head_dim: int | None = None
    pattern: str = "pow2"
    pattern_size: int | None = None
    coefficients: str = "slot_softmax"
    signed: bool = False
    readout: str = "direct"
    use_short_conv: bool = False
    conv_size: int = 4
    norm_eps: float = 1e-6
    backend: str = "auto"
    context_length: int = 256

    def __post_init__(self):
        check_head_config(self)
        for name, choices in (("pattern", PATTERNS), ("coefficients", COEFFICIENTS), ("readout", READOUTS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.pattern == "first_order" and self.pattern_size is not None:
            raise ValueError(f"pattern_size must be None for the first_order pattern, got {self.pattern_size}")
        if self.pattern_size is not None and (isinstance(self.pattern_size, bool) or self.pattern_size < 1):
            raise ValueError(f"pattern_size must be an int >= 1 or None, got {self.pattern_size!r}")
        if self.signed and self.coefficients != "normalized_gates":
            raise ValueError("signed=True needs coefficients='normalized_gates' (a softmax is non-negative)")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        try:
            as_pattern(self.pattern_object)
        except ValueError as error:
            raise ValueError(f"pattern {self.pattern!r} is not supported by linmix.ops.structured_mix: {error}") \
                from None

    @property
    def key_head_dim(self) -> int:
        """K."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def pattern_object(self) -> Offsets | Lattice:
        """The op's pattern: ``pattern`` at ``pattern_size`` (or the context length's default size)."""
        size = None
        if self.pattern != "first_order":
            size = self.pattern_size or default_pattern_size(self.pattern, self.context_length)
        return build_pattern(self.pattern, size)


def bench_config(d_model: int) -> dict:
    """The benchmark's and the synthetic tasks' heads at width d: heads of width 32 (spec §4.3: 4 at 128)."""
    return {"n_heads": max(1, d_model // 32)}


@register_mixer(
    "structured", StructuredConfig,
    test_configs={
        "softmax_pow2": {"n_heads": 2, "pattern": "pow2", "use_short_conv": True},
        "softmax_sq1_kernel": {"n_heads": 2, "head_dim": 4, "pattern": "sq1", "pattern_size": 3,
                               "readout": "kernel", "backend": "naive"},
        "gates_signed_order3": {"n_heads": 2, "pattern": "kth_order", "pattern_size": 3,
                                "coefficients": "normalized_gates", "signed": True, "backend": "dense"},
        "gates_first_order": {"n_heads": 1, "pattern": "first_order", "coefficients": "normalized_gates"},
        "softmax_pow2_lattice": {"n_heads": 2, "pattern": "pow2_lattice", "use_short_conv": True},
        "gates_signed_sq1_lattice_kernel": {"n_heads": 2, "head_dim": 4, "pattern": "sq1_lattice",
                                            "coefficients": "normalized_gates", "signed": True, "readout": "kernel"},
    },
    bench_config=bench_config, backend_field="backend", backend_op="structured_mix",
)
class StructuredMixer(Mixer):
    """Generalized linear recurrence over a structured pattern of past outputs, coefficients from the input.

    The decoding state is ``{"mix": the op's state, the last S outputs [B, H, S, Dx] (Dx = K, or K^2
    with the kernel readout), float32 (float64 for a float64 model); "keys": the last S keys [B, S, H,
    K] (slot_softmax only); "seen": which of the last S positions exist [B, S] (bool); "conv": the short
    convolutions' last W - 1 inputs [B, W-1, C] (with use_short_conv only)}``, S the largest offset.
    For a lattice pattern "mix" is the op's ``(slots [B, H, L, Dx], position [B] int64)``, "keys" the
    keys of the slots' positions [B, L, H, K], and there is no "seen" (the position says which levels
    exist).
    """

    def __init__(self, config: StructuredConfig):
        super().__init__()
        self.config = config
        self.pattern = config.pattern_object
        d, H, K, L = config.d_model, config.n_heads, config.key_head_dim, self.pattern.levels
        self.softmax = config.coefficients == "slot_softmax"
        self.uses_qk = self.softmax or config.readout == "kernel"
        self.proj_sizes = (2 * H * K if self.uses_qk else 0) + H * K
        self.qkv_proj = nn.Linear(d, self.proj_sizes, bias=False)
        self.conv = ShortConv(self.proj_sizes, config.conv_size, "identity", INIT_STD) if config.use_short_conv \
            else None
        if self.softmax:
            self.slot_bias = nn.Parameter(torch.zeros(H, 1 + L))  # [H, 1 + L]: b_dir, then b_j per level
            self.no_weight_decay = ("slot_bias",)
        else:
            self.gate_proj = nn.Linear(d, H * (1 + L))  # r_0 (direct), then r_j per level, per head
        self.o_norm = RMSNorm(K, eps=config.norm_eps)
        self.o_proj = nn.Linear(H * K, d, bias=False)
        init_linear_layers(self, INIT_STD)

    @property
    def mix_width(self) -> int:
        """Dx, the width of what the op mixes per head: K (direct readout) or K^2 (kernel readout)."""
        K = self.config.key_head_dim
        return K * K if self.config.readout == "kernel" else K

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict:
        """The state before position 0: zero outputs (or slots at position 0), zero keys, zero conv inputs."""
        H, K = self.config.n_heads, self.config.key_head_dim
        state_dtype = torch.promote_types(dtype, torch.float32)
        if isinstance(self.pattern, Lattice):
            S = self.pattern.levels  # one slot per level
            slots = torch.zeros(batch_size, H, S, self.mix_width, device=device, dtype=state_dtype)
            state = {"mix": (slots, torch.zeros(batch_size, device=device, dtype=torch.int64))}
        else:
            S = self.pattern.max_offset  # the last S positions
            state = {"mix": torch.zeros(batch_size, H, S, self.mix_width, device=device, dtype=state_dtype),
                     "seen": torch.zeros(batch_size, S, device=device, dtype=torch.bool)}
        if self.softmax:
            state["keys"] = torch.zeros(batch_size, S, H, K, device=device, dtype=dtype)
        if self.conv is not None:
            state["conv"] = self.conv.init_cache(batch_size, device, dtype)
        return state

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """[..., C] -> q, k (None when unused) and v, each [..., H, K]."""
        heads = qkv.unflatten(-1, (-1, self.config.n_heads, self.config.key_head_dim))  # [..., 1 or 3, H, K]
        if not self.uses_qk:
            return None, None, heads[..., 0, :, :]
        q, k, v = heads.unbind(-3)
        return q, k, v

    def _coefficients(self, u: torch.Tensor, q: torch.Tensor | None, k: torch.Tensor | None,
                      past_keys: list[torch.Tensor] | None, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha [..., H] and beta [..., H, L] at every position of u [..., d].

        Args:
            u: the layer input.
            q, k: [..., H, K] (slot_softmax), else None.
            past_keys: per level j, the keys at the positions it reads, [..., H, K] (slot_softmax), else None.
            valid: [..., L] bool, whether level j's position exists.
        """
        H, L = self.config.n_heads, self.pattern.levels
        valid = valid[..., None, :]  # [..., 1, L]
        if self.softmax:
            scale = self.config.key_head_dim ** -0.5
            dots = [(q * k).sum(-1)] + [(q * key).sum(-1) for key in past_keys]  # 1 + L of [..., H]
            logits = torch.stack(dots, dim=-1) * scale + self.slot_bias  # [..., H, 1 + L]
            allowed = torch.cat([torch.ones_like(valid[..., :1]), valid], dim=-1)  # [..., 1, 1 + L]
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the softmax in float32 or wider
            weights = torch.softmax(wide.masked_fill(~allowed, -math.inf), dim=-1).to(logits.dtype)
            return weights[..., 0], weights[..., 1:]
        r = self.gate_proj(u).unflatten(-1, (H, 1 + L))  # [..., H, 1 + L]
        alpha = torch.sigmoid(r[..., 0])  # [..., H]
        beta = torch.tanh(r[..., 1:]) if self.config.signed else torch.sigmoid(r[..., 1:])  # [..., H, L]
        beta = beta * valid
        total = alpha + beta.abs().sum(-1)  # [..., H]
        shrink = 1.0 / total.clamp_min(1.0)
        return alpha * shrink, beta * shrink[..., None]

    def _values(self, k: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """What the op mixes: v [..., H, K], or k ⊗ v flattened [..., H, K^2] with the kernel readout."""
        if self.config.readout == "kernel":
            return (k[..., :, None] * v[..., None, :]).flatten(-2)
        return v

    def _output(self, y: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """W_o RMSNorm(o): y [..., H, Dx] (and q [..., H, K] for the kernel readout) -> [..., d]."""
        if self.config.readout == "kernel":
            K = self.config.key_head_dim
            y = torch.einsum("...hk,...hkv->...hv", q * K ** -0.5, y.unflatten(-1, (K, K)))  # [..., H, K]
        return self.o_proj(self.o_norm(y).flatten(-2))

    def _offset_reads(self, state: dict, k: torch.Tensor | None,
                      length: int) -> tuple[torch.Tensor, list[torch.Tensor] | None, dict]:
        """What the levels of an offset pattern read in a call of ``length`` positions from ``state``.

        Returns:
            ``valid [B, T, L]`` (whether level j's position exists), the keys at the positions the levels
            read (L of ``[B, T, H, K]``; None without slot_softmax), and the state's "seen" and "keys" after the call.
        """
        S, offsets = self.pattern.max_offset, self.pattern.offsets
        seen = torch.cat([state["seen"], state["seen"].new_ones(state["seen"].shape[0], length)], dim=1)  # [B, S + T]
        valid = torch.stack([seen[:, S - f: S - f + length] for f in offsets], dim=-1)  # [B, T, L]
        after = {"seen": seen[:, length:]}
        if not self.softmax:
            return valid, None, after
        keys = torch.cat([state["keys"].to(k.dtype), k], dim=1)  # [B, S + T, H, K]: positions -S .. T-1
        after["keys"] = keys[:, length:]
        return valid, [keys[:, S - f: S - f + length] for f in offsets], after

    def _lattice_reads(self, state: dict | None, k: torch.Tensor | None, batch: int, length: int,
                       device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor] | None, dict]:
        """``_offset_reads`` for a lattice pattern: the rows of ``[key slots; the call's keys]`` each level
        reads, from the closed form (``index_table``) at position 0, else from ``Lattice.sources`` at the
        state's absolute position (the row after the last token gives the new key slots)."""
        if state is None:  # no key slots before position 0: rows are positions of the call
            idx = self.pattern.index_table(length, device)  # [T, L], -1 for a level not reached
            rows, present = idx.clamp_min(0).expand(batch, -1, -1), (idx >= 0).expand(batch, -1, -1)
            keys = k
        else:
            rows, present = self.pattern.sources(state["mix"][1], length)  # [B, T + 1, L] each
            keys = torch.cat([state["keys"].to(k.dtype), k], dim=1) if self.softmax else None  # [B, L + T, H, K]
        if not self.softmax:
            return present[:, :length], None, {}
        read = keys[torch.arange(batch, device=device)[:, None, None], rows]  # [B, T (+ 1), L, H, K]
        after = {} if state is None else {"keys": read[:, length]}
        return present[:, :length], list(read[:, :length].unbind(2)), after

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """x [B, T, d] -> (y [B, T, d], state). With state=None no state is returned."""
        check_mixer_input(x, 3, self.config.d_model)
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, T, C]
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv, None if state is None else state["conv"])
        q, k, v = self._split(qkv)  # [B, T, H, K] each (q, k None without slot_softmax or the kernel readout)
        returns_state = state is not None
        if isinstance(self.pattern, Lattice):
            valid, past_keys, next_keys = self._lattice_reads(state, k, batch, length, x.device)
        else:
            state = self.init_state(batch, x.device, x.dtype) if state is None else state
            valid, past_keys, next_keys = self._offset_reads(state, k, length)
        alpha, beta = self._coefficients(x, q, k, past_keys, valid)  # [B, T, H], [B, T, H, L]
        xs = self._values(k, v)  # [B, T, H, Dx]
        y, mix = structured_mix(
            xs, alpha.to(xs.dtype), beta.to(xs.dtype), pattern=self.pattern,
            initial_state=state["mix"] if returns_state else None, output_final_state=returns_state,
            backend=self.config.backend,
        )  # y [B, T, H, Dx]
        out = self._output(y, q)
        if not returns_state:
            return out, None
        new_state = {"mix": mix, **next_keys}
        if self.conv is not None:
            new_state["conv"] = conv_cache
        return out, new_state

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Decode one position in O(L H K) time (O(L H K^2) with the kernel readout) from the last S
        outputs: x_t [B, d] -> (y_t [B, d], state)."""
        check_mixer_input(x_t, 2, self.config.d_model)
        qkv = self.qkv_proj(x_t)  # [B, C]
        new_state = {}
        if self.conv is not None:
            qkv, new_state["conv"] = self.conv.step(qkv, state["conv"])
        q, k, v = self._split(qkv)  # [B, H, K] each
        if isinstance(self.pattern, Lattice):
            position = state["mix"][1]  # [B]
            slots = list(range(self.pattern.levels))  # slot j holds what level j reads
            valid = self.pattern.reached(position)  # [B, L]
        else:
            slots = [self.pattern.max_offset - f for f in self.pattern.offsets]  # the state row of each level
            valid = state["seen"][:, slots]  # [B, L]
        past_keys = [state["keys"][:, s].to(k.dtype) for s in slots] if self.softmax else None
        alpha, beta = self._coefficients(x_t, q, k, past_keys, valid)  # [B, H], [B, H, L]
        xs = self._values(k, v)  # [B, H, Dx]
        y, new_state["mix"] = structured_mix_step(xs, alpha.to(xs.dtype), beta.to(xs.dtype), pattern=self.pattern,
                                                  state=state["mix"])  # y [B, H, Dx]
        if isinstance(self.pattern, Lattice):
            if self.softmax:  # the op's shift register rule, on the keys (spec §3.4)
                L = self.pattern.levels
                shifts = self.pattern.shifting(position + 1) | (torch.arange(L, device=k.device) == 0)  # [B, L]
                moved = torch.cat([k[:, None].to(state["keys"].dtype), state["keys"][:, :-1]], dim=1)  # [B, L, H, K]
                new_state["keys"] = torch.where(shifts[:, :, None, None], moved, state["keys"])
        else:
            new_state["seen"] = torch.cat([state["seen"][:, 1:], state["seen"].new_ones(x_t.shape[0], 1)], dim=1)
            if self.softmax:
                new_state["keys"] = torch.cat([state["keys"][:, 1:], k[:, None].to(state["keys"].dtype)], dim=1)
        return self._output(y, q), new_state
