"""decayed_attention's benchmark entry (``linmix bench --op decayed_attention``, linmix.bench.op_entries).

Work, in chunks of ``C = 64`` positions, per chunk and head: scores ``Q K^T`` ``2 C^2 K`` (the full
``C x C`` tile, as the kernels compute it), in-chunk output ``A V`` ``2 C^2 V``, state read ``Q S``
``2 C K V``, state update ``S += K^T V`` ``2 C K V``; over the ``T / C`` chunks
``fwd = 2 B H T (C K + C V + 2 K V)``. The backward's eight products (``dA = dO V^T``, ``dQ``,
``dK`` and ``dV`` within the chunk and through the state, and the state gradient ``dS += Q^T dO``)
are twice the forward's four: ``fwdbwd = 3 fwd``. Ideal bytes (linmix.bench.cost): q, k, v and o
in the benchmark dtype, the log decays in float32 (``[H, K]``, or ``[B, T, H, K]`` per token).

The default regime ``const_typical`` holds decays from 0.9 to 0.999, like a trained K2 layer's:
the Triton kernels take a slower path in a sub-block whose decays fall below ``exp(-7.5)`` per
position. ``--option regime=token_typical`` gives per-token log-sigmoid gates centred there.
"""

from linmix.bench.baselines import sdpa_baseline
from linmix.bench.op_entries import OpBench
from linmix.bench.shapes import HEAD_SHAPE_KEYS, head_shape_sets
from linmix.ops.decayed_attention.triton import kernel_traffic

CHUNK = 64  # C of the count: the chunk of the chunked backends and the Triton kernels


def flops(q, k, v, log_gamma, **settings) -> float:
    """``fwd = 2 B H T (C K + C V + 2 K V)`` (module docstring)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    return 2 * B * H * T * (CHUNK * K + CHUNK * V + 2 * K * V)


def triton_traffic(q, k, v, log_gamma, *, backward: bool, **settings) -> float:
    """The bytes the Triton kernels move in one call, by their own model (``triton.kernel_traffic``)."""
    B, T, H, K = q.shape
    return kernel_traffic(B, T, H, K, v.shape[-1], q.element_size(), log_gamma.dim() == 4, backward)


BENCH = OpBench(
    shape_keys=HEAD_SHAPE_KEYS,
    shape_sets=head_shape_sets(),
    gate_dims={"B": 1, "T": 257, "H": 2, "K": 32, "V": 48},
    regime="const_typical",
    flops=flops,
    default_backends=("chunk", "mask", "triton", "fla", "sdpa"),
    baselines={"sdpa": sdpa_baseline()},
    ratio_baselines=("fla", "sdpa", "chunk"),
    traffic={"triton": triton_traffic},
    call_kwargs={"check_values": False},  # the built decays are in range: time the kernels, not the read-back
)
