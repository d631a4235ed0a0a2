"""structured_mix's test spec: its inputs in named regimes, tolerances and refused calls.

A regime names a pattern and how its coefficients are drawn, all kept stable (every row of
``|A| + |B|`` sums to at most 1, except ``near_one``, whose direct part is free and whose single
recurrent coefficient is below 1):

* ``first_order_gates``: offsets {1}, ``beta = sigmoid(n)``, ``alpha = 1 - beta`` (a gated SSM);
* ``near_one``: offsets {1}, ``beta`` in [0.999, 0.9999] (long memory), ``alpha`` standard normal;
* ``order3_softmax``, ``pow2_softmax``, ``sq1_softmax``, ``dense_softmax``: offsets {1, 2, 3},
  {1, 2, 4, ..., 128}, {1, 2, 5, 10, 17} and {1, ..., 16}, with ``(alpha, beta)`` a joint softmax
  over the direct slot and the levels (the default coefficient map of §5.3);
* ``peaked_softmax``: {1, 2, 5, 10}, the softmax of logits scaled by 30 (nearly one-hot rows:
  copies along long paths with coefficients near 1);
* ``signed``: {1, 2, 4, 8}, signed coefficients, ``sum |beta| + |alpha|`` rescaled to 0.95, some
  entries exactly 0;
* ``tiny``: {1, 2}, ``beta`` of size 1e-3 and both signs, ``alpha`` standard normal;
* ``pow2_lattice``, ``sq1_lattice``: the lattice versions (§3.4) of {1, 2, 4, ..., 128} (steps
  1, 1, 2, 4, ...) and of {1, 2, 5, 10, 17, 26} (steps 1, 1, 3, 6, 12, 12), softmax coefficients.
  Their initial state is the shift register (standard normal slots) at a random absolute position
  in [0, 300) per batch row, so that calls start mid-lattice, before and after every level is reached.
"""

import torch

from linmix.ops._testing import BadInput, OpInputs, OpTestSpec, rand, randn, replaced
from linmix.ops.mixing_matrix import structured_mix_matrix
from linmix.ops.structured_mix.dense import lattice_system
from linmix.ops.structured_mix.patterns import (
    Lattice,
    Offsets,
    dense_window,
    first_order,
    kth_order,
    powers_of_two,
    squares_plus_one,
)

PATTERNS = {
    "first_order_gates": first_order(),
    "near_one": first_order(),
    "order3_softmax": kth_order(3),
    "pow2_softmax": powers_of_two(8),
    "sq1_softmax": squares_plus_one(5),
    "dense_softmax": dense_window(16),
    "peaked_softmax": Offsets((1, 2, 5, 10), "sq1_4"),
    "signed": powers_of_two(4),
    "tiny": kth_order(2),
    "pow2_lattice": Lattice.of(powers_of_two(8)),
    "sq1_lattice": Lattice.of(squares_plus_one(6)),
}
LATTICE_POSITIONS = 300  # the initial positions of the lattice regimes lie in [0, LATTICE_POSITIONS)
REGIMES = tuple(PATTERNS)


def coefficients(regime: str, B: int, T: int, H: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``alpha [B, T, H]`` and ``beta [B, T, H, K]`` of a regime (module docstring)."""
    K = PATTERNS[regime].levels
    if regime == "first_order_gates":
        beta = torch.sigmoid(randn(generator, B, T, H, K))
        return 1.0 - beta[..., 0], beta
    if regime == "near_one":
        return randn(generator, B, T, H), 0.999 + 0.0009 * rand(generator, B, T, H, K)
    if regime == "tiny":
        return randn(generator, B, T, H), 1e-3 * (2.0 * rand(generator, B, T, H, K) - 1.0)
    if regime == "signed":
        slots = randn(generator, B, T, H, K + 1) * (rand(generator, B, T, H, K + 1) > 0.2)  # some exact zeros
        slots = 0.95 * slots / slots.abs().sum(-1, keepdim=True).clamp_min(1e-12)
        return slots[..., 0], slots[..., 1:]
    scale = 30.0 if regime == "peaked_softmax" else 1.0
    slots = torch.softmax(scale * randn(generator, B, T, H, K + 1), dim=-1)  # [B, T, H, 1 + K]
    return slots[..., 0], slots[..., 1:]


def make_inputs(dims: dict, regime: str, generator: torch.Generator) -> OpInputs:
    """x ``[B, T, H, D]``, the regime's coefficients and pattern, and an initial state: ``[B, H, S, D]``, or
    a lattice's ``(slots [B, H, K, D], position [B] int64)``."""
    if regime not in PATTERNS:
        raise ValueError(f"unknown structured_mix regime {regime!r}; regimes: {', '.join(REGIMES)}")
    B, T, H, D = (dims[key] for key in "BTHD")
    pattern = PATTERNS[regime]
    x = randn(generator, B, T, H, D)
    alpha, beta = coefficients(regime, B, T, H, generator)
    if isinstance(pattern, Lattice):
        slots = randn(generator, B, H, pattern.levels, D)
        state = (slots, (LATTICE_POSITIONS * rand(generator, B)).long())
    else:
        state = randn(generator, B, H, pattern.max_offset, D)
    return OpInputs({"x": x, "alpha": alpha, "beta": beta}, {"pattern": pattern}, state)


def _bad_inputs() -> dict[str, BadInput]:
    """Calls the validation refuses; the valid call is ``B, T, H, D = 2, 5, 2, 5`` with offsets {1}."""
    B, T, H, D = 2, 5, 2, 5
    z = torch.zeros
    return {
        "x_not_tensor": BadInput(replaced(x=[[1.0]]), TypeError, r"x must be a torch.Tensor"),
        "x_int_dtype": BadInput(replaced(x=torch.ones(B, T, H, D, dtype=torch.int64)), TypeError,
                                r"x must have a floating dtype"),
        "x_3d": BadInput(replaced(x=z(B, T, D)), ValueError, r"x must be \[B, T, H, D\], got shape \[2, 5, 5\]"),
        "alpha_per_channel": BadInput(replaced(alpha=z(B, T, H, D)), ValueError,
                                      r"alpha must have shape \[B, T, H\] like x = \[2, 5, 2\], got \[2, 5, 2, 5\]"),
        "alpha_other_T": BadInput(replaced(alpha=z(B, T + 1, H)), ValueError, r"alpha must have shape"),
        "beta_other_K": BadInput(replaced(beta=z(B, T, H, 2)), ValueError,
                                 r"beta must have shape \[B, T, H, K\] like x with K = 1 levels .*= \[2, 5, 2, 1\], "
                                 r"got \[2, 5, 2, 2\]"),
        "beta_3d": BadInput(replaced(beta=z(B, T, H)), ValueError, r"beta must have shape"),
        "beta_dtype": BadInput(replaced(beta=z(B, T, H, 1, dtype=torch.float64)), TypeError,
                               r"beta has dtype torch.float64 but x has torch.float32"),
        "alpha_device": BadInput(replaced(alpha=torch.empty(B, T, H, device="meta")), ValueError, r"alpha is on meta"),
        "pattern_str": BadInput(replaced(pattern="pow2"), TypeError,
                                r"pattern must be an Offsets or Lattice pattern or a sequence of ints, got str"),
        "pattern_not_increasing": BadInput(replaced(pattern=(2, 1)), ValueError,
                                           r"offsets must be positive and strictly increasing, got \[2, 1\]"),
        "pattern_zero_offset": BadInput(replaced(pattern=(0, 1)), ValueError, r"offsets must be positive"),
        "pattern_float": BadInput(replaced(pattern=(1.0,)), TypeError, r"offsets must hold ints"),
        "pattern_empty": BadInput(replaced(pattern=()), ValueError, r"offsets must hold at least one offset"),
        "lattice_state_tensor": BadInput(replaced(pattern=Lattice((1,)), initial_state=z(B, H, 1, D)), TypeError,
                                         r"initial_state of a lattice pattern must be a tuple \(slots \[B, H, K, D\], "
                                         r"position \[B\] int64\), got Tensor"),
        "lattice_position_float": BadInput(replaced(pattern=Lattice((1,)), initial_state=(z(B, H, 1, D), z(B))),
                                           TypeError, r"initial_state\[1\] must be an int64 torch.Tensor .*got "
                                           r"torch.float32"),
        "lattice_position_shape": BadInput(
            replaced(pattern=Lattice((1,)), initial_state=(z(B, H, 1, D), torch.zeros(B, 1, dtype=torch.int64))),
            ValueError, r"initial_state\[1\] must have shape \[B\] .*= \[2\], got \[2, 1\]"),
        "lattice_slots_levels": BadInput(
            replaced(pattern=Lattice((1,)), initial_state=(z(B, H, 2, D), torch.zeros(B, dtype=torch.int64))),
            ValueError, r"initial_state\[0\] must have shape \[B, H, K, D\] .*= \[2, 2, 1, 5\], got \[2, 2, 2, 5\]"),
        "initial_state_shape": BadInput(replaced(initial_state=z(B, H, 2, D)), ValueError,
                                        r"initial_state must have shape \[B, H, S, D\] .* = \[2, 2, 1, 5\]"),
        "initial_state_int": BadInput(replaced(initial_state=torch.zeros(B, H, 1, D, dtype=torch.int64)), TypeError,
                                      r"initial_state must have a floating dtype"),
        "initial_state_device": BadInput(replaced(initial_state=torch.empty(B, H, 1, D, device="meta")), ValueError,
                                         r"initial_state is on meta"),
        "backend_unknown": BadInput(replaced(backend="chunked"), ValueError,
                                    r"unknown backend 'chunked'; valid names are 'naive', 'dense', 'chunk'"),
        "cu_seqlens_batch": BadInput(replaced(cu_seqlens=torch.tensor([0, T])), ValueError,
                                     r"x must have batch size 1 when cu_seqlens is given"),
    }


def mixing_matrix(tensors: dict, settings: dict, backend: str) -> torch.Tensor:
    """``(I - B)^{-1} diag(alpha)`` of the regime's pattern ``[B, H, T, T]``, the same on every backend.

    For a lattice, B is the dense backend's (``lattice_system``) from position 0, where no entry reads
    the state (``linmix.ops.mixing_matrix.structured_mix_matrix`` takes translation-invariant offsets).
    """
    alpha, beta, pattern = tensors["alpha"], tensors["beta"], settings["pattern"]
    if not isinstance(pattern, Lattice):
        return structured_mix_matrix(alpha, beta, pattern.offsets)
    B, T = beta.shape[:2]
    rows, present = pattern.sources(torch.zeros(B, dtype=torch.int64, device=beta.device), T)  # [B, T + 1, K]
    system = lattice_system(beta, rows[:, :T], present[:, :T])  # [B, H, T, T]
    return torch.linalg.solve_triangular(system, torch.diag_embed(alpha.transpose(1, 2)), upper=False,
                                         unitriangular=True)


SPEC = OpTestSpec(
    op="structured_mix",
    make_inputs=make_inputs,
    dims={"B": 2, "H": 2, "D": 5},
    regimes=REGIMES,
    bad_inputs=_bad_inputs(),
    dim_ranges={"B": (1, 3), "H": (1, 3), "D": (1, 24)},
    mixing_matrix=mixing_matrix,
    values="x",
)

__all__ = ["PATTERNS", "REGIMES", "SPEC", "coefficients", "make_inputs", "mixing_matrix"]
