"""structured_mix's benchmark entry (``linmix bench --op structured_mix``, linmix.bench.op_entries).

Work of the recurrence, per position, head and channel: one product for the direct term and one
multiply-add per level, ``fwd = 2 B T H D (K + 1)`` (the chunk backend adds ``2 B H T C D`` for
the in-chunk inverses, the dense one ``B H T^2 D`` for its ``[T, T]`` solve). The default regime
``pow2_softmax`` holds the ``2^k`` pattern of eight levels with softmax coefficients;
``--option regime=NAME`` takes any regime of ``testing.py``.
"""

from linmix.bench.op_entries import OpBench
from linmix.bench.shapes import FLA_SHAPES, tsweep


def flops(x, alpha, beta, **settings) -> float:
    """``fwd = 2 B T H D (K + 1)`` (module docstring)."""
    B, T, H, D = x.shape
    return 2 * B * T * H * D * (beta.shape[-1] + 1)


BENCH = OpBench(
    shape_keys=("B", "T", "H", "D"),
    shape_sets={
        "fla": [{"B": B, "T": T, "H": H, "D": D} for B, T, H, D in FLA_SHAPES],
        "tsweep": tsweep(H=16, D=128),
        "k2": tsweep(H=1, D=1024),  # one wide head, the K2 layer's width
        "small": [{"B": 2, "T": 64, "H": 2, "D": 16}, {"B": 1, "T": 130, "H": 2, "D": 32}],
    },
    gate_dims={"B": 1, "T": 257, "H": 2, "D": 48},
    regime="pow2_softmax",
    flops=flops,
    default_backends=("chunk", "dense"),
)
