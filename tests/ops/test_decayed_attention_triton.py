"""decayed_attention's Triton backend against the token loop, forward and backward.

Without CUDA the kernels run in Triton's interpreter on the CPU: ``TRITON_INTERPRET=1`` is set
here, before triton is first imported (linmix imports it only at the first launch, so setting it
after ``import linmix`` works). The ``gpu`` tests need CUDA and run with ``pytest -m gpu``.
"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_close, assert_close

from linmix.ops import decayed_attention

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; run this file alone", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from linmix.ops.decayed_attention.triton import (  # noqa: E402 (needs triton)
    decayed_attention_backward,
    decayed_attention_forward,
    triton_decayed_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 0.5
FP32 = dict(ratio=1e-4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _log_gamma(regime: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Float64 log decays of one regime, ``[H, K]`` or ``[B, T, H, K]``."""
    uniform = torch.rand(shape, generator=gen, dtype=torch.float64)
    if regime == "small":  # gamma in [0.01, 0.05]
        return torch.log(0.01 + 0.04 * uniform)
    if regime == "gamma_0.01":
        return torch.full(shape, math.log(0.01), dtype=torch.float64)
    if regime == "near_one":  # gamma in [0.999, 0.9999]
        return torch.log(0.999 + 0.0009 * uniform)
    if regime == "logsigmoid":
        return F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64))
    if regime == "spread":  # gamma from 0.01 to 0.9999 across the key channels
        return torch.log(torch.linspace(0.01, 0.9999, shape[-1], dtype=torch.float64)).expand(shape)
    assert regime == "mixed", regime  # each entry one of: a full reset, 0.01, 0.5, 0.9999, no decay
    extremes = torch.tensor([-30.0, math.log(0.01), math.log(0.5), math.log(0.9999), 0.0], dtype=torch.float64)
    return extremes[torch.randint(len(extremes), shape, generator=gen)]


def make_case(B, T, H, K, V, decay: str, with_h0: bool, seed: int = 0) -> tuple[dict, dict]:
    """Float64 CPU inputs and cotangents; ``decay`` is ``const_<regime>`` or ``token_<regime>``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    kind, regime = decay.split("_", 1)
    shape = (H, K) if kind == "const" else (B, T, H, K)
    inputs = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V)}
    inputs["log_gamma"] = _log_gamma(regime, shape, gen)
    if with_h0:
        inputs["initial_state"] = randn(B, H, K, V)
    cotangents = {"o": randn(B, T, H, V), "final_state": randn(B, H, K, V)}
    return inputs, cotangents


def run(backend: str, inputs: dict, cotangents: dict, dtype: torch.dtype, fn=decayed_attention,
        cu_seqlens: torch.Tensor | None = None) -> dict:
    """Forward and backward on ``DEVICE``: ``o``, the final state and the gradient of every input."""
    leaves = {name: x.detach().to(DEVICE, dtype).requires_grad_() for name, x in inputs.items()}
    args = (leaves["q"], leaves["k"], leaves["v"], leaves["log_gamma"])
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(DEVICE)
    if fn is decayed_attention:
        kwargs = dict(scale=SCALE, initial_state=leaves.get("initial_state"), output_final_state=True, backend=backend)
        o, final_state = fn(*args, **kwargs, cu_seqlens=cu_seqlens)
    else:
        o, final_state = fn(*args, SCALE, leaves.get("initial_state"), True, cu_seqlens=cu_seqlens)
    loss = (o.double() * cotangents["o"].to(DEVICE)).sum()
    loss = loss + (final_state.double() * cotangents["final_state"].to(DEVICE)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    result = {"o": o.detach(), "final_state": final_state.detach()}
    result.update({f"d{name}": grad for name, grad in zip(leaves, grads, strict=True)})
    return result


# (B, T, H, K, V, decay, with_h0): every length, both K and V, each decay regime, with and without h0.
# Inside a sub-block the kernels factor the decays through its middle row unless a decay is below
# about exp(-7.5): the "mixed" regimes (full resets, log decay -30) take the per-key loop instead.
CASES = [
    (2, 1, 2, 16, 8, "const_small", True),
    (2, 7, 2, 32, 40, "token_logsigmoid", False),
    (1, 63, 1, 16, 8, "const_gamma_0.01", True),
    (1, 64, 2, 32, 8, "const_near_one", False),
    (2, 65, 1, 16, 40, "token_mixed", True),
    (2, 65, 1, 32, 8, "const_mixed", True),
    (1, 130, 1, 16, 8, "const_gamma_0.01", False),
    (1, 130, 1, 16, 8, "token_near_one", True),
    (1, 130, 1, 32, 40, "token_logsigmoid", True),
    (1, 130, 1, 16, 8, "token_mixed", False),
]
CASE_IDS = [f"T{T}-K{K}-V{V}-{decay}-{'h0' if h0 else 'no_h0'}" for _, T, _, K, V, decay, h0 in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_naive(case):
    inputs, cotangents = make_case(*case)
    ref = run("naive", inputs, cotangents, torch.float64)
    out = run("triton", inputs, cotangents, torch.float32)
    assert out["o"].dtype == torch.float32 and out["final_state"].dtype == torch.float32
    assert_all_close(ref, out, **FP32)


# (cu_seqlens, K, V, decay): odd lengths, a sequence of one position, chunk-aligned and not.
PACKED_CASES = [
    ([0, 1, 8, 71, 200], 16, 8, "token_mixed"),
    ([0, 64, 65, 130], 32, 40, "const_gamma_0.01"),
    ([0, 63, 190], 16, 24, "token_logsigmoid"),
]


@pytest.mark.parametrize("fn", [decayed_attention, triton_decayed_attention], ids=["public_api", "backend"])
@pytest.mark.parametrize("case", PACKED_CASES, ids=[f"N{len(c[0]) - 1}-T{c[0][-1]}-{c[3]}" for c in PACKED_CASES])
def test_packed_sequences_match_naive(case, fn):
    """``cu_seqlens`` into the backend: one launch for all sequences, as if each ran alone."""
    bounds, K, V, decay = case
    cu_seqlens = torch.tensor(bounds)
    N, T = len(bounds) - 1, bounds[-1]
    inputs, cotangents = make_case(1, T, 2, K, V, decay, with_h0=False, seed=N)
    gen = torch.Generator().manual_seed(1)
    inputs["initial_state"] = torch.randn(N, 2, K, V, generator=gen, dtype=torch.float64)
    cotangents["final_state"] = torch.randn(N, 2, K, V, generator=gen, dtype=torch.float64)
    ref = run("naive", inputs, cotangents, torch.float64, cu_seqlens=cu_seqlens)
    out = run("triton", inputs, cotangents, torch.float32, fn=fn, cu_seqlens=cu_seqlens)
    assert_all_close(ref, out, **FP32)


def test_tiles_over_keys_and_values():
    """K = 32 in two tiles and V = 40 in three (the last one partial) through the launchers."""
    inputs, cotangents = make_case(1, 70, 1, 32, 40, "token_logsigmoid", True, seed=3)
    ref = run("naive", inputs, cotangents, torch.float64)
    q, k, v, log_gamma, h0, do, dfinal = (
        x.to(DEVICE, torch.float32) for x in (*inputs.values(), *cotangents.values())
    )
    tiles = dict(block_k=16, block_v=16)
    o, final_state, *kept = decayed_attention_forward(q, k, v, log_gamma, SCALE, h0, **tiles)
    grads = decayed_attention_backward(q, k, v, log_gamma, SCALE, h0, do, dfinal, *kept, **tiles)
    out = dict(zip(("dq", "dk", "dv", "dlog_gamma", "dinitial_state"), grads, strict=True))
    assert_all_close(ref, {"o": o, "final_state": final_state, **out}, **FP32)


def test_gradient_through_the_final_state_alone():
    """``o`` unused: its gradient reaches the backward as None, and the state's alone flows back."""
    inputs, _ = make_case(1, 70, 1, 16, 8, "token_logsigmoid", True, seed=6)
    grads = {}
    for backend, dtype in (("naive", torch.float64), ("triton", torch.float32)):
        leaves = [x.to(DEVICE, dtype).requires_grad_() for x in inputs.values()]
        q, k, v, log_gamma, h0 = leaves
        _, final_state = decayed_attention(
            q, k, v, log_gamma, scale=SCALE, initial_state=h0, output_final_state=True, backend=backend
        )
        grads[backend] = torch.autograd.grad(final_state.square().sum(), leaves, materialize_grads=True)
    for name, ref, out in zip(("dq", "dk", "dv", "dlog_gamma", "dh0"), grads["naive"], grads["triton"], strict=True):
        assert_close(name, ref, out, **FP32)


def test_final_state_is_none_unless_requested():
    inputs, _ = make_case(1, 9, 1, 16, 8, "const_small", True)
    args = [inputs[n].to(DEVICE, torch.float32) for n in ("q", "k", "v", "log_gamma")]
    o, final_state = decayed_attention(*args, scale=SCALE, backend="triton")
    assert final_state is None
    ref, _ = decayed_attention(*args, scale=SCALE, backend="naive")
    assert_close("o", ref, o, **FP32)


def test_bfloat16_inputs():
    """16-bit tensors straight into the backend: loaded in 16 bits, outputs and gradients in their dtypes."""
    inputs, cotangents = _bfloat16_case(1, 65, 1, 16, 8, "token_logsigmoid", seed=4)
    out = run("triton", inputs, cotangents, torch.bfloat16, fn=triton_decayed_attention)
    ref = run("naive", inputs, cotangents, torch.float64)
    assert out["o"].dtype == torch.bfloat16 and out["final_state"].dtype == torch.float32
    assert all(out[f"d{name}"].dtype == torch.bfloat16 for name in inputs)
    assert_all_close(ref, out, ratio=1e-2)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks CPU tensors without the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    inputs, _ = make_case(1, 5, 1, 16, 8, "const_small", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend 'triton' needs CUDA tensors, got cpu"):
        decayed_attention(*(x.float() for x in inputs.values()), backend="triton")


def test_float64_runs_the_chunked_form():
    inputs, cotangents = make_case(1, 20, 1, 16, 8, "const_mixed", True)
    ref = run("chunk", inputs, cotangents, torch.float64)
    out = run("triton", inputs, cotangents, torch.float64)
    assert all(torch.equal(ref[name], out[name]) for name in ref)


def _bfloat16_case(B, T, H, K, V, decay: str, seed: int) -> tuple[dict, dict]:
    """A case with initial state whose inputs and cotangents are rounded to bf16 (and kept in float64)."""
    inputs, cotangents = make_case(B, T, H, K, V, decay, True, seed)
    return ({name: x.to(torch.bfloat16).double() for name, x in case.items()} for case in (inputs, cotangents))


def _op_args(T: int = 20) -> tuple:
    inputs, cotangents = make_case(1, T, 1, 16, 8, "token_logsigmoid", True)
    q, k, v, log_gamma, h0 = (x.to(DEVICE, torch.float32) for x in inputs.values())
    return (q, k, v, log_gamma, SCALE, h0), (cotangents["o"].to(DEVICE, torch.float32), None)


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
def test_custom_ops_pass_opcheck(packed):
    """Schema, fake (meta) implementations and autograd registration of both custom ops."""
    forward_args, (do, _) = _op_args()
    cu_seqlens = torch.tensor([0, 7, 20], device=DEVICE) if packed else None
    if packed:
        forward_args = (*forward_args[:5], forward_args[5].expand(2, -1, -1, -1).contiguous())
    forward_args = (*forward_args, cu_seqlens)
    torch.library.opcheck(torch.ops.linmix.decayed_attention_fwd.default, forward_args)
    _, _, *kept = torch.ops.linmix.decayed_attention_fwd(*forward_args)
    backward_args = (*forward_args, do, None, *(x.detach() for x in kept))
    torch.library.opcheck(torch.ops.linmix.decayed_attention_bwd.default, backward_args)


def test_compiles_without_graph_break():
    """``fullgraph=True`` through the custom op and its autograd formula (aot_eager: no inductor needed)."""
    (q, k, v, log_gamma, scale, h0), _ = _op_args()
    leaves = [x.requires_grad_() for x in (q, k, v, log_gamma, h0)]

    def loss(q, k, v, log_gamma, h0):
        o, final_state = decayed_attention(
            q, k, v, log_gamma, scale=scale, initial_state=h0, output_final_state=True, backend="triton"
        )
        return (o * o).sum() + final_state.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(loss(*leaves), leaves)
    compiled_grads = torch.autograd.grad(compiled(*leaves), leaves)
    for name, ref, out in zip(("dq", "dk", "dv", "dlog_gamma", "dh0"), eager_grads, compiled_grads, strict=True):
        assert_close(name, ref, out, ratio=1e-6)


# ---- GPU (pytest -m gpu): the shapes the models use, long sequences, bf16 and torch.compile ----

GPU_LENGTHS = [1, 63, 333, 1000]
GPU_SHAPES = {"K32-V1024": (2, 1, 32, 1024), "K128-V128": (2, 2, 128, 128)}  # (B, H, K, V)
GPU_DECAYS = ["const_spread", "token_logsigmoid", "token_mixed"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("decay", GPU_DECAYS)
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
@pytest.mark.parametrize("T", GPU_LENGTHS, ids=[f"T{T}" for T in GPU_LENGTHS])
def test_gpu_float32_matches_naive(T, shape, decay):
    B, H, K, V = shape
    inputs, cotangents = make_case(B, T, H, K, V, decay, with_h0=True, seed=T)
    ref = run("naive", inputs, cotangents, torch.float64)
    assert_all_close(ref, run("triton", inputs, cotangents, torch.float32), **FP32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("direct", [False, True], ids=["public_api", "backend_16bit"])
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
@pytest.mark.parametrize("T", [63, 1000], ids=["T63", "T1000"])
def test_gpu_bfloat16_matches_naive(T, shape, direct):
    """bf16 through the public API (computed in float32) and straight into the backend (16-bit loads, TF32)."""
    B, H, K, V = shape
    inputs, cotangents = _bfloat16_case(B, T, H, K, V, "const_spread", seed=T)
    ref = run("naive", inputs, cotangents, torch.float64)
    fn = triton_decayed_attention if direct else decayed_attention
    out = run("triton", inputs, cotangents, torch.bfloat16, fn=fn)
    assert out["o"].dtype == torch.bfloat16
    assert_all_close(ref, out, ratio=1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("decay", ["token_logsigmoid", "token_mixed"])
def test_gpu_float16_matches_naive(decay):
    """float16 straight into the backend: its in-sub-block factors (up to exp(60)) multiply in TF32, not in float16."""
    inputs, cotangents = make_case(2, 333, 2, 64, 96, decay, with_h0=True, seed=11)
    inputs, cotangents = ({name: x.to(torch.float16).double() for name, x in case.items()} for case in (inputs, cotangents))
    ref = run("naive", inputs, cotangents, torch.float64)
    out = run("triton", inputs, cotangents, torch.float16, fn=triton_decayed_attention)
    assert out["o"].dtype == torch.float16
    assert_all_close(ref, out, ratio=1e-2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_is_triton():
    inputs, cotangents = make_case(2, 100, 2, 32, 64, "token_logsigmoid", with_h0=True)
    auto = run("auto", inputs, cotangents, torch.float32)
    triton_out = run("triton", inputs, cotangents, torch.float32)
    assert all(torch.equal(auto[name], triton_out[name]) for name in auto)


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_fullgraph():
    inputs, _ = make_case(2, 333, 1, 32, 1024, "const_spread", with_h0=True)
    leaves = [x.to(DEVICE, torch.float32).requires_grad_() for x in inputs.values()]

    def loss(q, k, v, log_gamma, h0):
        o, final_state = decayed_attention(q, k, v, log_gamma, initial_state=h0, output_final_state=True)
        return (o * o).sum() + final_state.square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_grads = torch.autograd.grad(loss(*leaves), leaves)
    compiled_grads = torch.autograd.grad(compiled(*leaves), leaves)
    for name, ref, out in zip(("dq", "dk", "dv", "dlog_gamma", "dh0"), eager_grads, compiled_grads, strict=True):
        assert_close(name, ref, out, ratio=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_packed_sequences_match_naive(dtype):
    """Seven packed sequences of odd lengths (1 to 1000) in one launch, per-token extreme decays."""
    bounds = [0, 1, 8, 71, 404, 467, 1467, 1800]
    cu_seqlens = torch.tensor(bounds)
    N, T, H, K, V = len(bounds) - 1, bounds[-1], 2, 64, 96
    inputs, cotangents = make_case(1, T, H, K, V, "token_mixed", with_h0=False, seed=7)
    gen = torch.Generator().manual_seed(2)
    inputs["initial_state"] = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64)
    cotangents["final_state"] = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64)
    if dtype == torch.bfloat16:
        inputs, cotangents = ({name: x.to(dtype).double() for name, x in case.items()} for case in (inputs, cotangents))
    ref = run("naive", inputs, cotangents, torch.float64, cu_seqlens=cu_seqlens)
    out = run("triton", inputs, cotangents, dtype, fn=triton_decayed_attention, cu_seqlens=cu_seqlens)
    assert_all_close(ref, out, **(FP32 if dtype == torch.float32 else dict(ratio=1e-2)))


def test_k2_layer_compiles_without_graph_break():
    """A whole K2 mixer (Toeplitz Kbase, Triton decay path) under ``fullgraph=True``, forward and backward."""
    from linmix.layers.k2 import K2Config, K2Mixer

    torch.manual_seed(0)
    layer = K2Mixer(K2Config(d_model=32, rank=16, kbase="toeplitz", kbase_taps=8, decay_backend="triton")).to(DEVICE)
    x = torch.randn(2, 70, 32, device=DEVICE, requires_grad=True)

    def loss(x):
        y, _ = layer(x)
        return y.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    params = [x, *layer.parameters()]
    eager_grads = torch.autograd.grad(loss(x), params)
    compiled_grads = torch.autograd.grad(compiled(x), params)
    for i, (ref, out) in enumerate(zip(eager_grads, compiled_grads, strict=True)):
        assert_close(f"grad {i}", ref, out, ratio=1e-6)


class _LaunchRecorder:
    """Stands in for the kernel module: each ``kernel[grid](...)`` records the bytes of the distinct tensors it gets."""

    def __init__(self):
        self.bytes = {}

    def __getattr__(self, kernel_name):
        def launch(*args, **kwargs):
            tensors = {t.data_ptr(): t.nbytes for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
            self.bytes[kernel_name] = self.bytes.get(kernel_name, 0) + sum(tensors.values())

        return _Grid(launch)


class _Grid:
    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        return self.launch


@pytest.mark.parametrize("per_token", [False, True])
def test_kernel_traffic_model_counts_every_tensor_each_kernel_touches(monkeypatch, per_token):
    """``kernel_traffic`` (the bench's "kernel traffic") equals the bytes of the tensors passed to each launch."""
    tri = sys.modules["linmix.ops.decayed_attention.triton"]
    recorder = _LaunchRecorder()
    monkeypatch.setattr(tri, "_kernels", lambda: recorder)
    B, T, H, K, V = 2, 100, 3, 32, 48
    q, k = (torch.randn(B, T, H, K, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    v = torch.randn(B, T, H, V, dtype=torch.bfloat16, device=DEVICE)
    log_gamma = -torch.rand((B, T, H, K) if per_token else (H, K), device=DEVICE)
    o, _, h, A, decay = decayed_attention_forward(q, k, v, log_gamma, 1.0, None)
    forward = sum(recorder.bytes.values())
    assert set(recorder.bytes) == {"chunk_states_kernel", "chunk_scores_kernel", "chunk_output_kernel"}
    assert forward == tri.kernel_traffic(B, T, H, K, V, 2, per_token, backward=False)
    decayed_attention_backward(q, k, v, log_gamma, 1.0, None, torch.randn_like(o), None, h, A, decay)
    assert len(recorder.bytes) == 8
    assert sum(recorder.bytes.values()) == tri.kernel_traffic(B, T, H, K, V, 2, per_token, backward=True)
    from linmix.bench import get_op  # imported late: it imports triton, which must see TRITON_INTERPRET first

    bench_backend = get_op("decayed_attention").backends["triton"]  # the bench reports this model as "kernel traffic"
    shape = dict(B=B, T=T, H=H, K=K, V=V, decay="per-token" if per_token else "constant")
    assert bench_backend.traffic(shape, torch.bfloat16, "fwdbwd") == sum(recorder.bytes.values())
