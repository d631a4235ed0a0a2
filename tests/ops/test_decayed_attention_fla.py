"""decayed_attention's fla backend (flash-linear-attention's ``chunk_gla``) against the token loop.

The comparisons need CUDA and the optional fla package and run with ``pytest -m gpu``; the check that
CPU tensors are refused runs everywhere, fla or not. fla autotunes its kernels for every new shape,
dtype and index dtype, minutes each on a cold machine, so the cases share few of those (``-n`` of
pytest-xdist runs them side by side).
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_close

from linmix.ops import decayed_attention
from linmix.ops.decayed_attention import BACKENDS
from linmix.ops.decayed_attention.fla import fla_decayed_attention

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_fla = pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla (pip install fla-core)")
RATIO = {torch.float32: 5e-3, torch.bfloat16: 1.5e-2}  # relative RMS error (fla's GLA tests use 5e-3)
SHAPES = {"H4_K64_V64": (4, 64, 64), "k2_H1_K32_V129": (1, 32, 129)}
CASES = {  # shape, dtype: the K-Operators decay path (K = r, V = d) in bf16 only
    "H4_K64_V64-fp32": ("H4_K64_V64", torch.float32),
    "H4_K64_V64-bf16": ("H4_K64_V64", torch.bfloat16),
    "k2_H1_K32_V129-bf16": ("k2_H1_K32_V129", torch.bfloat16),
}
VARLEN_DTYPES = {"fp32-int64": (torch.float32, torch.int64), "bf16-int32": (torch.bfloat16, torch.int32)}
CU_SEQLENS = [0, 1, 64, 129, 500]  # lengths 1, 63, 65 and 371: inside and across fla's 64-position chunks


def make_case(B: int, T: int, shape: tuple[int, int, int], per_token: bool, seed: int = 0, N: int | None = None):
    """Float64 CUDA inputs and cotangents, with ``N`` initial and final states (``B`` if None)."""
    H, K, V = shape
    N = B if N is None else N
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    inputs = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V)}
    if per_token:
        inputs["log_gamma"] = F.logsigmoid(randn(B, T, H, K) + 1.0)
    else:  # gamma from 0.5 to 0.999 across the key channels
        inputs["log_gamma"] = torch.log(torch.linspace(0.5, 0.999, K, dtype=torch.float64)).expand(H, K)
    inputs["initial_state"] = randn(N, H, K, V)
    cotangents = {"o": randn(B, T, H, V), "final_state": randn(N, H, K, V)}
    return tuple({name: x.cuda() for name, x in tensors.items()} for tensors in (inputs, cotangents))


def run(backend: str, inputs: dict, cotangents: dict, dtype: torch.dtype, cu_seqlens=None) -> dict:
    """Forward and backward: ``o``, the final state and the gradient of every input."""
    leaves = {name: x.detach().to(dtype).requires_grad_() for name, x in inputs.items()}
    leaves["initial_state"] = inputs["initial_state"].detach().float().requires_grad_()  # states are float32
    o, final_state = decayed_attention(
        *(leaves[n] for n in ("q", "k", "v", "log_gamma")),
        scale=inputs["q"].shape[-1] ** -0.5,
        initial_state=leaves["initial_state"],
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )
    loss = (o * cotangents["o"].to(o.dtype)).sum()
    loss = loss + (final_state * cotangents["final_state"].to(final_state.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    result = {"o": o.detach(), "final_state": final_state.detach()}
    result.update({f"d{name}": g for name, g in zip(leaves, grads, strict=True)})
    return result


def test_cpu_tensors_are_refused(monkeypatch):
    monkeypatch.setitem(BACKENDS, "fla", fla_decayed_attention)  # registered only where fla is installed
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match=r"backend 'fla' needs CUDA tensors, got cpu"):
        decayed_attention(q, q, torch.randn(1, 5, 2, 4), -torch.rand(2, 8), backend="fla")


@pytest.mark.gpu
@needs_cuda
@needs_fla
@pytest.mark.parametrize("per_token", [False, True], ids=["const", "token"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gpu_matches_naive(case, per_token):
    shape, dtype = case
    inputs, cotangents = make_case(2, 333, SHAPES[shape], per_token)
    out = run("fla", inputs, cotangents, dtype)
    assert out["o"].dtype == dtype and out["final_state"].dtype == torch.float32
    assert_all_close(run("naive", inputs, cotangents, torch.float64), out, RATIO[dtype])


@pytest.mark.gpu
@needs_cuda
@needs_fla
@pytest.mark.parametrize("dtypes", VARLEN_DTYPES.values(), ids=VARLEN_DTYPES.keys())
@pytest.mark.parametrize("per_token", [False, True], ids=["const", "token"])
def test_gpu_varlen_matches_naive(per_token, dtypes):
    dtype, index_dtype = dtypes
    N, T = len(CU_SEQLENS) - 1, CU_SEQLENS[-1]
    inputs, cotangents = make_case(1, T, SHAPES["H4_K64_V64"], per_token, seed=1, N=N)
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=index_dtype, device="cuda")
    out = run("fla", inputs, cotangents, dtype, cu_seqlens)
    assert out["final_state"].shape == (N, 4, 64, 64)
    assert_all_close(run("naive", inputs, cotangents, torch.float64, cu_seqlens), out, RATIO[dtype])


@pytest.mark.gpu
@needs_cuda
@needs_fla
def test_gpu_float64_runs_the_chunked_form():
    inputs, cotangents = make_case(1, 129, SHAPES["H4_K64_V64"], per_token=True, seed=2, N=2)
    cu_seqlens = torch.tensor([0, 60, 129], device="cuda")
    out = run("fla", inputs, cotangents, torch.float64, cu_seqlens)
    assert out["o"].dtype == torch.float64
    assert_all_close(run("naive", inputs, cotangents, torch.float64, cu_seqlens), out, ratio=1e-9)
