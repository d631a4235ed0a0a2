"""decayed_attention's Triton backend: what the op contract does not reach, and the GPU's larger cases.

On the CPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
without CUDA). Here: the float64 fallback, the refusal of CPU tensors without the interpreter, the
launchers' tiling, a gradient through the final state alone, ``opcheck`` of the custom ops, the
kernel-traffic model, a whole K2 mixer under ``torch.compile``; and with ``-m gpu`` the shapes the
models use, long sequences, bf16 and float16 and many packed sequences, against the CPU float64
reference.
"""

import sys

import pytest
import torch
from helpers import assert_all_close, assert_close
from op_harness import Case, case_inputs, gpu_only, reference, run

from linmix.ops import decayed_attention
from linmix.ops.decayed_attention import OP
from linmix.ops.decayed_attention.testing import SPEC

pytest.importorskip("triton")

from linmix.ops.decayed_attention.triton import (  # noqa: E402 (needs triton)
    decayed_attention_backward,
    decayed_attention_forward,
    kernel_traffic,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = dict(ratio=SPEC.ratio("triton", torch.float32))
BF16 = dict(ratio=SPEC.ratio("triton", torch.bfloat16))
GRADIENTS = ("dq", "dk", "dv", "dlog_gamma", "dinitial_state")


def _tensors(case: Case, dtype=torch.float32) -> list[torch.Tensor]:
    """q, k, v, log_gamma and the initial state of a case on DEVICE."""
    inputs = case_inputs(case)
    return [x.to(DEVICE, dtype) for x in (*inputs.tensors.values(), inputs.initial_state)]


def test_float64_runs_the_chunked_form():
    """Float64 inputs named for triton (whose kernels stop at float32) run the chunked form, bitwise."""
    case = Case(OP.name, "const_mixed", 20)
    chunk, triton = (run(case, backend, torch.float64, DEVICE) for backend in ("chunk", "triton"))
    assert all(torch.equal(chunk[name], triton[name]) for name in chunk)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, log_gamma = (x.float() for x in case_inputs(Case(OP.name, "const_small", 5)).tensors.values())  # CPU
    with pytest.raises(ValueError, match=r"backend 'triton' of decayed_attention needs CUDA tensors, got cpu"):
        decayed_attention(q, k, v, log_gamma, backend="triton")


def test_tiles_over_keys_and_values():
    """K = 32 in two tiles of 16 and V = 40 in three (the last one partial) through the launchers."""
    case = Case(OP.name, "token_logsigmoid", 70, dims=(("B", 1), ("H", 1), ("K", 32), ("V", 40)))
    q, k, v, log_gamma, h0 = _tensors(case)
    do = torch.randn(v.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    tiles = dict(block_k=16, block_v=16)
    o, final_state, *kept = decayed_attention_forward(q, k, v, log_gamma, 0.5, h0, **tiles)
    grads = decayed_attention_backward(q, k, v, log_gamma, 0.5, h0, do, None, *kept, **tiles)
    leaves = [x.double().requires_grad_() for x in (q, k, v, log_gamma, h0)]
    o_ref, state_ref = decayed_attention(*leaves[:4], scale=0.5, initial_state=leaves[4], output_final_state=True,
                                         backend="naive")
    ref_grads = torch.autograd.grad((o_ref * do.double()).sum(), leaves)
    expected = {"o": o_ref, "final_state": state_ref, **dict(zip(GRADIENTS, ref_grads, strict=True))}
    assert_all_close(expected, {"o": o, "final_state": final_state, **dict(zip(GRADIENTS, grads, strict=True))}, **FP32)


def test_gradient_through_the_final_state_alone():
    """``o`` unused: its gradient reaches the backward as None, and the state's alone flows back."""
    case = Case(OP.name, "token_logsigmoid", 70, dims=(("B", 1), ("H", 1), ("K", 16)))
    grads = {}
    for backend, dtype in (("naive", torch.float64), ("triton", torch.float32)):
        leaves = [x.to(dtype).requires_grad_() for x in _tensors(case, dtype)]
        q, k, v, log_gamma, h0 = leaves
        _, final_state = decayed_attention(q, k, v, log_gamma, scale=0.5, initial_state=h0, output_final_state=True,
                                           backend=backend)
        grads[backend] = torch.autograd.grad(final_state.square().sum(), leaves, materialize_grads=True)
    for name, ref, out in zip(GRADIENTS, grads["naive"], grads["triton"], strict=True):
        assert_close(name, ref, out, **FP32)


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
def test_custom_ops_pass_opcheck(packed):
    """Schema, fake (meta) implementations and autograd registration of both custom ops."""
    case = Case(OP.name, "token_logsigmoid", 20, dims=(("B", 1), ("H", 1), ("K", 16)))
    q, k, v, log_gamma, h0 = _tensors(case)
    cu_seqlens = torch.tensor([0, 7, 20], device=DEVICE) if packed else None
    if packed:
        h0 = h0.expand(2, -1, -1, -1).contiguous()
    forward_args = (q, k, v, log_gamma, 0.5, h0, cu_seqlens)
    torch.library.opcheck(torch.ops.linmix.decayed_attention_fwd.default, forward_args)
    _, _, *kept = torch.ops.linmix.decayed_attention_fwd(*forward_args)
    backward_args = (*forward_args, torch.randn_like(v), None, *(x.detach() for x in kept))
    torch.library.opcheck(torch.ops.linmix.decayed_attention_bwd.default, backward_args)


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
    triton_module = sys.modules["linmix.ops.decayed_attention.triton"]
    recorder = _LaunchRecorder()
    monkeypatch.setattr(triton_module, "_kernels", lambda: recorder)
    B, T, H, K, V = 2, 100, 3, 32, 48
    q, k = (torch.randn(B, T, H, K, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    v = torch.randn(B, T, H, V, dtype=torch.bfloat16, device=DEVICE)
    log_gamma = -torch.rand((B, T, H, K) if per_token else (H, K), device=DEVICE)
    o, _, h, A, decay = decayed_attention_forward(q, k, v, log_gamma, 1.0, None)
    assert set(recorder.bytes) == {"chunk_states_kernel", "chunk_scores_kernel", "chunk_output_kernel"}
    assert sum(recorder.bytes.values()) == kernel_traffic(B, T, H, K, V, 2, per_token, backward=False)
    decayed_attention_backward(q, k, v, log_gamma, 1.0, None, torch.randn_like(o), None, h, A, decay)
    assert len(recorder.bytes) == 8
    assert sum(recorder.bytes.values()) == kernel_traffic(B, T, H, K, V, 2, per_token, backward=True)


def test_k2_layer_compiles_without_graph_break():
    """A whole K2 mixer (Toeplitz Kbase, Triton decay path) under ``fullgraph=True``, forward and backward."""
    from linmix.layers.k2 import K2Config, K2Mixer

    torch.manual_seed(0)
    layer = K2Mixer(K2Config(d_model=32, rank=16, kbase="toeplitz", kbase_taps=8, decay_backend="triton")).to(DEVICE)
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


# ---- GPU (pytest -m gpu): the shapes the models use, long sequences, 16-bit inputs, many packed sequences ----

GPU_SHAPES = {"K32-V1024": (("B", 2), ("H", 1), ("K", 32), ("V", 1024)),  # the K2 decay path at d = 1024
              "K128-V128": (("B", 2), ("H", 2), ("K", 128), ("V", 128))}
GPU_LENGTHS = [1, 63, 333, 1000]
# The long GPU cases compare with the chunked form in float64 on the CPU (the contract suite holds it
# to naive within 1e-9 on every regime): naive's token loop takes seconds per case at V = 1024.
LONG_REFERENCE = "chunk"


@gpu_only
@pytest.mark.parametrize("regime", ["const_spread", "token_logsigmoid", "token_mixed"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=list(GPU_SHAPES))
@pytest.mark.parametrize("T", GPU_LENGTHS, ids=[f"T{T}" for T in GPU_LENGTHS])
def test_gpu_float32_matches_naive(T, shape, regime):
    case = Case(OP.name, regime, T, dims=GPU_SHAPES[shape])
    assert_all_close(reference(case, LONG_REFERENCE), run(case, "triton", torch.float32, "cuda"), **FP32)


@gpu_only
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=list(GPU_SHAPES))
@pytest.mark.parametrize("T", [63, 1000], ids=["T63", "T1000"])
def test_gpu_bfloat16_matches_naive(T, shape):
    """bf16 straight into the kernels (16-bit loads, products in bf16 with float32 sums, TF32 inside sub-blocks)."""
    case = Case(OP.name, "const_spread", T, dims=GPU_SHAPES[shape], rounded_to=torch.bfloat16)
    out = run(case, "triton", torch.bfloat16, "cuda")
    assert out["o"].dtype == torch.bfloat16 and out["final_state"].dtype == torch.float32
    assert_all_close(reference(case, LONG_REFERENCE), out, **BF16)


@gpu_only
@pytest.mark.parametrize("regime", ["token_logsigmoid", "token_mixed"])
def test_gpu_float16_matches_naive(regime):
    """float16 reaches the backend function as it is (``native_dtypes``); its in-sub-block factors (up to
    exp(60)) multiply in TF32, not in float16."""
    case = Case(OP.name, regime, 333, dims=(("B", 2), ("H", 2), ("K", 64), ("V", 96)), rounded_to=torch.float16)
    out = run(case, "triton", torch.float16, "cuda")
    assert out["o"].dtype == torch.float16
    assert_all_close(reference(case, LONG_REFERENCE), out, ratio=1e-2)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_packed_sequences_match_each_run_alone(dtype):
    """Seven packed sequences of odd lengths (1 to 1000) in one launch, per-token extreme decays."""
    bounds = (0, 1, 8, 71, 404, 467, 1467, 1800)
    case = Case(OP.name, "token_mixed", bounds[-1], bounds=bounds, dims=(("H", 2), ("K", 64), ("V", 96)),
                rounded_to=None if dtype == torch.float32 else dtype)
    out = run(case, "triton", dtype, "cuda", index_dtype=torch.int32)
    assert_all_close(reference(case, LONG_REFERENCE), out, **(FP32 if dtype == torch.float32 else BF16))
