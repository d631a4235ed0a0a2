"""gated_kalman's own properties, beyond the op contract that ``test_op_contract.py`` checks for every op.

The numerical checks of spec/gated_kalmanet.md (§0, §6): 30 Chebyshev steps at ``ridge = 0.02`` are
within 1e-3 of the exact solve and more steps converge to it; the Chebyshev map is a symmetric
matrix, so the implicit query gradient is the exact gradient through the iteration (Lemma 2); the
solve's condition number is at most ``(1 + ridge) / ridge``; the chunk's closed-form Frobenius norms
equal ``||H_t||_F``. The identity ``alpha = 0`` = scalar-gated linear attention (``decayed_attention``),
the gradient of the whole op once the iteration has converged (finite differences), the final Gram
state's gradient reaching keys, gates and strengths, and Gram states that stay symmetric PSD in
float32 over 16k positions. The Triton backend (in Triton's CPU interpreter without CUDA) beyond the
op contract: the float64 fallback, the refusals, wide heads over several tiles, gradients through the
final states alone, ``opcheck`` of its custom ops and a GKA layer under ``torch.compile``; with
``-m gpu`` the paper's head widths, long sequences, 16-bit inputs and many packed sequences.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_close, assert_close
from op_harness import Case, case_inputs, gpu_only, leaves_of, reference, run

from linmix.ops import decayed_attention, gated_kalman
from linmix.ops._dispatch import installed
from linmix.ops.common.chunk import segsum
from linmix.ops.gated_kalman.chunk import gram_norms_squared
from linmix.ops.gated_kalman.solve import chebyshev, token_chebyshev, token_exact_solve, token_matrix, token_solve
from linmix.ops.gated_kalman.testing import SPEC
from linmix.ops.gated_kalman.triton import precision_for

F64 = dict(ratio=1e-12, atol=1e-13)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # of the Triton backend (the interpreter on the CPU)
needs_triton = pytest.mark.skipif(not installed("triton"), reason="needs the optional package triton")


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


@pytest.mark.parametrize("backend, dtype", [("chunk", torch.float64), ("naive", torch.float64),
                                            ("exact", torch.float64),
                                            pytest.param("triton", torch.float32, marks=needs_triton)])
def test_an_empty_gram_state_is_finite(backend, dtype):
    """Strengths of 0 from a zero state (no key yet): ``||H||_F`` is floored, outputs are 0, gradients finite."""
    inputs = _layer_inputs(1, 20, 2, 8, 4, seed=9, dtype=dtype)
    inputs["beta"] = torch.cat([torch.zeros(1, 10, 2, dtype=dtype), inputs["beta"][:, 10:]], dim=1)
    device = DEVICE if backend == "triton" else "cpu"
    leaves = {name: x.to(device).requires_grad_() for name, x in inputs.items()}
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


# ---- the Triton backend ---------------------------------------------------------------------------------

FP32 = dict(ratio=SPEC.ratio("triton", torch.float32))
BF16 = dict(ratio=SPEC.ratio("triton", torch.bfloat16))


@needs_triton
def test_triton_float64_runs_the_chunked_form():
    """Float64 inputs named for triton (whose kernels stop at float32) run the chunked form, bitwise."""
    case = Case("gated_kalman", "paper", 20)
    chunk, triton = (run(case, backend, torch.float64, DEVICE) for backend in ("chunk", "triton"))
    assert all(torch.equal(chunk[name], triton[name]) for name in chunk)


@needs_triton
def test_triton_needs_cuda_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = case_inputs(Case("gated_kalman", "typical", 5))
    tensors = {name: x.float() for name, x in inputs.tensors.items()}
    with pytest.raises(ValueError, match=r"backend 'triton' of gated_kalman needs CUDA tensors, got cpu"):
        gated_kalman(**tensors, **inputs.settings, backend="triton")


@needs_triton
def test_triton_refuses_more_than_128_key_channels():
    q = torch.zeros(1, 3, 1, 129, device=DEVICE)
    g, beta = torch.zeros(1, 3, 1, device=DEVICE), torch.ones(1, 3, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"backend 'triton' of gated_kalman takes K <= 128 key channels, got K=129"):
        gated_kalman(q, q, q[..., :4], g, beta, backend="triton")


@needs_triton
def test_triton_wide_heads_span_several_tiles():
    """K = 72: the state passes in 2 x 2 tiles of 64 channels, the solve in one tile of 128 (56 of them
    masked); V = 80: two value tiles in the readout. The paper's settings, against naive in float64."""
    case = Case("gated_kalman", "paper", 70, dims=(("B", 1), ("H", 1), ("K", 72), ("V", 80)))
    assert_all_close(reference(case), run(case, "triton", torch.float32, DEVICE), **FP32)


@needs_triton
@pytest.mark.parametrize("state", [0, 1], ids=["H", "U"])
def test_triton_gradient_through_one_final_state_alone(state):
    """A loss on the final ``H`` (``o`` and ``U`` unused: the solve's backward gets no ``dx``, the readout's
    none is run) or on the final ``U`` (the readout's backward gets no ``do``): every gradient equals
    naive's in float64."""
    inputs = case_inputs(Case("gated_kalman", "alpha_half", 70, dims=(("B", 1), ("H", 1))))
    weights = torch.randn(inputs.initial_state[state].shape, generator=torch.Generator().manual_seed(11),
                          dtype=torch.float64)
    grads = {}
    for backend, dtype in (("naive", torch.float64), ("triton", torch.float32)):
        tensors, initial_state = leaves_of(inputs, dtype, DEVICE)
        _, final_state = gated_kalman(**tensors, **inputs.settings, initial_state=initial_state,
                                      output_final_state=True, backend=backend)
        loss = (final_state[state] * weights.to(DEVICE, final_state[state].dtype)).sum()
        leaves = [*tensors.values(), *initial_state]
        grads[backend] = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    names = [*inputs.tensors, "H0", "U0"]
    for name, ref, out in zip(names, grads["naive"], grads["triton"], strict=True):
        assert_close(f"d{name}", ref, out, **FP32)


@needs_triton
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
def test_triton_custom_ops_pass_opcheck(packed):
    """Schema, fake (meta) implementations and autograd registration of the solve's and the readout's ops."""
    inputs = case_inputs(Case("gated_kalman", "alpha_half", 20, dims=(("B", 1), ("H", 1), ("K", 16), ("V", 16))))
    q, k, v, g = (inputs.tensors[name].float().to(DEVICE) for name in ("q", "k", "v", "g"))
    H0, U0 = (s.float().to(DEVICE) for s in inputs.initial_state)
    cu_seqlens = torch.tensor([0, 7, 20], device=DEVICE) if packed else None
    if packed:
        H0, U0 = (s.expand(2, -1, -1, -1).contiguous() for s in (H0, U0))
    precision = precision_for(torch.float32)
    solve_args = (q, k, g, 0.25, 10, H0, cu_seqlens, precision)
    torch.library.opcheck(torch.ops.linmix.gated_kalman_solve_fwd.default, solve_args)
    x, final_H, chunk_H, norms = torch.ops.linmix.gated_kalman_solve_fwd(*solve_args)
    torch.library.opcheck(torch.ops.linmix.gated_kalman_solve_bwd.default,
                          (k, g, 0.25, 10, cu_seqlens, precision, torch.randn_like(x), torch.randn_like(final_H),
                           chunk_H, norms, x))
    readout_args = (x, k, v, g, 0.25, U0, cu_seqlens, precision)
    torch.library.opcheck(torch.ops.linmix.gated_kalman_readout_fwd.default, readout_args)
    o, final_U, chunk_U = torch.ops.linmix.gated_kalman_readout_fwd(*readout_args)
    torch.library.opcheck(torch.ops.linmix.gated_kalman_readout_bwd.default,
                          (x, k, v, g, 0.25, cu_seqlens, precision, torch.randn_like(o), torch.randn_like(final_U),
                           chunk_U))


@needs_triton
def test_triton_gka_layer_compiles_without_graph_break():
    """A whole GKA mixer on the Triton backend under ``fullgraph=True``, forward and backward, equals eager."""
    from linmix.layers import build_mixer

    torch.manual_seed(0)
    layer = build_mixer("gka", d_model=32, n_heads=2, iters=10, backend="triton").to(DEVICE)
    x = torch.randn(2, 70, 32, device=DEVICE, requires_grad=True)

    def loss(x):
        y, _ = layer(x)
        return y.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    params = [x, *layer.parameters()]
    eager_grads = torch.autograd.grad(loss(x), params)
    compiled_grads = torch.autograd.grad(compiled(x), params)
    for i, (ref, out) in enumerate(zip(eager_grads, compiled_grads, strict=True)):
        assert_close(f"grad {i}", ref, out, ratio=1e-6)


# ---- the Triton backend on the GPU (pytest -m gpu): the paper's widths, long sequences, 16-bit, packing ----

GPU_SHAPES = {"K64-V64": (("B", 2), ("H", 2), ("K", 64), ("V", 64)),
              "K128-V128": (("B", 2), ("H", 2), ("K", 128), ("V", 128))}
# The long GPU cases compare with the chunked form in float64 on the CPU (the contract suite holds it to
# naive on every regime): naive's per-token Gram states take T K^2 memory.
LONG_REFERENCE = "chunk"


@gpu_only
@pytest.mark.parametrize("regime", ["paper", "decay_mixed"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=list(GPU_SHAPES))
@pytest.mark.parametrize("T", [63, 1000], ids=["T63", "T1000"])
def test_triton_gpu_float32_matches_the_reference(T, shape, regime):
    case = Case("gated_kalman", regime, T, dims=GPU_SHAPES[shape])
    assert_all_close(reference(case, LONG_REFERENCE), run(case, "triton", torch.float32, "cuda"), **FP32)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_gpu_16bit_matches_the_reference(dtype):
    """16-bit inputs straight into the kernels (float32 intermediates, products in TF32), the paper's
    settings at K = V = 128: the spec's acceptance tolerance, 1e-2."""
    case = Case("gated_kalman", "paper", 333, dims=GPU_SHAPES["K128-V128"], rounded_to=dtype)
    out = run(case, "triton", dtype, "cuda")
    assert out["o"].dtype == dtype and out["final_state[0]"].dtype == torch.float32
    assert_all_close(reference(case, LONG_REFERENCE), out, **BF16)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_gpu_packed_sequences_match_each_run_alone(dtype):
    """Seven packed sequences of odd lengths (1 to 1000) in one launch, extreme decays."""
    bounds = (0, 1, 8, 71, 404, 467, 1467, 1800)
    case = Case("gated_kalman", "decay_mixed", bounds[-1], bounds=bounds, dims=(("H", 2), ("K", 64), ("V", 64)),
                rounded_to=None if dtype == torch.float32 else dtype)
    out = run(case, "triton", dtype, "cuda", index_dtype=torch.int32)
    assert_all_close(reference(case, LONG_REFERENCE), out, **(FP32 if dtype == torch.float32 else BF16))
