"""structured_mix beyond the op contract: its patterns (spec/structured_mixing.md §3) and properties of M.

The contract suite (test_op_contract.py) checks every backend against ``naive`` from the op's
``testing.SPEC``; here are the facts only this op has: the offset sets, hop bounds, the lattice
closed form, its invariant and shift-register decoding, where a lattice call's reads come from
(``Lattice.sources``), the decode cache sizes of §3.1 and §3.4, and the mixing matrix
``M = (I - B)^{-1} diag(alpha)`` (row-stochastic under a slot softmax).
"""

import pytest
import torch

from linmix.ops import decayed_attention, structured_mix, structured_mix_step
from linmix.ops.structured_mix import as_pattern
from linmix.ops.structured_mix import chunk as chunk_module
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
from linmix.ops.structured_mix.testing import make_inputs

POW2, SQ1 = (lambda k: 2**k), (lambda k: k * k + 1)
LENGTHS = (1024, 4096, 16384)


def pattern_at(f, T: int) -> Offsets:
    """The offsets ``f(k)`` of every level a length-``T`` sequence uses."""
    return Offsets(tuple(f(k) for k in range(levels_below(f, T))))


# ---- offset sets ------------------------------------------------------------------------------------


def test_named_patterns_hold_their_offsets():
    assert first_order().offsets == (1,)
    assert kth_order(4).offsets == (1, 2, 3, 4) == dense_window(4).offsets
    assert powers_of_two(5).offsets == (1, 2, 4, 8, 16)
    assert squares_plus_one(6).offsets == (1, 2, 5, 10, 17, 26)
    assert as_pattern([1, 3]) == Offsets((1, 3))


@pytest.mark.parametrize("offsets, error", [((), ValueError), ((0, 1), ValueError), ((1, 1), ValueError),
                                            ((3, 2), ValueError), ((1, 2.0), TypeError), ((True,), TypeError)])
def test_patterns_refuse_bad_offsets(offsets, error):
    with pytest.raises(error, match="offsets"):
        Offsets(offsets)
    with pytest.raises(error, match="offsets"):
        Lattice(offsets)


def test_lattice_needs_the_previous_token():
    with pytest.raises(ValueError, match=r"must start at f\(0\) = 1"):
        Lattice((2, 4))


@pytest.mark.parametrize("f, T, levels", [(POW2, 4096, 12), (SQ1, 4096, 64), (POW2, 1024, 10), (SQ1, 1024, 32),
                                          (POW2, 2, 1), (POW2, 1, 0)])
def test_levels_below_counts_offsets_shorter_than_the_sequence(f, T, levels):
    """Prop. 4.2: ``K(n) = #{k : f(k) < n}`` (§3.1: 12 and 64 levels at n = 4096)."""
    assert levels_below(f, T) == levels


def test_offset_index_table_points_back_by_each_offset():
    idx = powers_of_two(3).index_table(6)
    assert idx.tolist() == [[-1, -1, -1], [0, -1, -1], [1, 0, -1], [2, 1, -1], [3, 2, 0], [4, 3, 1]]


def _hops(pattern: Offsets, distances: int) -> list[int]:
    """The fewest offsets summing to each distance ``0 .. distances - 1`` (the shortest path of §3.2)."""
    hops = [0] + [distances] * (distances - 1)
    for d in range(1, distances):
        hops[d] = 1 + min(hops[d - f] for f in pattern.offsets if f <= d)
    return hops


def test_hops_are_the_popcount_for_powers_of_two():
    """§3.2: under ``2^k`` the shortest path between positions ``D`` apart has popcount(D) hops."""
    hops = _hops(pattern_at(POW2, 4096), 4096)
    assert hops == [bin(d).count("1") for d in range(4096)]


def test_hops_are_at_most_four_for_squares_plus_one():
    """§3.2: under ``k^2 + 1`` every distance is at most 4 hops (Lagrange), and 4 is reached."""
    hops = _hops(pattern_at(SQ1, 5000), 5000)
    assert max(hops) == 4


# ---- lattice patterns ----------------------------------------------------------------------------------


def test_lattice_steps_follow_the_closed_form():
    """§3.4's table: ``a_k`` of 1, 1, 2, 4, 8 for ``2^k`` and 1, 1, 3, 6, 12, 12, 12, 24 for ``k^2 + 1``."""
    assert Lattice.of(powers_of_two(6)).steps == (1, 1, 2, 4, 8, 16)
    assert Lattice.of(squares_plus_one(8)).steps == (1, 1, 3, 6, 12, 12, 12, 24)


@pytest.mark.parametrize("f", [POW2, SQ1, lambda k: 3**k, lambda k: k + 1], ids=["pow2", "sq1", "pow3", "linear"])
def test_lattice_rows_lie_in_their_windows_and_keep_the_invariant(f):
    """Each level's position is in ``[0, t - 1]`` at an offset in ``(f(k) - a_k, f(k)]``, present exactly
    when ``f(k) <= t``; and ``P(t + 1) ⊆ P(t) ∪ {t}`` (0-based) for every ``t < 3000``."""
    T = 3000
    lattice = Lattice(pattern_at(f, T).offsets)
    idx = lattice.index_table(T)  # [T, K]
    t = torch.arange(T)[:, None]
    f_k, a_k = torch.tensor(lattice.offsets), torch.tensor(lattice.steps)
    present = idx >= 0
    assert torch.equal(present, f_k <= t)
    offset = t - idx
    assert bool(((offset <= f_k) & (offset > f_k - a_k))[present].all())
    rows = [set(row[row >= 0].tolist()) for row in idx]
    assert all(rows[i + 1] <= rows[i] | {i} for i in range(T - 1))


@pytest.mark.parametrize("f, T", [(POW2, 4000), (SQ1, 4000), (lambda k: 3**k, 4000), (lambda k: k + 1, 300)],
                         ids=["pow2", "sq1", "pow3", "linear"])
def test_shift_register_decoding_holds_each_row_of_the_closed_form(f, T):
    """§3.4: after each token, ``advance`` leaves in slot ``k`` the position token ``t + 1`` reads at level ``k``."""
    lattice = Lattice(pattern_at(f, T).offsets)
    idx = lattice.index_table(T)
    slots = [None] * lattice.levels
    for t in range(T):
        assert [-1 if p is None else p for p in slots] == idx[t].tolist(), f"slots before token {t}"
        slots = lattice.advance(slots, t + 1, t)  # 1-based token t + 1 is 0-based position t


@pytest.mark.parametrize("f, T", [(POW2, 300), (SQ1, 300), (lambda k: 3**k, 300)], ids=["pow2", "sq1", "pow3"])
def test_sources_follow_the_shift_register_from_any_position(f, T):
    """``Lattice.sources(start, T)`` names, for every slot of the register before each token and after the
    last, the initial slot or the call's output that ``advance`` leaves there (levels not reached yet
    keep their initial slot), for calls starting anywhere around and past every level's entry."""
    lattice = Lattice(pattern_at(f, 2 * T).offsets)
    K = lattice.levels
    starts = [0, 1, 2, 3, 4, 5, 9, 10, 17, 26, 63, 64, 65, 127, 128, 129, 200, 243, 1000, 4097]
    rows, present = lattice.sources(torch.tensor(starts), T)  # [B, T + 1, K]
    for b, start in enumerate(starts):
        slots = list(range(K))  # ext rows: initial slot j is row j, output t of the call row K + t
        for t in range(T + 1):
            assert rows[b, t].tolist() == slots, f"start {start}, register before token {t}"
            assert present[b, t].tolist() == [f_k <= start + t for f_k in lattice.offsets]
            slots = lattice.advance(slots, start + t + 1, K + t)


def test_sources_read_the_closed_form_where_the_call_has_the_output():
    """A slot holding an output of the call holds the position ``index_table`` gives at the absolute position."""
    lattice = Lattice.of(squares_plus_one(7))
    start, T = 45, 120
    rows, present = lattice.sources(torch.tensor([start]), T)
    idx = lattice.index_table(start + T)[start:]  # [T, K], absolute
    K = lattice.levels
    inside = present[0, :T] & (idx >= start)
    assert bool(inside[-1].all())
    assert torch.equal(rows[0, :T][inside], (idx - start + K)[inside])


def test_lattice_step_reads_the_reached_slots_and_advances_the_register():
    """At position 2 of the ``2^k`` lattice (levels 0 and 1 reached) the step reads slots 0 and 1, not slot 2;
    then slot 1 takes slot 0 and slot 0 the new output, while slot 2 (level 2, ``f = 4``) keeps its value;
    after the next token level 2 enters with what slot 1 held."""
    lattice = Lattice.of(powers_of_two(3))  # steps 1, 1, 2
    slots = torch.tensor([1.0, 2.0, 3.0])[None, None, :, None]  # [1, 1, K=3, 1]
    state = (slots, torch.tensor([2]))
    y, (new_slots, position) = structured_mix_step(torch.ones(1, 1, 1), torch.full((1, 1), 10.0),
                                                   torch.tensor([[[1.0, 10.0, 100.0]]]), pattern=lattice, state=state)
    assert y.item() == 10.0 + 1.0 * 1.0 + 10.0 * 2.0
    assert new_slots.flatten().tolist() == [31.0, 1.0, 3.0]  # i = 3: level 1 shifts (a = 1), level 2 not (f = 4 > 3)
    assert position.tolist() == [3]
    y, (new_slots, position) = structured_mix_step(torch.zeros(1, 1, 1), torch.zeros(1, 1),
                                                   torch.zeros(1, 1, 3), pattern=lattice, state=(new_slots, position))
    assert new_slots.flatten().tolist() == [0.0, 31.0, 1.0]  # i = 4: level 2 enters with slot 1's output
    assert position.tolist() == [4]


# ---- decode cache sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("f, sizes", [(POW2, (512, 2048, 8192)), (SQ1, (962, 3970, 16130))], ids=["pow2", "sq1"])
def test_translation_invariant_cache_is_the_largest_offset_used(f, sizes):
    """§3.1: the ring buffer keeps the last ``f(K - 1)`` outputs, K the levels used: O(n) *distinct positions*."""
    for T, size in zip(LENGTHS, sizes, strict=True):
        assert pattern_at(f, T).cache_size(T) == size
        assert pattern_at(f, 2 * T).cache_size(T) == size  # levels past the sequence hold nothing


@pytest.mark.parametrize("f, levels, positions", [(POW2, (10, 12, 14), (10, 12, 14)),
                                                  (SQ1, (32, 64, 128), (25, 48, 93))], ids=["pow2", "sq1"])
def test_lattice_cache_counts_levels_and_distinct_positions(f, levels, positions):
    """§3.4: a decoder with one slot per level holds ``levels`` slots; the positions they hold are at most
    ``positions`` distinct ones (k^2 + 1 levels collide); both at n = 1024, 4096, 16384."""
    for T, slot_count, distinct in zip(LENGTHS, levels, positions, strict=True):
        lattice = Lattice(pattern_at(f, T).offsets)
        assert lattice.cache_levels(T) == slot_count
        assert lattice.cache_positions(T) == distinct


# ---- the mixing matrix --------------------------------------------------------------------------------


def _mixing_matrix(alpha: torch.Tensor, beta: torch.Tensor, pattern: Offsets) -> torch.Tensor:
    """``M = (I - B)^{-1} diag(alpha)``, ``[B, H, T, T]``, by an explicit inverse, position by position."""
    Bsz, T, H, K = beta.shape
    system = torch.eye(T, dtype=beta.dtype).repeat(Bsz, H, 1, 1)  # [B, H, T, T]
    for t in range(T):
        for k, f in enumerate(pattern.offsets):
            if t - f >= 0:
                system[:, :, t, t - f] -= beta[:, t, :, k]
    return torch.linalg.inv(system) * alpha.transpose(1, 2)[:, :, None, :]


@pytest.mark.parametrize("regime", ["pow2_softmax", "sq1_softmax", "signed"])
@pytest.mark.parametrize("backend", ["naive", "dense", "chunk"])
def test_outputs_are_the_mixing_matrix_times_x(regime, backend):
    """``o = M x`` with M from an explicit inverse, for a sparse pattern's dense lower-triangular M."""
    inputs = make_inputs({"B": 2, "T": 40, "H": 2, "D": 3}, regime, torch.Generator().manual_seed(0))
    x, alpha, beta = (inputs.tensors[name] for name in ("x", "alpha", "beta"))
    pattern = inputs.settings["pattern"]
    M = _mixing_matrix(alpha, beta, pattern)
    if regime != "signed":  # positive coefficients: every past position reaches every later one
        assert bool((M[:, :, torch.ones(40, 40, dtype=torch.bool).tril(-1)] > 0).all())
    o, _ = structured_mix(x, alpha, beta, pattern=pattern, backend=backend)
    expected = torch.einsum("bhts,bshd->bthd", M, x)
    torch.testing.assert_close(o, expected, rtol=1e-10, atol=1e-12)


def test_slot_softmax_gives_a_row_stochastic_mixing_matrix():
    """§5.3: with ``(alpha, beta)`` a softmax over the slots, M is non-negative and its rows sum to 1."""
    inputs = make_inputs({"B": 1, "T": 60, "H": 3, "D": 1}, "sq1_softmax", torch.Generator().manual_seed(1))
    alpha, beta = inputs.tensors["alpha"], inputs.tensors["beta"]
    # row 0 reads no past output: renormalise the softmax over the slots that exist (A13)
    idx = inputs.settings["pattern"].index_table(60)
    present = (idx >= 0).to(beta.dtype)[None, :, None, :]  # [1, T, 1, K]
    total = alpha + (beta * present).sum(-1)
    M = _mixing_matrix(alpha / total, beta * present / total[..., None], inputs.settings["pattern"])
    assert bool((M >= -1e-15).all())
    torch.testing.assert_close(M.sum(-1), torch.ones(1, 3, 60, dtype=torch.float64))


def _leaves(inputs) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Leaf copies of ``x, alpha, beta`` and of the state's floating tensor; a lattice's position (else None)."""
    leaves = [inputs.tensors[name].clone().requires_grad_() for name in ("x", "alpha", "beta")]
    state = inputs.initial_state
    slots, position = state if isinstance(state, tuple) else (state, None)
    return leaves, slots.clone().requires_grad_(), position


@pytest.mark.parametrize("regime", ["sq1_softmax", "sq1_lattice"])
@pytest.mark.parametrize("backend, T", [("dense", 9), ("chunk", 9), ("chunk", 70)])
def test_gradients_pass_gradcheck(backend, T, regime):
    """Gradients through the solve and the state against finite differences: the dense backend's
    autograd and the chunk backend's adjoint backward (in one chunk, and across a chunk boundary),
    for offsets and for a lattice (its slots; the position is a counter)."""
    rows = 2 if regime.endswith("lattice") else 1  # lattice rows start at different positions
    inputs = make_inputs({"B": rows, "T": T, "H": 2, "D": 2}, regime, torch.Generator().manual_seed(2))
    leaves, state, position = _leaves(inputs)
    pattern = inputs.settings["pattern"]

    def outputs(x, alpha, beta, state):
        initial = state if position is None else (state, position)
        o, final = structured_mix(x, alpha, beta, pattern=pattern, initial_state=initial, output_final_state=True,
                                  backend=backend)
        return o, (final if position is None else final[0])

    assert torch.autograd.gradcheck(outputs, (*leaves, state))


def test_step_reads_the_state_rows_of_each_offset():
    """The step reads ``state[S - f(k)]`` for level k and shifts the state by one (oldest row dropped)."""
    pattern = Offsets((1, 3))
    state = torch.arange(3.0)[None, None, :, None]  # [1, 1, S=3, 1]: y_{-3}, y_{-2}, y_{-1} = 0, 1, 2
    y, new_state = structured_mix_step(torch.ones(1, 1, 1), torch.full((1, 1), 10.0), torch.tensor([[[2.0, 5.0]]]),
                                       pattern=pattern, state=state)
    assert y.item() == 10.0 + 2.0 * 2.0 + 5.0 * 0.0
    assert new_state.flatten().tolist() == [1.0, 2.0, 14.0]


# ---- identities with other mixers (§2.3, §5.1) -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["naive", "dense", "chunk"])
def test_first_order_on_states_is_gated_linear_attention(backend):
    """§2.3 (state view): first order with ``x_t = k_t v_t^T``, ``alpha = 1`` and ``beta_t = gamma_t`` carries
    GLA's state ``S_t``; reading it with ``q_t`` gives ``decayed_attention`` with a scalar decay per head."""
    g = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 70, 2, 3, 4
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    log_gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g, dtype=torch.float64) + 2.0)
    start = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    expected, expected_state = decayed_attention(q, k, v, log_gate[..., None].expand(B, T, H, K), scale=1.0,
                                                 initial_state=start, output_final_state=True, backend="naive")
    x = (k[..., :, None] * v[..., None, :]).flatten(-2)  # [B, T, H, K * V]
    states, final = structured_mix(x, torch.ones(B, T, H, dtype=torch.float64), log_gate.exp()[..., None],
                                   pattern=first_order(), initial_state=start.flatten(-2)[:, :, None],
                                   output_final_state=True, backend=backend)
    o = torch.einsum("bthk,bthkv->bthv", q, states.unflatten(-1, (K, V)))
    torch.testing.assert_close(o, expected)
    torch.testing.assert_close(final.view(B, H, K, V), expected_state)


@pytest.mark.parametrize("backend", ["naive", "dense", "chunk"])
def test_dense_recurrence_is_chacal(backend):
    """§2.3: ChaCAL's ``(1 - gamma) A (I - gamma A)^{-1} V`` (A causal softmax attention) is the dense
    recurrence on ``x = A V`` with ``alpha_t = (1 - gamma) / (1 - gamma A_tt)`` and
    ``beta_{t, f} = gamma A_{t, t - f} / (1 - gamma A_tt)``."""
    g = torch.Generator().manual_seed(4)
    B, T, H, D, gamma = 1, 30, 2, 3, 0.7
    scores = torch.randn(B, H, T, T, generator=g, dtype=torch.float64)
    attention = torch.softmax(scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf), dim=-1)
    values = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    eye = torch.eye(T, dtype=torch.float64)
    expected = (1 - gamma) * attention @ torch.linalg.solve(eye - gamma * attention, values)  # [B, H, T, D]
    keep = 1 - gamma * attention.diagonal(dim1=-2, dim2=-1)  # [B, H, T]
    pattern = dense_window(T - 1)
    idx = pattern.index_table(T)  # [T, T - 1], t - f
    rows = torch.arange(T)[:, None].expand_as(idx)
    beta = torch.where(idx >= 0, gamma * attention[:, :, rows, idx.clamp_min(0)], 0.0) / keep[..., None]
    o, _ = structured_mix((attention @ values).transpose(1, 2), ((1 - gamma) / keep).transpose(1, 2),
                          beta.transpose(1, 2), pattern=pattern, backend=backend)
    torch.testing.assert_close(o, expected.transpose(1, 2))


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("regime", ["pow2_softmax", "dense_softmax", "near_one", "pow2_lattice", "sq1_lattice"])
def test_chunk_sizes_16_and_32_match_the_reference(monkeypatch, chunk, regime):
    """§5.5: the chunked solve with C = 16 and 32 (levels at f >= C are then far only; T = 70 ends in a
    partial chunk) gives naive's outputs, final state and gradients, in float64."""
    monkeypatch.setattr(chunk_module, "CHUNK", chunk)
    inputs = make_inputs({"B": 2, "T": 70, "H": 2, "D": 3}, regime, torch.Generator().manual_seed(5))
    results = {}
    for backend in ("naive", "chunk"):
        leaves, state, position = _leaves(inputs)
        o, final = structured_mix(*leaves, pattern=inputs.settings["pattern"],
                                  initial_state=state if position is None else (state, position),
                                  output_final_state=True, backend=backend)
        if position is not None:
            assert torch.equal(final[1], position + 70)
            final = final[0]
        loss = (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() + final.square().sum()
        results[backend] = [o, final, *torch.autograd.grad(loss, [*leaves, state])]
    for expected, got in zip(results["naive"], results["chunk"], strict=True):
        torch.testing.assert_close(got, expected)
