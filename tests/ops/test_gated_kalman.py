"""gated_kalman's own properties, beyond the op contract that ``test_op_contract.py`` checks for every op.

The numerical checks of spec/gated_kalmanet.md (§0, §6): 30 Chebyshev steps at ``ridge = 0.02`` are
within 1e-3 of the exact solve and more steps converge to it; the Chebyshev map is a symmetric
matrix, so the implicit query gradient is the exact gradient through the iteration (Lemma 2); the
solve's condition number is at most ``(1 + ridge) / ridge``; the chunk's closed-form Frobenius norms
equal ``||H_t||_F``. The identity ``alpha = 0`` = scalar-gated linear attention (``decayed_attention``),
the gradient of the whole op once the iteration has converged (finite differences), the final Gram
state's gradient reaching keys, gates and strengths, and Gram states that stay symmetric PSD in
float32 over 16k positions.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from op_harness import Case, case_inputs

from linmix.ops import decayed_attention, gated_kalman
from linmix.ops.gated_kalman.chunk import gram_norms_squared, segsum
from linmix.ops.gated_kalman.solve import chebyshev, token_chebyshev, token_exact_solve, token_matrix, token_solve

F64 = dict(ratio=1e-12, atol=1e-13)


def _layer_inputs(B: int, T: int, H: int, K: int, V: int, seed: int, dtype=torch.float64, decays=(0.9, 0.999)):
    """Inputs as the layer makes them: unit q and k, sigmoid strengths and mixing weights, decays in ``decays``."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    lo, hi = decays
    g = torch.log(lo + (hi - lo) * torch.rand(B, T, H, generator=gen, dtype=torch.float64))
    beta, alpha = (torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)) for _ in range(2))
    return {name: x.to(dtype) for name, x in dict(q=q, k=k, v=v, g=g, beta=beta, alpha=alpha).items()}


def _grams(k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``H_t`` of every position by the plain recurrence: ``[B, T, H, K, K]``."""
    B, T, H, K = k.shape
    k = beta[..., None] * k
    state, grams = k.new_zeros(B, H, K, K), []
    for t in range(T):
        state = torch.exp(g[:, t])[..., None, None] * state + k[:, t, :, :, None] * k[:, t, :, None, :]
        grams.append(state)
    return torch.stack(grams, dim=1)


# ---- the solve ------------------------------------------------------------------------------------------


def test_30_chebyshev_steps_at_ridge_002_are_within_1e3_of_the_exact_solve():
    """The paper's setting (spec §0: 3.2e-4 measured): every token's ``x_t`` within 1e-3 of the exact
    solve (largest relative error), and the op's ``naive`` outputs within 1e-3 of ``exact`` (relative
    RMS), with the pure ridge readout (``alpha = None``) and K = 64 (rank-deficient early states)."""
    inputs = _layer_inputs(1, 200, 2, 64, 16, seed=0)
    grams = _grams(inputs["k"], inputs["g"], inputs["beta"])
    x = token_solve(grams, inputs["q"], 0.02, 30)
    exact = token_exact_solve(grams, inputs["q"], 0.02)
    per_token = (x - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert per_token.max() < 1e-3, per_token.max()
    args = {name: inputs[name] for name in ("q", "k", "v", "g", "beta")}
    o_naive, _ = gated_kalman(**args, ridge=0.02, iters=30, backend="naive")
    o_exact, _ = gated_kalman(**args, ridge=0.02, backend="exact")
    assert_close("o", o_exact, o_naive, ratio=1e-3)


def test_more_steps_converge_to_the_exact_solve():
    """The error of ``naive`` against ``exact`` falls with the steps, below 1e-10 at 100 (rate 0.754 per step)."""
    inputs = _layer_inputs(1, 100, 2, 16, 8, seed=1)
    o_exact, _ = gated_kalman(**inputs, ridge=0.02, backend="exact")
    errors = []
    for iters in (10, 30, 60, 100):
        o, _ = gated_kalman(**inputs, ridge=0.02, iters=iters, backend="naive")
        errors.append(((o - o_exact).norm() / o_exact.norm()).item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-10, errors


def test_chebyshev_map_is_a_symmetric_matrix():
    """``x = P q`` with ``P`` a polynomial in the symmetric ``A``: ``P`` symmetric to rounding (spec §0: 1e-15)."""
    inputs = _layer_inputs(1, 40, 2, 12, 4, seed=2)
    grams = _grams(inputs["k"], inputs["g"], inputs["beta"])[:, -1]  # [B, H, K, K]
    F_ = grams.square().sum(dim=(-2, -1)).sqrt()
    h = 2.0 / (1.04 * F_)
    eye = torch.eye(12, dtype=torch.float64).expand(1, 2, 12, 12)
    P = token_chebyshev(token_matrix(grams, h, 0.02)[..., None, :, :], h[..., None], eye, 0.02, 30)  # rows P e_i
    assert (P - P.transpose(-1, -2)).abs().max() < 1e-13 * P.abs().max()


def test_query_gradient_is_the_gradient_through_the_iterations():
    """Lemma 2: the implicit ``dq = A^{-1} dx`` (by the same Chebyshev run) equals autograd through the
    30 unrolled steps, because the iteration's map is a symmetric matrix."""
    inputs = _layer_inputs(1, 30, 2, 10, 4, seed=3)
    grams = _grams(inputs["k"], inputs["g"], inputs["beta"])
    q = inputs["q"].clone().requires_grad_()
    dx = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (implicit,) = torch.autograd.grad((token_solve(grams, q, 0.02, 30) * dx).sum(), q)
    F_ = grams.square().sum(dim=(-2, -1)).sqrt()
    h = 2.0 / (1.04 * F_)
    scaled = token_matrix(grams, h, 0.02)
    unrolled_x = chebyshev(lambda x: (scaled @ x[..., None])[..., 0], h[..., None] * q, 0.02, 30)
    (unrolled,) = torch.autograd.grad((unrolled_x * dx).sum(), q)
    assert_close("dq", unrolled, implicit, **F64)


@pytest.mark.parametrize("ridge", [0.02, 0.25])
def test_condition_number_is_at_most_one_plus_ridge_over_ridge(ridge):
    """The spectrum of ``H_t + lambda_t I`` lies in ``[lambda_t, lambda_t + ||H_t||_F]``: kappa <= (1 + a) / a."""
    inputs = _layer_inputs(2, 80, 2, 16, 4, seed=5, decays=(0.01, 0.9999))
    grams = _grams(inputs["k"], inputs["g"], inputs["beta"])
    F_ = grams.square().sum(dim=(-2, -1)).sqrt()
    eig = torch.linalg.eigvalsh(grams + (ridge * F_)[..., None, None] * torch.eye(16, dtype=torch.float64))
    assert (eig[..., 0] >= ridge * F_ * (1 - 1e-12)).all()
    assert (eig[..., -1] <= (1 + ridge) * F_ * (1 + 1e-12)).all()
    assert (eig[..., -1] / eig[..., 0]).max() <= (1 + ridge) / ridge * (1 + 1e-9)


# ---- the chunked form -------------------------------------------------------------------------------------


def test_in_chunk_frobenius_formula_matches_the_norm_of_the_state():
    """The closed form of ``||H_t||_F^2`` from the chunk's start state and keys (spec §3; 9e-16 in numpy)
    against the norm of ``H_t`` built by the recurrence, over decays from 0.01 to 0.9999."""
    inputs = _layer_inputs(2, 64, 2, 8, 4, seed=6, decays=(0.01, 0.9999))
    k, g, beta = inputs["k"], inputs["g"], inputs["beta"]
    start = case_inputs(Case("gated_kalman", "typical", 1)).initial_state[0]  # [2, 2, 8, 8] SPD
    grams = _grams(k, g, beta) + torch.exp(g.cumsum(dim=1))[..., None, None] * start[:, None]
    decay = torch.exp(segsum(g.transpose(1, 2)))  # [B, H, C, C]
    from_start = torch.exp(g.transpose(1, 2).cumsum(dim=-1))[..., None]  # [B, H, C, 1]
    closed = gram_norms_squared(start, (beta[..., None] * k).transpose(1, 2), decay, from_start)[..., 0]
    assert_close("||H_t||_F^2", grams.square().sum(dim=(-2, -1)).transpose(1, 2), closed, ratio=1e-14)


@pytest.mark.parametrize("backend", ["chunk", "naive"])
def test_alpha_zero_is_scalar_gated_linear_attention(backend):
    """With ``alpha = 0`` the readout is ``scale U_t^T q_t``: ``decayed_attention`` on ``beta k``, ``beta v``
    with the scalar decay on every key channel, the same scale; outputs, ``U`` and every gradient of
    a loss on both (float64, two chunks and a part)."""
    inputs = case_inputs(Case("gated_kalman", "alpha_zero", 2 * 64 + 9))
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.tensors.items()}
    H0, U0 = (s.clone().requires_grad_() for s in inputs.initial_state)
    o, (_, U) = gated_kalman(**leaves, **inputs.settings, scale=0.3, initial_state=(H0, U0), output_final_state=True,
                             backend=backend)
    q, k, v, g, beta = (leaves[name] for name in ("q", "k", "v", "g", "beta"))
    o_gla, U_gla = decayed_attention(q, beta[..., None] * k, beta[..., None] * v, g[..., None].expand_as(k),
                                     scale=0.3, initial_state=U0, output_final_state=True, backend="naive")
    assert_close("o", o_gla, o, **F64)
    assert_close("U", U_gla, U, **F64)
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (o, U)]
    wrt = [q, k, v, g, beta, U0]
    grads, grads_gla = (torch.autograd.grad((a * weights[0]).sum() + (b * weights[1]).sum(), wrt)
                        for a, b in ((o, U), (o_gla, U_gla)))
    for name, ref, out in zip(("dq", "dk", "dv", "dg", "dbeta", "dU0"), grads_gla, grads, strict=True):
        assert_close(name, ref, out, **F64)


def test_chunk_gradient_is_the_true_gradient_once_converged():
    """At 60 steps of ``ridge = 0.25`` (iteration error 1e-25) the implicit gradient is the gradient of the
    function: finite differences of outputs and both final states, to every input and the initial state."""
    inputs = case_inputs(Case("gated_kalman", "alpha_half", 70, dims=(("B", 1), ("H", 1), ("K", 3), ("V", 2))))
    tensors = [x.clone().requires_grad_() for x in inputs.tensors.values()]
    state = [s.clone().requires_grad_() for s in inputs.initial_state]

    def op(q, k, v, g, beta, alpha, H0, U0):
        o, (H, U) = gated_kalman(q, k, v, g, beta, alpha=alpha, ridge=0.25, iters=60, initial_state=(H0, U0),
                                 output_final_state=True, backend="chunk", check_values=False)
        return o, H, U

    assert torch.autograd.gradcheck(op, (*tensors, *state), fast_mode=True, atol=1e-7, rtol=1e-5)


def test_final_gram_gradient_reaches_keys_gates_and_strengths():
    """A loss on the final ``H`` alone: its gradient reaches k, g, beta and the initial H (fla's reference
    kernels drop it), equals the recurrence's (autograd through ``H_t = gamma H_{t-1} + k k^T``), and
    leaves q, v and U0 at zero."""
    inputs = case_inputs(Case("gated_kalman", "typical", 150))
    weights = torch.randn(inputs.initial_state[0].shape, generator=torch.Generator().manual_seed(8),
                          dtype=torch.float64)
    results = {}
    for backend in ("chunk", "naive"):
        leaves = {name: x.clone().requires_grad_() for name, x in inputs.tensors.items()}
        H0, U0 = (s.clone().requires_grad_() for s in inputs.initial_state)
        _, (H, _) = gated_kalman(**leaves, **inputs.settings, initial_state=(H0, U0), output_final_state=True,
                                 backend=backend)
        results[backend] = dict(zip([*leaves, "H0", "U0"], torch.autograd.grad(
            (H * weights).sum(), [*leaves.values(), H0, U0], allow_unused=True, materialize_grads=True), strict=True))
    k, g, beta = (inputs.tensors[name].clone().requires_grad_() for name in ("k", "g", "beta"))
    H0 = inputs.initial_state[0].clone().requires_grad_()
    H_T = _grams(k, g, beta)[:, -1] + torch.exp(g.sum(dim=1))[..., None, None] * H0
    expected = dict(zip(("k", "g", "beta", "H0"), torch.autograd.grad((H_T * weights).sum(), [k, g, beta, H0]),
                        strict=True))
    for grads in results.values():
        for name in ("q", "v", "U0"):
            assert torch.equal(grads[name], torch.zeros_like(grads[name])), name
        for name, ref in expected.items():
            assert ref.abs().max() > 0
            assert_close(f"d{name}", ref, grads[name], **F64)


def test_an_empty_gram_state_is_finite():
    """Strengths of 0 from a zero state (no key yet): ``||H||_F`` is floored, outputs are 0, gradients finite."""
    inputs = _layer_inputs(1, 20, 2, 8, 4, seed=9)
    inputs["beta"] = torch.cat([torch.zeros(1, 10, 2, dtype=torch.float64), inputs["beta"][:, 10:]], dim=1)
    for backend in ("chunk", "naive", "exact"):
        leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
        o, _ = gated_kalman(**leaves, backend=backend)
        assert torch.equal(o[:, :10], torch.zeros_like(o[:, :10]))
        assert torch.isfinite(o).all()
        grads = torch.autograd.grad(o.square().sum(), list(leaves.values()))
        assert all(torch.isfinite(grad).all() for grad in grads)


# ---- long runs in float32 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("decays", [(0.01, 0.05), (0.999, 0.9999), (0.01, 0.9999)], ids=["strong", "weak", "spread"])
def test_gram_states_stay_symmetric_psd_over_16k_positions(decays):
    """16384 positions in float32 (the chunked form, in 8 calls with the state carried, at the paper's
    settings): every carried Gram state exactly symmetric, its smallest eigenvalue above
    ``-1e-6 ||H||_2`` (rounding), no NaN or infinity in outputs or states."""
    inputs = _layer_inputs(1, 16384, 2, 8, 4, seed=10, dtype=torch.float32, decays=decays)
    state = None
    for part in torch.arange(16384).split(2048):
        o, state = gated_kalman(**{name: x[:, part] for name, x in inputs.items()}, initial_state=state,
                                output_final_state=True, backend="chunk")
        H, U = state
        assert torch.isfinite(o).all() and torch.isfinite(H).all() and torch.isfinite(U).all()
        assert torch.equal(H, H.transpose(-1, -2))
        eig = torch.linalg.eigvalsh(H.double())
        assert (eig[..., 0] >= -1e-6 * eig[..., -1]).all(), eig[..., 0] / eig[..., -1]
