"""causal_kernel's own properties, beyond the op contract that ``test_op_contract.py`` checks for every op.

Known kernels, the dense form's unread upper triangle, the choice of form and backend, the decoding
step from an empty history, what the state holds, and the size limit of the dense matrix.
"""

import pytest
import torch
from helpers import assert_close
from op_harness import Case, case_inputs

from linmix.ops import MAX_DENSE_BYTES, causal_kernel, causal_kernel_step, limit_dense_bytes
from linmix.ops.causal_kernel import OP

F64 = dict(ratio=1e-9, atol=1e-12)
CPU = torch.device("cpu")


def _backends_for(form: str) -> list[str]:
    """The backends that run the ``form`` on CPU float64 tensors here."""
    return [name for name, backend in OP.backends.items()
            if backend.refuses({"form": form}) is None and backend.float64 and backend.unavailable(CPU) is None]


def test_known_kernels():
    """A one-step delay shifts the sequence; an all-ones dense kernel takes prefix sums."""
    x = torch.arange(1.0, 6.0, dtype=torch.float64).reshape(1, 5, 1)  # [1, 5, 1]: 1 2 3 4 5
    delay = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for backend in _backends_for("toeplitz"):
        shifted, _ = causal_kernel(x, delay, backend=backend)
        assert shifted.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0], backend
    for backend in _backends_for("dense"):
        prefix_sums, _ = causal_kernel(x, torch.ones(6, 6, dtype=torch.float64), backend=backend)
        assert prefix_sums.flatten().tolist() == [1.0, 3.0, 6.0, 10.0, 15.0], backend


@pytest.mark.parametrize("backend", _backends_for("dense"))
def test_dense_upper_triangle_gets_zero_gradient(backend):
    """Only ``kernel[t, :t + 1]`` of the first T rows is read: every other entry gets exactly zero gradient."""
    inputs = case_inputs(Case(OP.name, "dense_3d", 7, with_state=False))
    x = inputs.tensors["x"]
    kernel = inputs.tensors["kernel"].clone().requires_grad_()  # [12, 12]: window T + 5
    y, _ = causal_kernel(x, kernel, form="dense", backend=backend)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)
    (dkernel,) = torch.autograd.grad((y * weights).sum(), kernel)
    used = torch.zeros_like(dkernel, dtype=torch.bool)
    used[:7, :7] = True
    used = used.tril()
    assert torch.all(dkernel[~used] == 0)
    assert torch.all(dkernel[used] != 0)


def test_form_overrides_square_per_head_kernel():
    """An [H, L] kernel with H == L reads as dense under auto; form='toeplitz' makes it per head."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 5, generator=gen, dtype=torch.float64)  # [B, T, H, D] with T = H = L = W = 4
    kernel = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    for form in ("dense", "toeplitz"):
        expected, _ = causal_kernel(x, kernel, form=form, backend="naive")
        assert_close(form, expected, causal_kernel(x, kernel, form=form)[0], **F64)
    assert torch.equal(causal_kernel(x, kernel)[0], causal_kernel(x, kernel, form="dense")[0])
    assert not torch.allclose(causal_kernel(x, kernel, form="dense")[0], causal_kernel(x, kernel, form="toeplitz")[0])


@pytest.mark.parametrize("regime, expected", [("dense_4d", "matmul"), ("toeplitz_per_head", "conv")])
def test_auto_on_cpu_is_matmul_for_dense_and_conv_for_toeplitz(regime, expected):
    inputs = case_inputs(Case(OP.name, regime, 65))
    x, kernel = inputs.tensors["x"], inputs.tensors["kernel"]
    auto, _ = causal_kernel(x, kernel, initial_state=inputs.initial_state)
    chosen, _ = causal_kernel(x, kernel, initial_state=inputs.initial_state, backend=expected)
    assert torch.equal(auto, chosen)


@pytest.mark.parametrize("regime", ["dense_3d", "dense_4d", "toeplitz_shared_3d", "toeplitz_per_head"])
def test_step_from_an_empty_history_equals_a_call_without_state(regime):
    """Decoding from scratch: the dense form's state starts with no positions, the Toeplitz form's with
    L - 1 zeros; stepping through the sequence gives the call without an initial state."""
    inputs = case_inputs(Case(OP.name, regime, 9, with_state=False))
    x, kernel = inputs.tensors["x"], inputs.tensors["kernel"]
    form = inputs.settings["form"]
    past = 0 if form == "dense" else kernel.shape[-1] - 1
    state = x.new_zeros(x.shape[0], past, *x.shape[2:])
    outputs = []
    for t in range(x.shape[1]):
        y_t, state = causal_kernel_step(x[:, t], kernel, state, form=form)
        outputs.append(y_t)
    expected, final_state = causal_kernel(x, kernel, form=form, output_final_state=True, backend="naive")
    assert_close("y", expected, torch.stack(outputs, dim=1), **F64)
    assert_close("state", final_state, state, **F64)


def test_step_refuses_a_toeplitz_state_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"state must hold the last L - 1 = 3 inputs, got 2"):
        causal_kernel_step(torch.zeros(2, 5), torch.zeros(4), torch.zeros(2, 2, 5), form="toeplitz")


@pytest.mark.parametrize("T", [3, 20], ids=["shorter_than_the_filter", "longer"])
def test_toeplitz_state_is_the_last_inputs_zero_padded(T):
    """The Toeplitz state holds the last L - 1 = 7 inputs, zeros before position 0 (or the initial state's)."""
    inputs = case_inputs(Case(OP.name, "toeplitz_shared_3d", T))
    x, kernel, h0 = inputs.tensors["x"], inputs.tensors["kernel"], inputs.initial_state  # L = 8
    for backend in _backends_for("toeplitz"):
        _, fresh = causal_kernel(x, kernel, output_final_state=True, backend=backend)
        _, continued = causal_kernel(x, kernel, initial_state=h0, output_final_state=True, backend=backend)
        padded = torch.cat([x.new_zeros(x.shape[0], 7, x.shape[2]), x], dim=1)
        assert torch.equal(fresh, padded[:, -7:]), backend
        assert torch.equal(continued, torch.cat([h0, x], dim=1)[:, -7:]), backend


def test_dense_state_is_every_input():
    """The dense state holds the initial state's inputs followed by every input of the call."""
    inputs = case_inputs(Case(OP.name, "dense_4d", 10))
    x, kernel, h0 = inputs.tensors["x"], inputs.tensors["kernel"], inputs.initial_state  # 3 past positions
    for backend in _backends_for("dense"):
        _, final_state = causal_kernel(x, kernel, initial_state=h0, output_final_state=True, backend=backend)
        assert torch.equal(final_state, torch.cat([h0, x], dim=1)), backend


def test_dense_form_refuses_a_packed_final_state():
    """Packed sequences of different lengths have dense states of different lengths: asking for them
    raises, while the outputs alone are given."""
    inputs = case_inputs(Case(OP.name, "dense_3d", 12, with_state=False, dims=(("B", 1),)))
    x, kernel = inputs.tensors["x"], inputs.tensors["kernel"]
    cu_seqlens = torch.tensor([0, 5, 12])
    with pytest.raises(ValueError, match=r"output_final_state=True with cu_seqlens is not supported by the dense form"):
        causal_kernel(x, kernel, cu_seqlens=cu_seqlens, output_final_state=True)
    y, final_state = causal_kernel(x, kernel, cu_seqlens=cu_seqlens)
    assert final_state is None and y.shape == x.shape


def test_a_dense_kernel_past_the_size_limit_is_refused_before_allocating():
    """x of T = 40000 with a [40000, 40000] kernel (meta tensors: nothing is allocated) needs a 6.4 GB
    float32 [T, T] matrix on the matmul backend, auto's choice for the dense form: refused under the
    default limit (4 GiB) with the bytes and how to raise it, run once the limit is raised."""
    x, kernel = torch.empty(1, 40000, 8, device="meta"), torch.empty(40000, 40000, device="meta")
    with limit_dense_bytes(MAX_DENSE_BYTES), pytest.raises(ValueError, match=(
            r"^causal_kernel: backend 'matmul' would build a \[40000, 40000\] float32 dense mixing matrix for x of "
            r"shape \[1, 40000, 8\]: 6,400,000,000 bytes \(5.96 GiB\), over the limit of 4,294,967,296 bytes "
            r"\(4.00 GiB\); raise the limit with linmix.ops.limit_dense_bytes\(n\) or the environment variable "
            r"LINMIX_MAX_DENSE_BYTES=n")):
        causal_kernel(x, kernel)
    with limit_dense_bytes(6_400_000_000):
        assert causal_kernel(x, kernel)[0].shape == x.shape
