"""gated_kalman's test spec: its inputs in named regimes, tolerances and refused calls.

Two solver settings: ``paper`` runs the paper's ``ridge = 0.02`` with 30 Chebyshev steps (condition
number up to 51, error about 3e-4); every other regime runs ``ridge = 0.25`` with 10 steps (condition
number up to 5, a bound of 1.3e-4 on the iteration's error), so that the token loop stays fast and
the ``exact`` backend is as close to ``naive`` in every regime. Typical gates are log-sigmoids of
normals around a decay of 0.97, strengths and mixing weights sigmoids of normals. The regimes:

* ``typical``: no ``alpha`` (alpha = 1, the ridge readout);
* ``paper``: ``ridge = 0.02``, 30 steps, a mixing weight;
* ``alpha_zero``: ``alpha = 0`` (scalar-gated linear attention); ``alpha_half``: a mixing weight around 0.5;
* ``strong_decay``: decays from 0.01 to 0.05; ``weak_decay``: from 0.999 to 1 (exactly 1 for a fifth);
* ``decay_mixed``: each decay one of a full reset (log decay -30), 0.01, 0.5, 0.9999 or 1;
* ``beta_edges``: strengths of 0, 1e-4, 0.5 and 1.

Initial states: ``H`` the decayed Gram of ``2K`` normal keys (symmetric positive definite), ``U`` normal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from linmix.ops._testing import TOLERANCES, BadInput, OpInputs, OpTestSpec, rand, randn, replaced
from linmix.ops.mixing_matrix import gated_kalman_matrix

REGIMES = ("typical", "paper", "alpha_zero", "alpha_half", "strong_decay", "weak_decay", "decay_mixed", "beta_edges")
PAPER = {"ridge": 0.02, "iters": 30}
FAST = {"ridge": 0.25, "iters": 10}
EXTREME_LOG_DECAYS = (-30.0, math.log(0.01), math.log(0.5), math.log(0.9999), 0.0)
EDGE_STRENGTHS = (0.0, 1e-4, 0.5, 1.0)
TYPICAL_LOGIT = math.log(0.97 / 0.03)  # log-sigmoid gates around a decay of 0.97


def _pick(values: tuple[float, ...], shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Entries drawn from ``values`` (float64)."""
    table = torch.tensor(values, dtype=torch.float64, device=generator.device)
    return table[torch.randint(len(values), shape, generator=generator, device=generator.device)]


def initial_gram(generator: torch.Generator, B: int, H: int, K: int) -> torch.Tensor:
    """A decayed Gram state ``sum_i 0.9^i k_i k_i^T`` of ``2K`` normal keys ``[B, H, K, K]`` (float64)."""
    keys = randn(generator, B, H, 2 * K, K)
    weights = 0.9 ** torch.arange(2 * K, dtype=torch.float64, device=generator.device)
    return keys.transpose(-1, -2) @ (weights[:, None] * keys)


def make_inputs(dims: dict, regime: str, generator: torch.Generator) -> OpInputs:
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g, beta (and alpha) ``[B, T, H]``, the regime's solver
    settings and an initial state ``(H, U)``."""
    if regime not in REGIMES:
        raise ValueError(f"unknown gated_kalman regime {regime!r}; regimes: {', '.join(REGIMES)}")
    B, T, H, K, V = (dims[key] for key in "BTHKV")
    shape = (B, T, H)
    tensors = {"q": randn(generator, B, T, H, K), "k": randn(generator, B, T, H, K), "v": randn(generator, B, T, H, V)}
    if regime == "strong_decay":
        tensors["g"] = torch.log(0.01 + 0.04 * rand(generator, *shape))
    elif regime == "weak_decay":
        tensors["g"] = torch.log(0.999 + 0.001 * rand(generator, *shape)) * (rand(generator, *shape) > 0.2)
    elif regime == "decay_mixed":
        tensors["g"] = _pick(EXTREME_LOG_DECAYS, shape, generator)
    else:
        tensors["g"] = F.logsigmoid(TYPICAL_LOGIT + randn(generator, *shape))
    if regime == "beta_edges":
        tensors["beta"] = _pick(EDGE_STRENGTHS, shape, generator)
    else:
        tensors["beta"] = torch.sigmoid(randn(generator, *shape))
    if regime == "alpha_zero":
        tensors["alpha"] = torch.zeros(shape, dtype=torch.float64, device=generator.device)
    elif regime in ("alpha_half", "paper"):
        tensors["alpha"] = torch.sigmoid(randn(generator, *shape))
    state = (initial_gram(generator, B, H, K), randn(generator, B, H, K, V))
    return OpInputs(tensors, dict(PAPER if regime == "paper" else FAST), state)


def mixing_matrix(tensors: dict, settings: dict, backend: str) -> torch.Tensor:
    """``M [B, H, T, T]`` of a call from a zero state ``(H, U)``, with the solve ``backend`` runs: exact for
    ``exact``, the Chebyshev steps of ``settings["iters"]`` for every other."""
    iters = None if backend == "exact" else settings["iters"]
    return gated_kalman_matrix(tensors["q"], tensors["k"], tensors["g"], tensors["beta"], ridge=settings["ridge"],
                               iters=iters, alpha=tensors.get("alpha"), scale=settings.get("scale"))


def _bad_inputs() -> dict[str, BadInput]:
    """Calls the validation refuses; the valid call is ``typical`` with ``B, T, H, K, V = 2, 5, 2, 8, 5`` (float32)."""
    B, H, K, V = 2, 2, 8, 5
    x = torch.zeros  # shapes and dtypes are what these calls get wrong
    Hs, U = torch.eye(K).expand(B, H, K, K), x(B, H, K, V)
    asymmetric = torch.eye(K).expand(B, H, K, K).clone()
    asymmetric[..., 0, 1] = 0.5
    return {
        "q_not_tensor": BadInput(replaced(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
        "q_int_dtype": BadInput(replaced(q=torch.ones(B, 5, H, K, dtype=torch.int64)), TypeError,
                                r"q must have a floating dtype"),
        "q_3d": BadInput(replaced(q=x(B, 5, K)), ValueError, r"q must be \[B, T, H, K\], got shape \[2, 5, 8\]"),
        "k_other_K": BadInput(replaced(k=x(B, 5, H, K + 1)), ValueError, r"k must have shape .*got \[2, 5, 2, 9\]"),
        "k_other_T": BadInput(replaced(k=x(B, 4, H, K)), ValueError, r"k must have shape"),
        "k_dtype": BadInput(replaced(k=x(B, 5, H, K, dtype=torch.float64)), TypeError, r"k has dtype torch.float64"),
        "v_other_B": BadInput(replaced(v=x(B + 1, 5, H, V)), ValueError, r"v must have shape \[B, T, H, V\]"),
        "v_other_H": BadInput(replaced(v=x(B, 5, H + 1, V)), ValueError, r"v must have shape \[B, T, H, V\]"),
        "v_5d": BadInput(replaced(v=x(B, 5, H, V, 1)), ValueError, r"v must be \[B, T, H, V\]"),
        "v_device": BadInput(replaced(v=torch.empty(B, 5, H, V, device="meta")), ValueError, r"v is on meta"),
        "K_zero": BadInput(replaced(q=x(B, 5, H, 0), k=x(B, 5, H, 0), initial_state=None), ValueError,
                           r"q must have at least one key channel, got K=0"),
        "V_zero": BadInput(replaced(v=x(B, 5, H, 0), initial_state=None), ValueError,
                           r"v must have at least one value channel, got V=0"),
        "T_zero_packed": BadInput(replaced(q=x(1, 0, H, K), k=x(1, 0, H, K), v=x(1, 0, H, V), g=x(1, 0, H),
                                           beta=x(1, 0, H), initial_state=None, cu_seqlens=torch.tensor([0, 0])),
                                  ValueError, r"cu_seqlens must be strictly increasing .*sequence 0 from 0 to 0"),
        "g_per_key_channel": BadInput(replaced(g=x(B, 5, H, K)), ValueError,
                                      r"g must have shape \[B, T, H\] \(one per head\) = \[2, 5, 2\], "
                                      r"got \[2, 5, 2, 8\]"),
        "g_positive": BadInput(replaced(g=torch.full((B, 5, H), 0.1)), ValueError,
                               r"g is the log of a decay and must be <= 0, got a maximum of 0.1"),
        "g_nan": BadInput(replaced(g=torch.full((B, 5, H), math.nan)), ValueError, r"g holds nan at \[0, 0, 0\]"),
        "g_neg_inf": BadInput(replaced(g=torch.full((B, 5, H), -math.inf)), ValueError,
                              r"g holds -inf at \[0, 0, 0\]; .*must be finite; clamp full resets"),
        "g_device": BadInput(replaced(g=torch.empty(B, 5, H, device="meta")), ValueError, r"g is on meta"),
        "beta_missing_T": BadInput(replaced(beta=x(B, H)), ValueError, r"beta must have shape \[B, T, H\]"),
        "beta_negative": BadInput(replaced(beta=torch.full((B, 5, H), -0.1)), ValueError,
                                  r"beta is a strength .*must be >= 0, got values from -0.1"),
        "beta_inf": BadInput(replaced(beta=torch.full((B, 5, H), math.inf)), ValueError,
                             r"beta holds inf at \[0, 0, 0\]"),
        "beta_int": BadInput(replaced(beta=torch.ones(B, 5, H, dtype=torch.int64)), TypeError,
                             r"beta must have a floating dtype"),
        "alpha_shape": BadInput(replaced(alpha=x(B, 5, H, 1)), ValueError, r"alpha must have shape \[B, T, H\]"),
        "alpha_above_one": BadInput(replaced(alpha=torch.full((B, 5, H), 1.5)), ValueError,
                                    r"alpha is a mixing weight and must be \[0, 1\], got values from 1.5 to 1.5"),
        "alpha_float": BadInput(replaced(alpha=0.5), TypeError, r"alpha must be a torch.Tensor, got float"),
        "ridge_zero": BadInput(replaced(ridge=0.0), ValueError, r"ridge must be > 0"),
        "ridge_str": BadInput(replaced(ridge="0.02"), TypeError, r"ridge must be a real number"),
        "ridge_nan": BadInput(replaced(ridge=math.nan), ValueError, r"ridge must be finite"),
        "iters_float": BadInput(replaced(iters=30.0), TypeError, r"iters must be an int .*got float"),
        "iters_bool": BadInput(replaced(iters=True), TypeError, r"iters must be an int .*got bool"),
        "iters_negative": BadInput(replaced(iters=-1), ValueError, r"iters must be >= 0"),
        "scale_inf": BadInput(replaced(scale=math.inf), ValueError, r"scale must be finite"),
        "scale_str": BadInput(replaced(scale="1"), TypeError, r"scale must be a real number"),
        "initial_state_one_tensor": BadInput(replaced(initial_state=Hs), TypeError,
                                             r"initial_state must be the pair \(H \[N, H, K, K\], U \[N, H, K, V\]\)"),
        "initial_state_H_shape": BadInput(replaced(initial_state=(x(B, H, K, V), U)), ValueError,
                                          r"initial_state must have shape \(H \[N, H, K, K\], U \[N, H, K, V\]\) = "
                                          r"\(\[2, 2, 8, 8\], \[2, 2, 8, 5\]\) "
                                          r".*got \(\[2, 2, 8, 5\], \[2, 2, 8, 5\]\)"),
        "initial_state_U_shape": BadInput(replaced(initial_state=(Hs, x(B, H, V, K))), ValueError,
                                          r"initial_state must have shape \(H "
                                          r".*got \(\[2, 2, 8, 8\], \[2, 2, 5, 8\]\)"),
        "initial_state_device": BadInput(replaced(initial_state=(Hs, torch.empty(B, H, K, V, device="meta"))),
                                         ValueError, r"initial_state\[1\] is on meta"),
        "initial_state_asymmetric": BadInput(replaced(initial_state=(asymmetric, U)), ValueError,
                                             r"initial_state\[0\] is the Gram state H and must be symmetric"),
        "initial_state_negative_diagonal": BadInput(replaced(initial_state=(-Hs, U)), ValueError,
                                                    r"initial_state\[0\] .*must be positive semi-definite"),
        "initial_state_nan": BadInput(replaced(initial_state=(torch.full((B, H, K, K), math.nan), U)), ValueError,
                                      r"initial_state\[0\] holds nan at \[0, 0, 0, 0\]"),
        "backend_unknown": BadInput(replaced(backend="flash"), ValueError,
                                    r"unknown backend 'flash'; valid names are 'naive', 'exact', 'chunk'"),
        "cu_seqlens_float": BadInput(replaced(cu_seqlens=torch.tensor([0.0, 5.0])), TypeError,
                                     r"cu_seqlens must have dtype torch.int32 or torch.int64"),
        "cu_seqlens_batch": BadInput(replaced(cu_seqlens=torch.tensor([0, 5])), ValueError,
                                     r"q must have batch size 1 when cu_seqlens is given"),
    }


SPEC = OpTestSpec(
    op="gated_kalman",
    make_inputs=make_inputs,
    dims={"B": 2, "H": 2, "K": 8, "V": 5},
    regimes=REGIMES,
    bad_inputs=_bad_inputs(),
    dim_ranges={"B": (1, 2), "H": (1, 2), "K": (1, 24), "V": (1, 24)},
    # float32: the solve's condition number (up to 51) amplifies rounding, and a strength of 1e-4 on an
    # empty state makes dbeta a difference of terms 1/beta larger than itself (the ridge readout does
    # not change under a common scale of the keys): 2e-5 measured there, 2e-6 everywhere else. The triton
    # backend takes these too, like the delta rule's: its products are exact float32 for float32 inputs
    # (1e-6 at most measured on every regime in the interpreter, as the chunked form), and TF32 for 16-bit
    # ones on a GPU (4e-3 at most with TF32 rounding emulated in the interpreter, bf16 inputs, K = 128).
    tolerance={**TOLERANCES, torch.float32: 1e-4},
    # exact solves against naive's Chebyshev steps: the iteration's error, 4e-4 at most at the default
    # dims; the spec's acceptance tolerance for gradients against the exact solve (§0) on small random
    # shapes, where a gradient can be a cancellation (with K = 1 the readout does not depend on beta,
    # and the implicit gradient's share of it is the iteration's error times o / beta).
    backend_tolerance={"exact": {torch.float64: 2e-2, torch.float32: 2e-2, torch.bfloat16: 2e-2}},
    mixing_matrix=mixing_matrix,
)
