"""decayed_attention's own properties, beyond the op contract that ``test_op_contract.py`` checks for every op.

The reference itself against a closed form, the constant decay as a per-token one, the K-Operators
decay path's shape, the chunked form at the strongest decays, the defaults (``scale``,
``check_values``, ``backend="auto"``) and the dtypes of every output.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_close, assert_close
from op_harness import Case, case_inputs, cuda_marks, cuda_only, reference, run

from linmix.ops import decayed_attention, decayed_attention_step
from linmix.ops.decayed_attention import OP
from linmix.ops.decayed_attention.testing import SPEC

F64 = dict(ratio=1e-9, atol=1e-12)
FLOAT64_BACKENDS = [name for name, backend in OP.backends.items() if backend.float64]


def _args(inputs) -> tuple:
    return tuple(inputs.tensors[name] for name in ("q", "k", "v", "log_gamma"))


@pytest.mark.parametrize("per_token", [False, True], ids=["const", "token"])
@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_matches_explicit_sum(backend, per_token):
    """The closed form, written as loops over plain products of the decays gamma = exp(log_gamma):

    o[t] = scale * sum_k q[t, k] (prod_{r <= t} gamma[r, k] S0[k]
                                  + sum_{s <= t} prod_{s < r <= t} gamma[r, k] k[s, k] v[s])
    """
    T, K, V, scale = 6, 3, 2, 0.5
    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 1, T, 1, K, generator=gen, dtype=torch.float64)
    v = torch.randn(1, T, 1, V, generator=gen, dtype=torch.float64)
    h0 = torch.randn(1, 1, K, V, generator=gen, dtype=torch.float64)
    gamma = 0.1 + 0.8 * torch.rand((1, T, 1, K) if per_token else (1, K), generator=gen, dtype=torch.float64)
    gamma_at = (lambda r: gamma[0, r, 0]) if per_token else (lambda r: gamma[0])  # [K] decay applied at r

    expected = torch.zeros(1, T, 1, V, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            from_start = math.prod(gamma_at(r)[j].item() for r in range(t + 1))
            total = from_start * h0[0, 0, j]
            for s in range(t + 1):
                decay = math.prod(gamma_at(r)[j].item() for r in range(s + 1, t + 1))
                total = total + decay * k[0, s, 0, j] * v[0, s, 0]
            expected[0, t, 0] += scale * q[0, t, 0, j] * total
    o, _ = decayed_attention(q, k, v, gamma.log(), scale=scale, initial_state=h0, backend=backend)
    assert_close("o", expected, o, **F64)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_constant_decay_gradient_sums_per_token_gradient(backend):
    """A constant ``[H, K]`` decay is the per-token one repeated: same output, and its gradient is the
    per-token gradient summed over batch and positions."""
    case = Case(OP.name, "const_mixed", 65)
    q, k, v, log_gamma = (x.clone().requires_grad_() for x in _args(case_inputs(case)))
    per_token = log_gamma.detach().expand(2, 65, *log_gamma.shape).clone().requires_grad_()
    weights = torch.randn(2, 65, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = {}
    for name, decay in (("const", log_gamma), ("token", per_token)):
        o, _ = decayed_attention(q, k, v, decay, scale=0.5, backend=backend)
        results[name] = (o, torch.autograd.grad((o * weights).sum(), decay)[0])
    assert_close("o", results["token"][0], results["const"][0], **F64)
    assert_close("dlog_gamma", results["token"][1].sum(dim=(0, 1)), results["const"][1], **F64)


def k2_case() -> tuple[dict, dict]:
    """The K-Operators decay path: one head, K = r = 32, odd V = d = 129, the K2 decays, unit q and k."""
    inputs = case_inputs(Case(OP.name, "const_typical", 100, with_state=False, dims=(("H", 1), ("K", 32), ("V", 129))))
    tensors = dict(inputs.tensors, **{name: F.normalize(inputs.tensors[name], dim=-1) for name in "qk"})
    tensors["log_gamma"] = torch.log(torch.linspace(0.15, 0.995, 32, dtype=torch.float64))[None]  # [1, r]
    return tensors, torch.randn(2, 100, 1, 129, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _forward_backward(tensors: dict, weights: torch.Tensor, backend: str, dtype: torch.dtype) -> dict:
    leaves = {name: x.to(dtype).requires_grad_() for name, x in tensors.items()}
    o, _ = decayed_attention(*leaves.values(), scale=1.0, backend=backend)
    grads = torch.autograd.grad((o * weights.to(dtype)).sum(), list(leaves.values()))
    return {"o": o, **{f"d{name}": grad for name, grad in zip(leaves, grads, strict=True)}}


@pytest.mark.parametrize("backend", [name for name in FLOAT64_BACKENDS if name != "naive"])
def test_k2_decay_path_shape(backend):
    """The shape the K2 mixer calls (1 head, K = 32, V = 129, scale 1) matches naive in float64."""
    tensors, weights = k2_case()
    assert_all_close(_forward_backward(tensors, weights, "naive", torch.float64),
                     _forward_backward(tensors, weights, backend, torch.float64), **F64)


@cuda_only("fla")
def test_fla_k2_decay_path_shape_bfloat16():
    """fla's chunk_gla at the K2 shape in bf16 (fla autotunes for this shape once)."""
    tensors, weights = k2_case()
    tensors = {name: x.to(torch.bfloat16).double() for name, x in tensors.items()}
    weights = weights.to(torch.bfloat16).double()
    ref = _forward_backward(tensors, weights, "naive", torch.float64)
    out = _forward_backward({n: x.cuda() for n, x in tensors.items()}, weights.cuda(), "fla", torch.bfloat16)
    assert_all_close(ref, out, ratio=1.5e-2)


@pytest.mark.parametrize("log_gamma", [math.log(0.01), -30.0], ids=["gamma_0.01", "log_decay_-30"])
@pytest.mark.parametrize("per_token", [False, True], ids=["const", "token"])
def test_chunk_stays_finite_at_the_strongest_decays(log_gamma, per_token):
    """Every decay of the chunked form is exp of a sum within one chunk, so nothing overflows in
    float32 at gamma = 0.01 or a full reset (log decay -30) over 333 positions, forward or backward."""
    case = Case(OP.name, "token_small" if per_token else "const_small", 333)
    inputs = case_inputs(case)
    shape = inputs.tensors["log_gamma"].shape
    tensors = dict(inputs.tensors, log_gamma=torch.full(shape, log_gamma, dtype=torch.float64))
    outs = {}
    for backend, dtype in (("naive", torch.float64), ("chunk", torch.float32)):
        leaves = {name: x.to(dtype).requires_grad_() for name, x in tensors.items()}
        h0 = inputs.initial_state.to(dtype).requires_grad_()
        o, final_state = decayed_attention(*leaves.values(), scale=0.5, initial_state=h0, output_final_state=True,
                                           backend=backend)
        grads = torch.autograd.grad(o.square().sum() + final_state.sum(), [*leaves.values(), h0])
        outs[backend] = {"o": o, "final_state": final_state, **{f"g{i}": g for i, g in enumerate(grads)}}
    for name, x in outs["chunk"].items():
        assert torch.isfinite(x).all(), f"{name} is not finite"
    assert_all_close(outs["naive"], outs["chunk"], ratio=SPEC.ratio("chunk", torch.float32))


def test_scale_none_means_inverse_sqrt_of_K():
    inputs = case_inputs(Case(OP.name, "token_logsigmoid", 7))
    default, _ = decayed_attention(*_args(inputs), backend="naive")
    explicit, _ = decayed_attention(*_args(inputs), scale=8 ** -0.5, backend="naive")
    assert torch.equal(default, explicit)


def test_check_values_false_skips_the_value_check_only():
    """``check_values=False`` reads nothing back: a positive log decay passes, a bad shape still raises."""
    q, k, v, _ = (x.float() for x in _args(case_inputs(Case(OP.name, "const_small", 5))))
    o, _ = decayed_attention(q, k, v, torch.full((2, 8), 0.1), check_values=False, backend="chunk")
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match=r"log_gamma .*must be <= 0"):
        decayed_attention(q, k, v, torch.full((2, 8), 0.1), backend="chunk")
    with pytest.raises(ValueError, match=r"log_gamma must have shape"):
        decayed_attention(q, k, v, torch.zeros(8), check_values=False, backend="chunk")


def test_k2_mixer_does_not_read_its_decays_back(monkeypatch):
    """The K2 mixer builds its log decays in range, so its forward skips the check that waits for the device."""
    from linmix.layers.k2 import K2Config, K2Mixer

    package = importlib.import_module("linmix.ops.decayed_attention")  # the package, not the function it exports

    def refuse(*_):
        raise AssertionError("check_log_decay was called")

    monkeypatch.setattr(package, "check_log_decay", refuse)
    with pytest.raises(AssertionError, match="check_log_decay was called"):  # the spy is where the op looks
        decayed_attention(*(x.float() for x in _args(case_inputs(Case(OP.name, "const_small", 5)))))
    layer = K2Mixer(K2Config(d_model=16, rank=4, kbase="toeplitz", kbase_taps=4, decay_backend="chunk"))
    y, _ = layer(torch.randn(2, 9, 16))
    assert y.shape == (2, 9, 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_output_and_state_dtypes(dtype):
    """``o`` in the input dtype; the state float64 for float64 inputs, float32 otherwise (float16 too)."""
    inputs = case_inputs(Case(OP.name, "const_small", 7))
    o, final_state = decayed_attention(*(x.to(dtype) for x in _args(inputs)),
                                       initial_state=inputs.initial_state.to(dtype), output_final_state=True)
    assert o.dtype == dtype
    assert final_state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_marks())])
def test_auto_is_triton_on_cuda_and_chunk_elsewhere(device):
    """``backend="auto"`` runs the fused kernels on CUDA and the chunked form on the CPU, bitwise."""
    case = Case(OP.name, "token_mixed", 65)
    expected = "triton" if device == "cuda" else "chunk"
    auto, chosen = (run(case, backend, torch.float32, device) for backend in ("auto", expected))
    assert all(torch.equal(auto[name], chosen[name]) for name in auto)
    assert_all_close(reference(case), auto, ratio=SPEC.ratio(expected, torch.float32))


def test_step_rejects_a_wrong_state_shape():
    q = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, K, V\]"):
        decayed_attention_step(q, q, torch.zeros(2, 1, 3), torch.zeros(1, 4), torch.zeros(2, 1, 4, 4))
