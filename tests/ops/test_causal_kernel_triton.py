"""causal_kernel's Triton backend: channel tiles on the CPU interpreter, and the GPU's long sequences.

The op contract (``test_op_contract.py``) runs the backend on every regime; here: more channels than
one tile holds, and with ``-m gpu`` a wide shared filter over long sequences in float32 and bf16.
"""

import pytest
import torch
from helpers import assert_all_close
from op_harness import Case, gpu_only, reference, run

from linmix.ops.causal_kernel import OP
from linmix.ops.causal_kernel.testing import SPEC

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {dtype: SPEC.ratio("triton", dtype) for dtype in (torch.float32, torch.bfloat16)}


def test_channels_in_two_tiles():
    """D = 150 channels run in two tiles of up to 128, the second one partial."""
    case = Case(OP.name, "toeplitz_shared_4d", 40, dims=(("B", 1), ("H", 1), ("D", 150), ("L", 5)))
    assert_all_close(reference(case), run(case, "triton", torch.float32, DEVICE), ratio=RATIO[torch.float32])


GPU_LENGTHS = [1, 63, 333, 4099]


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", GPU_LENGTHS, ids=[f"T{T}" for T in GPU_LENGTHS])
def test_gpu_wide_shared_filter(T, dtype):
    """A 16-tap filter shared by 1024 channels, ``[2, T, 1, 1024]``, against the CPU float64 reference
    (``conv`` beyond 1000 positions, where the token loop's backward is quadratic; the contract suite
    checks ``conv`` against it)."""
    case = Case(OP.name, "toeplitz_shared_4d", T, dims=(("B", 2), ("H", 1), ("D", 1024), ("L", 16)),
                rounded_to=None if dtype == torch.float32 else dtype)
    ref = reference(case, "naive" if T <= 1000 else "conv")
    assert_all_close(ref, run(case, "triton", dtype, "cuda"), ratio=RATIO[dtype])
