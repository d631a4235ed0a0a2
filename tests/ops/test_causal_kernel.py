"""causal_kernel: every backend against the token loop, forward and backward, both forms."""

import functools

import pytest
import torch
from helpers import assert_close

from linmix.ops import causal_kernel

B, H, D = 2, 3, 5
W = 340
LENGTHS = [1, 7, 63, 64, 65, 333]
TAPS = [1, 8, 32]
F64 = dict(ratio=1e-9, atol=1e-12)
# kernel layouts of the toeplitz form: a shared [L] filter on 3-D or 4-D x, or [H, L] per head.
TOEPLITZ_LAYOUTS = ["shared_3d", "shared_4d", "per_head"]


def _randn(gen, *shape):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def run(x: torch.Tensor, kernel: torch.Tensor, cotangent: torch.Tensor, dtype=torch.float64, **kwargs) -> dict:
    """Forward and backward of ``causal_kernel``: the output and the gradients of x and kernel."""
    x = x.detach().to(dtype).requires_grad_()
    kernel = kernel.detach().to(dtype).requires_grad_()
    y = causal_kernel(x, kernel, **kwargs)
    dx, dkernel = torch.autograd.grad((y * cotangent.to(y.dtype)).sum(), [x, kernel])
    return {"y": y.detach(), "dx": dx, "dkernel": dkernel}


def assert_all_close(ref: dict, out: dict, ratio: float, atol: float = 1e-6) -> None:
    for name in ref:
        assert_close(name, ref[name], out[name], ratio, atol=atol)


@functools.cache
def dense_case(T: int, x_dims: int):
    """Inputs of the dense form and the float64 naive result."""
    gen = torch.Generator().manual_seed(10 * T + x_dims)
    x_shape = (B, T, H, D) if x_dims == 4 else (B, T, D)
    x, kernel, dy = _randn(gen, *x_shape), _randn(gen, W, W), _randn(gen, *x_shape)
    return x, kernel, dy, run(x, kernel, dy, form="dense", backend="naive")


@functools.cache
def toeplitz_case(T: int, L: int, layout: str):
    """Inputs of the toeplitz form and the float64 naive result."""
    gen = torch.Generator().manual_seed(1000 * T + 10 * L + TOEPLITZ_LAYOUTS.index(layout))
    x_shape = (B, T, D) if layout == "shared_3d" else (B, T, H, D)
    kernel = _randn(gen, H, L) if layout == "per_head" else _randn(gen, L)
    x, dy = _randn(gen, *x_shape), _randn(gen, *x_shape)
    return x, kernel, dy, run(x, kernel, dy, form="toeplitz", backend="naive")


@pytest.mark.parametrize("x_dims", [3, 4], ids=["x3d", "x4d"])
@pytest.mark.parametrize("T", LENGTHS, ids=[f"T{T}" for T in LENGTHS])
def test_dense_matmul_matches_naive(T, x_dims):
    x, kernel, dy, ref = dense_case(T, x_dims)
    assert_all_close(ref, run(x, kernel, dy, form="dense", backend="matmul"), **F64)


@pytest.mark.parametrize("layout", TOEPLITZ_LAYOUTS)
@pytest.mark.parametrize("L", TAPS, ids=[f"L{L}" for L in TAPS])
@pytest.mark.parametrize("T", LENGTHS, ids=[f"T{T}" for T in LENGTHS])
@pytest.mark.parametrize("backend", ["matmul", "conv"])
def test_toeplitz_matches_naive(backend, T, L, layout):
    x, kernel, dy, ref = toeplitz_case(T, L, layout)
    assert_all_close(ref, run(x, kernel, dy, form="toeplitz", backend=backend), **F64)


@pytest.mark.parametrize(
    "case, form, backend",
    [
        (lambda: dense_case(333, 4), "dense", "naive"),
        (lambda: dense_case(333, 4), "dense", "matmul"),
        (lambda: toeplitz_case(333, 32, "per_head"), "toeplitz", "naive"),
        (lambda: toeplitz_case(333, 32, "per_head"), "toeplitz", "matmul"),
        (lambda: toeplitz_case(333, 32, "shared_3d"), "toeplitz", "conv"),
        (lambda: toeplitz_case(333, 32, "per_head"), "toeplitz", "conv"),
    ],
    ids=["dense-naive", "dense-matmul", "toeplitz-naive", "toeplitz-matmul", "toeplitz-conv-shared", "toeplitz-conv"],
)
def test_float32_matches_float64(case, form, backend):
    x, kernel, dy, ref = case()
    out = run(x, kernel, dy, dtype=torch.float32, form=form, backend=backend)
    assert out["y"].dtype == torch.float32
    assert_all_close(ref, out, ratio=1e-5)


@pytest.mark.parametrize(
    "case, form",
    [(lambda: dense_case(65, 4), "dense"), (lambda: toeplitz_case(65, 8, "per_head"), "toeplitz")],
    ids=["dense", "toeplitz"],
)
def test_bfloat16_smoke(case, form):
    x, kernel, dy, ref = case()
    out = run(x, kernel, dy, dtype=torch.bfloat16, form=form)
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert_all_close(ref, out, ratio=1e-2)


@pytest.mark.parametrize("backend", ["naive", "matmul"])
def test_dense_upper_triangle_gets_zero_gradient(backend):
    x, kernel, dy, _ = dense_case(7, 3)
    kernel = kernel[:12, :12]
    dkernel = run(x, kernel, dy, form="dense", backend=backend)["dkernel"]
    used = torch.zeros(12, 12, dtype=torch.bool)
    used[:7, :7] = True
    used = used.tril()
    assert torch.all(dkernel[~used] == 0)
    assert torch.all(dkernel[used] != 0)


def test_known_kernels():
    x = torch.arange(1.0, 6.0, dtype=torch.float64).reshape(1, 5, 1)  # [1, 5, 1]: 1 2 3 4 5
    delay = torch.tensor([0.0, 1.0], dtype=torch.float64)
    lower_ones = torch.ones(6, 6, dtype=torch.float64)
    for backend in ["naive", "matmul", "conv"]:
        shifted = causal_kernel(x, delay, backend=backend)
        assert shifted.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    for backend in ["naive", "matmul"]:
        prefix_sums = causal_kernel(x, lower_ones, backend=backend)
        assert prefix_sums.flatten().tolist() == [1.0, 3.0, 6.0, 10.0, 15.0]


def test_auto_picks_matmul_for_dense_and_conv_for_toeplitz():
    x, kernel, _, _ = dense_case(65, 4)
    assert torch.equal(causal_kernel(x, kernel), causal_kernel(x, kernel, form="dense", backend="matmul"))
    x, kernel, _, _ = toeplitz_case(65, 8, "per_head")
    assert torch.equal(causal_kernel(x, kernel), causal_kernel(x, kernel, form="toeplitz", backend="conv"))


def test_form_overrides_square_per_head_kernel():
    """An [H, L] kernel with H == L reads as dense under auto; form='toeplitz' makes it per head."""
    gen = torch.Generator().manual_seed(0)
    x, kernel = _randn(gen, B, 4, 4, D), _randn(gen, 4, 4)  # [B, T, H, D] with T = H = L = W = 4
    for form in ["dense", "toeplitz"]:
        ref = causal_kernel(x, kernel, form=form, backend="naive")
        assert_close(form, ref, causal_kernel(x, kernel, form=form), **F64)
    assert torch.equal(causal_kernel(x, kernel), causal_kernel(x, kernel, form="dense"))
    assert not torch.allclose(causal_kernel(x, kernel, form="dense"), causal_kernel(x, kernel, form="toeplitz"))


@pytest.mark.parametrize(
    "form, backend",
    [("dense", "naive"), ("dense", "matmul"), ("toeplitz", "naive"), ("toeplitz", "matmul"), ("toeplitz", "conv")],
    ids=lambda v: v,
)
def test_causal(form, backend):
    x, kernel, _, _ = dense_case(65, 4) if form == "dense" else toeplitz_case(65, 8, "per_head")
    t = 40
    perturbed = x.clone()
    perturbed[:, t + 1] += 1.0
    before = causal_kernel(x, kernel, form=form, backend=backend)
    after = causal_kernel(perturbed, kernel, form=form, backend=backend)
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1], after[:, t + 1])


def _x(*shape, **kwargs):
    return torch.randn(shape, **kwargs)


BAD_INPUTS = {
    "x_not_tensor": (dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor"),
    "x_int_dtype": (dict(x=torch.ones(B, 5, D, dtype=torch.int64)), TypeError, r"x must have a floating dtype"),
    "x_2d": (dict(x=_x(5, D)), ValueError, r"x must be \[B, T, D\] or \[B, T, H, D\], got shape \[5, 5\]"),
    "x_5d": (dict(x=_x(B, 5, H, D, 1)), ValueError, r"x must be \[B, T, D\] or \[B, T, H, D\]"),
    "T_zero": (dict(x=_x(B, 0, D)), ValueError, r"x has sequence length T=0"),
    "kernel_0d": (dict(kernel=_x()), ValueError, r"kernel must be \[W, W\] \(dense\), \[L\] or \[H, L\]"),
    "kernel_3d": (dict(kernel=_x(H, 4, 4)), ValueError, r"kernel must be .*got shape \[3, 4, 4\]"),
    "kernel_dtype": (dict(kernel=_x(8, dtype=torch.float64)), TypeError, r"kernel has dtype torch.float64"),
    "kernel_device": (dict(kernel=torch.empty(8, device="meta")), ValueError, r"kernel is on meta"),
    "kernel_no_taps": (dict(kernel=_x(0)), ValueError, r"kernel must have at least one tap"),
    "per_head_H_mismatch": (dict(x=_x(B, 5, H, D), kernel=_x(H + 1, 6)), ValueError, r"per-head kernel .*H=4"),
    "per_head_on_3d_x": (dict(kernel=_x(H, 4)), ValueError, r"per-head kernel \[H, L\] = \[3, 4\] needs x"),
    "dense_not_square": (dict(kernel=_x(6, 7), form="dense"), ValueError, r"kernel .*square \[W, W\], got .*\[6, 7\]"),
    "dense_1d": (dict(kernel=_x(6), form="dense"), ValueError, r"kernel .*square \[W, W\]"),
    "T_exceeds_W": (dict(kernel=_x(4, 4)), ValueError, r"sequence length T=5 exceeds the kernel window W=4"),
    "form_unknown": (dict(form="fft"), ValueError, r"unknown form 'fft'; valid names are 'auto', 'dense', 'toeplitz'"),
    "backend_unknown": (dict(backend="fft"), ValueError, r"unknown backend 'fft'; valid names are 'naive'"),
    "conv_for_dense": (dict(kernel=_x(6, 6), backend="conv"), ValueError, r"backend 'conv' does not support the dense"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(bad):
    changes, error, match = bad
    args = dict(x=_x(B, 5, D), kernel=_x(8)) | changes
    with pytest.raises(error, match=match):
        causal_kernel(args.pop("x"), args.pop("kernel"), **args)
