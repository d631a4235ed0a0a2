"""causal_kernel's benchmark entry (``linmix bench --op causal_kernel``, linmix.bench.op_entries).

Work: the Toeplitz form with ``L`` taps is ``L`` multiply-adds per output element,
``fwd = 2 B T H D L``; the dense form sums ``t + 1`` inputs at position ``t``, ``T^2 / 2``
multiply-adds per channel, ``fwd = B T^2 H D``. The backward's products (the input and the kernel
gradients) are twice the forward's: ``fwdbwd = 3 fwd``. Ideal bytes (linmix.bench.cost): x, the
kernel and y in the benchmark dtype.

The default regime ``toeplitz_per_head`` is the K2 layer's Kbase: one ``[H, L]`` filter per head.
"""

from linmix.bench.op_entries import OpBench
from linmix.bench.shapes import FLA_SHAPES, tsweep

TAPS = 16  # L of the benchmark shapes: the K2 layer's Kbase taps


def flops(x, kernel, *, form: str, **settings) -> float:
    """``2 B T H D L`` (Toeplitz) or ``B T^2 H D`` (dense), from ``x [B, T, ...]`` and the kernel."""
    if form == "dense":
        return x.numel() * x.shape[1]
    return 2 * x.numel() * kernel.shape[-1]


BENCH = OpBench(
    shape_keys=("B", "T", "H", "D", "L"),
    shape_sets={
        "fla": [{"B": B, "T": T, "H": H, "D": D, "L": TAPS} for B, T, H, D in FLA_SHAPES],
        "tsweep": tsweep(H=16, D=128, L=TAPS),
        "k2": tsweep(H=1, D=1024, L=TAPS),  # the K2 layer's Kbase: one filter over width 1024
        "small": [{"B": 2, "T": 64, "H": 2, "D": 16, "L": TAPS}, {"B": 1, "T": 130, "H": 2, "D": 16, "L": TAPS}],
    },
    gate_dims={"B": 1, "T": 257, "H": 2, "D": 24, "L": TAPS},
    regime="toeplitz_per_head",
    flops=flops,
    default_backends=("conv", "matmul", "triton"),
    ratio_baselines=("matmul", "conv"),
)
