"""delta_rule's test spec: every variant and its hard cases as regimes, tolerances and refused calls.

Regimes name the variant first: ``dn`` (no decay), ``gdn`` (a log decay per value head), ``kda`` (per
key channel), and ``p*`` the same with a preconditioner. Typical gates are log-sigmoids of normals
around a decay of 0.97 (one per head) or 0.9 to 0.999 (across the key channels), the preconditioner's
around 0.88; strengths are sigmoids of normals, centres -0.2 plus normals of 0.5. The hard cases:

* ``gdn_g_near_zero``: every decay exactly 1 or within 1e-6 of it;
* ``gdn_mixed``: each decay one of a full reset (log decay -30), 0.01, 0.5, 0.9999 or 1;
* ``kda_spread``: per-channel decays from 0.01 to 0.9999 across the key channels;
* ``pkda_extreme``: the mixed decays per channel, and the preconditioner's decays and strengths at
  their extremes (strengths 0, 1e-4 and 1);
* ``dn_beta_edges``: strengths of 0, 1e-4, 0.5, 1 - 1e-6 and 1;
* ``pgdn_unit_qk``: ``normalize_qk=False`` with unit q and k;
* ``gdn_gva``, ``pkda_gva``: two value heads per key head.

Initial states: ``S`` standard normal; with a preconditioner the pair ``(S, A)``, A uniform in [0, 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from linmix.ops._testing import BadInput, OpInputs, OpTestSpec, log_spread, rand, randn, replaced
from linmix.ops.delta_rule.precond import DiagonalPreconditioner
from linmix.ops.mixing_matrix import delta_rule_matrix

REGIMES = (
    "pgdn", "dn", "gdn", "kda", "pdn", "pkda", "gdn_g_near_zero", "gdn_mixed", "kda_spread", "pkda_extreme",
    "dn_beta_edges", "pgdn_unit_qk", "gdn_gva", "pkda_gva",
)
VARIANTS = ("dn", "gdn", "kda", "pdn", "pgdn", "pkda")
EXTREME_LOG_DECAYS = (-30.0, math.log(0.01), math.log(0.5), math.log(0.9999), 0.0)
EDGE_STRENGTHS = (0.0, 1e-4, 0.5, 1.0 - 1e-6, 1.0)
TYPICAL_LOGIT = math.log(0.97 / 0.03)  # scalar gates: log-sigmoids of normals around a decay of 0.97


def _pick(values: tuple[float, ...], shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Entries drawn from ``values`` (float64)."""
    table = torch.tensor(values, dtype=torch.float64, device=generator.device)
    return table[torch.randint(len(values), shape, generator=generator, device=generator.device)]


def _per_channel(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Per-token log-sigmoid gates centred on decays from 0.9 to 0.999 across the last dim (the key channels)."""
    centre = log_spread(shape[-1], 0.9, 0.999).to(generator.device)
    return F.logsigmoid(torch.logit(centre.exp()) + randn(generator, *shape))


def make_inputs(dims: dict, regime: str, generator: torch.Generator) -> OpInputs:
    """q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, beta ``[B, T, HV]``, the regime's g and preconditioner
    tensors, and an initial state (the pair ``(S, A)`` with a preconditioner)."""
    if regime not in REGIMES:
        raise ValueError(f"unknown delta_rule regime {regime!r}; regimes: {', '.join(REGIMES)}")
    B, T, H, K, V = (dims[key] for key in "BTHKV")
    HV = 2 * H if regime.endswith("_gva") else H
    variant = regime.split("_")[0]
    tensors = {"q": randn(generator, B, T, H, K), "k": randn(generator, B, T, H, K), "v": randn(generator, B, T, HV, V),
               "beta": torch.sigmoid(randn(generator, B, T, HV))}
    settings = {}
    if regime == "pgdn_unit_qk":
        tensors["q"], tensors["k"] = F.normalize(tensors["q"], dim=-1), F.normalize(tensors["k"], dim=-1)
        settings["normalize_qk"] = False
    if regime == "dn_beta_edges":
        tensors["beta"] = _pick(EDGE_STRENGTHS, (B, T, HV), generator)
    if variant in ("gdn", "pgdn"):
        if regime == "gdn_g_near_zero":
            tensors["g"] = -1e-6 * rand(generator, B, T, HV) * (rand(generator, B, T, HV) < 0.5)
        elif regime == "gdn_mixed":
            tensors["g"] = _pick(EXTREME_LOG_DECAYS, (B, T, HV), generator)
        else:
            tensors["g"] = F.logsigmoid(TYPICAL_LOGIT + randn(generator, B, T, HV))
    elif variant in ("kda", "pkda"):
        if regime == "kda_spread":
            centre = log_spread(K, 0.01, 0.9999).to(generator.device)
            tensors["g"] = F.logsigmoid(torch.logit(centre.exp()) + 0.5 * randn(generator, B, T, HV, K))
        elif regime == "pkda_extreme":
            tensors["g"] = _pick(EXTREME_LOG_DECAYS, (B, T, HV, K), generator)
        else:
            tensors["g"] = _per_channel(generator, B, T, HV, K)
    state = randn(generator, B, HV, K, V)
    if variant.startswith("p"):
        if regime == "pkda_extreme":
            tensors["precond_g"] = _pick(EXTREME_LOG_DECAYS, (B, T, H), generator)
            tensors["precond_beta"] = _pick((0.0, 1e-4, 1.0), (B, T, H), generator)
        else:
            tensors["precond_g"] = F.logsigmoid(2.0 + randn(generator, B, T, H))
            tensors["precond_beta"] = torch.sigmoid(randn(generator, B, T, H))
        tensors["precond_center"] = -0.2 + 0.5 * randn(generator, H)
        state = (state, rand(generator, B, H, K))
    return OpInputs(tensors, settings, state)


def mixing_matrix(tensors: dict, settings: dict, backend: str) -> torch.Tensor:
    """``M [B, HV, T, T]`` of a call (the registered op's unpacked arguments) from a zero state ``(S, A)``."""
    precond = None
    if "precond_g" in tensors:
        options = {name: settings[name] for name in ("x", "eps") if name in settings}  # the defaults otherwise
        precond = DiagonalPreconditioner(g=tensors["precond_g"], beta=tensors["precond_beta"],
                                         center=tensors["precond_center"], **options)
    return delta_rule_matrix(tensors["q"], tensors["k"], tensors["beta"], g=tensors.get("g"), precond=precond,
                             scale=settings.get("scale"), normalize_qk=settings.get("normalize_qk", True))


def _bad_inputs() -> dict[str, BadInput]:
    """Calls the validation refuses; the valid call is PGDN with ``B, T, H, K, V = 2, 5, 2, 8, 5`` (float32)."""
    B, H, K, V = 2, 2, 8, 5
    x = torch.zeros  # shapes and dtypes are what these calls get wrong
    S, A = x(B, H, K, V), x(B, H, K)
    return {
        "q_not_tensor": BadInput(replaced(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
        "q_int_dtype": BadInput(replaced(q=torch.ones(B, 5, H, K, dtype=torch.int64)), TypeError,
                                r"q must have a floating dtype"),
        "q_3d": BadInput(replaced(q=x(B, 5, K)), ValueError, r"q must be \[B, T, H, K\], got shape \[2, 5, 8\]"),
        "k_other_K": BadInput(replaced(k=x(B, 5, H, K + 1)), ValueError, r"k must have shape .*got \[2, 5, 2, 9\]"),
        "k_other_T": BadInput(replaced(k=x(B, 4, H, K)), ValueError, r"k must have shape"),
        "k_dtype": BadInput(replaced(k=x(B, 5, H, K, dtype=torch.float64)), TypeError, r"k has dtype torch.float64"),
        "v_other_B": BadInput(replaced(v=x(B + 1, 5, H, V)), ValueError, r"v must have shape \[B, T, HV, V\]"),
        "v_5d": BadInput(replaced(v=x(B, 5, H, V, 1)), ValueError, r"v must be \[B, T, HV, V\]"),
        "v_heads_not_a_multiple": BadInput(replaced(v=x(B, 5, 3, V)), ValueError,
                                           r"v must have a positive multiple of the H = 2 heads.*got 3"),
        "v_device": BadInput(replaced(v=torch.empty(B, 5, H, V, device="meta")), ValueError, r"v is on meta"),
        "K_zero": BadInput(replaced(q=x(B, 5, H, 0), k=x(B, 5, H, 0), initial_state=None), ValueError,
                           r"q must have at least one key channel, got K=0"),
        "V_zero_with_precond": BadInput(replaced(v=x(B, 5, H, 0), initial_state=None), ValueError,
                                        r"v must have at least one value channel with a preconditioner"),
        "T_zero_packed": BadInput(replaced(q=x(1, 0, H, K), k=x(1, 0, H, K), v=x(1, 0, H, V), beta=x(1, 0, H),
                                           g=x(1, 0, H), precond_g=x(1, 0, H), precond_beta=x(1, 0, H),
                                           initial_state=None, cu_seqlens=torch.tensor([0, 0])), ValueError,
                                  r"cu_seqlens must be strictly increasing .*sequence 0 from 0 to 0"),
        "beta_per_key_channel": BadInput(replaced(beta=x(B, 5, H, K)), ValueError,
                                         r"beta must have shape \[B, T, HV\] = \[2, 5, 2\], got \[2, 5, 2, 8\]"),
        "beta_above_one": BadInput(replaced(beta=torch.full((B, 5, H), 1.5)), ValueError,
                                   r"beta is a strength and must be \[0, 1\], got values from 1.5 to 1.5"),
        "beta_negative": BadInput(replaced(beta=torch.full((B, 5, H), -0.1)), ValueError, r"beta is a strength"),
        "beta_nan": BadInput(replaced(beta=torch.full((B, 5, H), math.nan)), ValueError,
                             r"beta holds nan at \[0, 0, 0\]"),
        "beta_int": BadInput(replaced(beta=torch.ones(B, 5, H, dtype=torch.int64)), TypeError,
                             r"beta must have a floating dtype"),
        "g_per_value_channel": BadInput(replaced(g=x(B, 5, H, V)), ValueError,
                                        r"g must have shape \[B, T, HV\] .*or \[B, T, HV, K\] .*got \[2, 5, 2, 5\]"),
        "g_device": BadInput(replaced(g=torch.empty(B, 5, H, device="meta")), ValueError, r"g is on meta"),
        "g_positive": BadInput(replaced(g=torch.full((B, 5, H), 0.1)), ValueError,
                               r"g is the log of a decay and must be <= 0, got a maximum of 0.1"),
        "g_neg_inf": BadInput(replaced(g=torch.full((B, 5, H), -math.inf)), ValueError,
                              r"g holds -inf at \[0, 0, 0\]; .*must be finite; clamp full resets"),
        "precond_g_per_value_head": BadInput(replaced(precond_g=x(B, 5, 2 * H)), ValueError,
                                             r"precond_g must have shape \[B, T, H\] \(one per key head\)"),
        "precond_g_positive": BadInput(replaced(precond_g=torch.full((B, 5, H), 0.5)), ValueError,
                                       r"precond_g is the log of a decay and must be <= 0"),
        "precond_beta_above_one": BadInput(replaced(precond_beta=torch.full((B, 5, H), 2.0)), ValueError,
                                           r"precond_beta is a strength and must be \[0, 1\]"),
        "precond_center_shape": BadInput(replaced(precond_center=x(H + 1)), ValueError,
                                         r"precond_center must have shape \[H\] = \[2\], got \[3\]"),
        "precond_center_inf": BadInput(replaced(precond_center=torch.full((H,), math.inf)), ValueError,
                                       r"precond_center holds inf at \[0\]"),
        "precond_incomplete": BadInput(replaced(precond_center=None), ValueError,
                                       r"precond_g, precond_beta and precond_center come together"),
        "x_below_one": BadInput(replaced(x=0.5), ValueError, r"x must be >= 1"),
        "x_str": BadInput(replaced(x="1.5"), TypeError, r"x must be a real number"),
        "eps_zero": BadInput(replaced(eps=0.0), ValueError, r"eps must be > 0"),
        "initial_state_not_a_pair": BadInput(replaced(initial_state=S), TypeError,
                                             r"initial_state must be the pair \(S \[N, HV, K, V\], A \[N, H, K\]\)"),
        "initial_state_S_shape": BadInput(replaced(initial_state=(x(B, H, V, K), A)), ValueError,
                                          r"initial_state must have shape \(S \[N, HV, K, V\], A \[N, H, K\]\) = "
                                          r"\(\[2, 2, 8, 5\], \[2, 2, 8\]\) .*got \(\[2, 2, 5, 8\], \[2, 2, 8\]\)"),
        "initial_state_A_shape": BadInput(replaced(initial_state=(S, x(B, H, V))), ValueError,
                                          r"initial_state must have shape \(S .*got \(\[2, 2, 8, 5\], \[2, 2, 5\]\)"),
        "initial_state_A_negative": BadInput(replaced(initial_state=(S, torch.full((B, H, K), -1.0))), ValueError,
                                             r"initial_state\[1\] is a second moment and must be >= 0"),
        "initial_state_device": BadInput(replaced(initial_state=(S, torch.empty(B, H, K, device="meta"))), ValueError,
                                         r"initial_state\[1\] is on meta"),
        "scale_inf": BadInput(replaced(scale=math.inf), ValueError, r"scale must be finite"),
        "scale_str": BadInput(replaced(scale="1"), TypeError, r"scale must be a real number"),
        "normalize_qk_str": BadInput(replaced(normalize_qk="no"), TypeError, r"normalize_qk must be a bool"),
        "backend_unknown": BadInput(replaced(backend="flash"), ValueError,
                                    r"unknown backend 'flash'; valid names are 'naive', 'chunk'"),
        "cu_seqlens_float": BadInput(replaced(cu_seqlens=torch.tensor([0.0, 5.0])), TypeError,
                                     r"cu_seqlens must have dtype torch.int32 or torch.int64"),
        "cu_seqlens_batch": BadInput(replaced(cu_seqlens=torch.tensor([0, 5])), ValueError,
                                     r"q must have batch size 1 when cu_seqlens is given"),
    }


SPEC = OpTestSpec(
    op="delta_rule",
    make_inputs=make_inputs,
    dims={"B": 2, "H": 2, "K": 8, "V": 5},
    regimes=REGIMES,
    bad_inputs=_bad_inputs(),
    dim_ranges={"B": (1, 3), "H": (1, 3), "K": (1, 40), "V": (1, 40)},
    # fla's tl.dot multiplies float32 in TF32 (its own tests allow 5e-3 on outputs, 2e-2 on gate gradients).
    # Our kernels multiply in TF32 for 16-bit inputs too: on the H200 the centre's gradient of a bf16 PKDA
    # case (a sum over every position and channel) came 1.25e-2 from the reference, so bf16 takes fla's 2e-2.
    # The preconditioner's statistics run on decayed_attention's chunked kernels, whose in-chunk decays come
    # from float32 cumulative log-decays: at the extreme gates (log 0.01 a token) these reach about 300 in a
    # chunk of 64, where float32's spacing is 3e-5; dprecond_g of pkda_extreme came 1.34e-5 on the H200.
    backend_tolerance={"fla": {torch.float32: 5e-3, torch.bfloat16: 2e-2},
                       "triton": {torch.float32: 3e-5, torch.bfloat16: 2e-2}},
    library_dims={"K": 64, "V": 64},
    library_regimes=("dn", "gdn", "kda", "pgdn", "pkda_gva"),  # one case per fla kernel; fla is not built for resets
    mixing_matrix=mixing_matrix,
)
