"""causal_kernel's Triton Toeplitz backend against the token loop, forward and backward.

Without CUDA the kernels run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set here
before triton is first imported). The ``gpu`` tests run with ``pytest -m gpu``.
"""

import os
import sys

import pytest
import torch
from helpers import assert_close

from linmix.ops import causal_kernel

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; run this file alone", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(B, T, H, D, L, dtype, per_head, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=gen).to(DEVICE, dtype)
    kernel = torch.randn(H, L, generator=gen) if per_head else torch.randn(L, generator=gen)
    return x.requires_grad_(), kernel.to(DEVICE, dtype).requires_grad_()


def _check(B, T, H, D, L, per_head, dtype=torch.float32, ratio=1e-5):
    x, kernel = _inputs(B, T, H, D, L, dtype, per_head)
    x_ref, k_ref = (t.detach().double().requires_grad_() for t in (x, kernel))
    ref = causal_kernel(x_ref, k_ref, form="toeplitz", backend="naive")
    out = causal_kernel(x, kernel, form="toeplitz", backend="triton")
    assert out.dtype == dtype and out.shape == x.shape
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad.to(dtype))
    assert_close("y", ref, out.double(), ratio)
    assert_close("dx", x_ref.grad, x.grad.double(), ratio)
    assert_close("dkernel", k_ref.grad, kernel.grad.double(), ratio)


@pytest.mark.parametrize("T", [1, 7, 33, 70])
@pytest.mark.parametrize("L", [1, 8, 16])
def test_triton_toeplitz_matches_naive(T, L):
    _check(B=2, T=T, H=2, D=20, L=L, per_head=True)


def test_triton_toeplitz_shared_filter_and_wide_channels():
    _check(B=1, T=40, H=1, D=150, L=5, per_head=False)


def test_triton_toeplitz_bf16():
    _check(B=1, T=45, H=2, D=16, L=8, per_head=True, dtype=torch.bfloat16, ratio=1e-2)


def test_auto_uses_conv_on_cpu():
    x, kernel = _inputs(1, 9, 1, 4, 3, torch.float32, per_head=False)
    if DEVICE == "cpu":
        assert_close("auto", causal_kernel(x, kernel, backend="conv"), causal_kernel(x, kernel), 1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("T", [1, 63, 333, 4099])
def test_gpu_triton_toeplitz(T, dtype, ratio):
    _check(B=2, T=T, H=1, D=1024, L=16, per_head=False, dtype=dtype, ratio=ratio)


@pytest.mark.gpu
@needs_cuda
def test_gpu_triton_toeplitz_compiles_without_graph_breaks():
    x, kernel = _inputs(2, 300, 1, 128, 16, torch.float32, per_head=False)
    compiled = torch.compile(lambda a, b: causal_kernel(a, b, backend="triton"), fullgraph=True)
    assert_close("compiled", causal_kernel(x, kernel, backend="triton"), compiled(x, kernel), 1e-6)
