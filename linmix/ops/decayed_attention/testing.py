"""decayed_attention's test spec: its inputs in named regimes, tolerances and refused calls.

Regimes name the decay: ``const_*`` is one decay per head and key channel ``[H, K]``, ``token_*`` one
per position ``[B, T, H, K]``. ``small``: gamma in [0.01, 0.05]; ``near_one``: [0.999, 0.9999];
``spread``: 0.01 to 0.9999 across the key channels; ``typical``: 0.9 to 0.999 across them (the
benchmark's default; per token, log-sigmoid gates centred there); ``logsigmoid``: log-sigmoid of
standard normals; ``mixed``: each entry one of a full reset (log decay -30), 0.01, 0.5, 0.9999 or
no decay at all.
"""

import math

import torch
import torch.nn.functional as F

from linmix.ops._testing import BadInput, OpInputs, OpTestSpec, log_spread, rand, randn, replaced
from linmix.ops.mixing_matrix import decayed_attention_matrix

REGIMES = (
    "const_small", "const_near_one", "const_spread", "const_typical", "const_mixed",
    "token_small", "token_near_one", "token_logsigmoid", "token_typical", "token_mixed",
)
EXTREME_LOG_DECAYS = (-30.0, math.log(0.01), math.log(0.5), math.log(0.9999), 0.0)


def log_decays(regime: str, B: int, T: int, H: int, K: int, generator: torch.Generator) -> torch.Tensor:
    """float64 log decays of a regime: ``[H, K]`` for ``const_*``, ``[B, T, H, K]`` for ``token_*``."""
    kind, name = regime.split("_", 1)
    shape = (H, K) if kind == "const" else (B, T, H, K)
    if name == "small":
        return torch.log(0.01 + 0.04 * rand(generator, *shape))
    if name == "near_one":
        return torch.log(0.999 + 0.0009 * rand(generator, *shape))
    if name == "spread":
        return log_spread(K, 0.01, 0.9999).to(generator.device).expand(shape).contiguous()
    if name == "typical":
        centre = log_spread(K, 0.9, 0.999).to(generator.device)  # [K]
        if kind == "const":
            return centre.expand(shape).contiguous()
        return F.logsigmoid(torch.logit(centre.exp()) + randn(generator, *shape))
    if name == "logsigmoid":
        return F.logsigmoid(randn(generator, *shape))
    if name == "mixed":
        extremes = torch.tensor(EXTREME_LOG_DECAYS, dtype=torch.float64, device=generator.device)
        return extremes[torch.randint(len(extremes), shape, generator=generator, device=generator.device)]
    raise ValueError(f"unknown decayed_attention regime {regime!r}; regimes: {', '.join(REGIMES)}")


def make_inputs(dims: dict, regime: str, generator: torch.Generator) -> OpInputs:
    """q, k, v ``[B, T, H, K|V]``, the regime's log decays, ``scale = 0.5`` and an initial state ``[B, H, K, V]``."""
    B, T, H, K, V = (dims[key] for key in "BTHKV")
    tensors = {name: randn(generator, B, T, H, K) for name in ("q", "k")}
    tensors["v"] = randn(generator, B, T, H, V)
    tensors["log_gamma"] = log_decays(regime, B, T, H, K, generator)
    return OpInputs(tensors, {"scale": 0.5}, randn(generator, B, H, K, V))


def mixing_matrix(tensors: dict, settings: dict, backend: str) -> torch.Tensor:
    """``M [B, H, T, T]`` of a call from a zero state; every backend applies the same one."""
    return decayed_attention_matrix(tensors["q"], tensors["k"], tensors["log_gamma"], scale=settings["scale"])


def _bad_inputs() -> dict[str, BadInput]:
    """Calls the validation refuses; the valid call is ``B, T, H, K, V = 2, 5, 2, 8, 5`` with a constant decay."""
    B, H, K, V = 2, 2, 8, 5
    x = torch.zeros  # shapes and dtypes are what these calls get wrong
    return {
        "q_not_tensor": BadInput(replaced(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
        "q_int_dtype": BadInput(replaced(q=torch.ones(B, 5, H, K, dtype=torch.int64)), TypeError,
                                r"q must have a floating dtype"),
        "q_3d": BadInput(replaced(q=x(B, 5, K)), ValueError, r"q must be \[B, T, H, K\], got shape \[2, 5, 8\]"),
        "k_other_K": BadInput(replaced(k=x(B, 5, H, K + 1)), ValueError, r"k must have shape .*got \[2, 5, 2, 9\]"),
        "k_other_T": BadInput(replaced(k=x(B, 4, H, K)), ValueError, r"k must have shape"),
        "v_other_B": BadInput(replaced(v=x(B + 1, 5, H, V)), ValueError, r"v must have shape \[B, T, H, V\]"),
        "v_5d": BadInput(replaced(v=x(B, 5, H, V, 1)), ValueError, r"v must be \[B, T, H, V\]"),
        "K_zero": BadInput(replaced(q=x(B, 5, H, 0), k=x(B, 5, H, 0), log_gamma=x(H, 0), initial_state=None),
                           ValueError, r"q must have at least one key channel, got K=0"),
        "T_zero_packed": BadInput(replaced(q=x(1, 0, H, K), k=x(1, 0, H, K), v=x(1, 0, H, V), initial_state=None,
                                           cu_seqlens=torch.tensor([0, 0])), ValueError,
                                  r"cu_seqlens must be strictly increasing .*sequence 0 from 0 to 0"),
        "k_dtype": BadInput(replaced(k=x(B, 5, H, K, dtype=torch.float64)), TypeError, r"k has dtype torch.float64"),
        "v_device": BadInput(replaced(v=torch.empty(B, 5, H, V, device="meta")), ValueError, r"v is on meta"),
        "log_gamma_device": BadInput(replaced(log_gamma=torch.empty(H, K, device="meta")), ValueError,
                                     r"log_gamma is on meta"),
        "log_gamma_scalar_gate": BadInput(replaced(log_gamma=torch.full((B, 5, H), -0.5)), ValueError,
                                          r"log_gamma must have shape"),
        "log_gamma_per_key": BadInput(replaced(log_gamma=torch.full((K,), -0.5)), ValueError,
                                      r"log_gamma must have shape .*got \[8\]"),
        "log_gamma_positive": BadInput(replaced(log_gamma=torch.full((H, K), 0.1)), ValueError,
                                       r"log_gamma .*must be <= 0"),
        "log_gamma_nan": BadInput(replaced(log_gamma=torch.full((H, K), math.nan)), ValueError,
                                  r"log_gamma holds nan at \[0, 0\]"),
        "log_gamma_neg_inf": BadInput(replaced(log_gamma=torch.full((H, K), -math.inf)), ValueError,
                                      r"log_gamma must be finite"),
        "log_gamma_int": BadInput(replaced(log_gamma=torch.zeros(H, K, dtype=torch.int64)), TypeError,
                                  r"log_gamma must have a float"),
        "initial_state_shape": BadInput(replaced(initial_state=x(B, H, V, K)), ValueError,
                                        r"initial_state must have shape \[B, H, K, V\]"),
        "initial_state_device": BadInput(replaced(initial_state=torch.empty(B, H, K, V, device="meta")), ValueError,
                                         r"initial_state is on meta"),
        "scale_inf": BadInput(replaced(scale=math.inf), ValueError, r"scale must be finite"),
        "scale_str": BadInput(replaced(scale="1"), TypeError, r"scale must be a real number"),
        "backend_unknown": BadInput(replaced(backend="flash"), ValueError,
                                    r"unknown backend 'flash'; valid names are 'naive', 'mask'"),
        "cu_seqlens_float": BadInput(replaced(cu_seqlens=torch.tensor([0.0, 5.0])), TypeError,
                                     r"cu_seqlens must have dtype torch.int32 or torch.int64"),
        "cu_seqlens_batch": BadInput(replaced(cu_seqlens=torch.tensor([0, 5])), ValueError,
                                     r"q must have batch size 1 when cu_seqlens is given"),
    }


SPEC = OpTestSpec(
    op="decayed_attention",
    make_inputs=make_inputs,
    dims={"B": 2, "H": 2, "K": 8, "V": 5},
    regimes=REGIMES,
    bad_inputs=_bad_inputs(),
    dim_ranges={"B": (1, 3), "H": (1, 3), "K": (1, 40), "V": (1, 40)},
    # The Triton kernels multiply float32 exactly, but sum in another order over chunks and tiles;
    # fla's tl.dot multiplies float32 in TF32 (its GLA tests allow 5e-3).
    backend_tolerance={"triton": {torch.float32: 1e-4}, "fla": {torch.float32: 5e-3, torch.bfloat16: 1.5e-2}},
    library_dims={"K": 64, "V": 64},
    library_regimes=("const_typical", "token_typical"),  # fla's chunk_gla is not built for full resets
    mixing_matrix=mixing_matrix,
)
