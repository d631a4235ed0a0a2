"""gated_kalman's benchmark entry (``linmix bench --op gated_kalman``, linmix.bench.op_entries).

The default regime is ``paper`` (``ridge = 0.02``, 30 Chebyshev steps, a mixing weight);
``--option regime=NAME`` takes any other regime of the test spec (10 steps at ``ridge = 0.25``).

Work of the chunked form, in chunks of ``C = 64`` positions, per chunk and head (full ``C x C``
tiles, as kernels compute them), with ``r`` Chebyshev steps:

* the chunk-start states ``[H | U] += A^T [A | B]``: ``2 C K (K + V)``;
* the norms ``||H_t||_F``: ``K K^T`` ``2 C^2 K``, ``K H_c`` ``2 C K^2``, two ``[C, C]`` products by
  ``M`` ``2 C^3 + 2 C^2`` (``2 C^2`` and the ``2 C^3`` of ``M (G o G)`` counted, the rest elementwise);
* every Chebyshev step (one product with ``A_t`` for every row): ``X H_c^T`` ``2 C K^2``,
  ``X K^T`` ``2 C^2 K``, ``(. o M) K`` ``2 C^2 K``: ``2 C K^2 + 4 C^2 K``, ``r`` times, and once more
  for the residual of the implicit gradient when a gradient is taken (not counted here);
* the readout: ``Q U_c`` ``2 C K V``, ``Q K^T`` ``2 C^2 K``, ``(. o M) V`` ``2 C^2 V``.

Summed over the ``T / C`` chunks: ``B H T (2 K (K + V) + 2 C K + 2 K^2 + 2 C^2 + 2 C + r (2 K^2 + 4 C K)
+ 2 K V + 2 C K + 2 C V)``. Per token and head the solve, ``r (2 K^2 + 4 C K)``, dominates: ``iters x K^2``
multiply-adds of the token form plus the in-chunk keys' share, about 30x a GLA readout at
``r = 30``, ``K = 128``. The backward (implicit, not counted) runs the same ``r`` steps once more.
"""

from linmix.bench.baselines import sdpa_baseline
from linmix.bench.op_entries import OpBench
from linmix.bench.shapes import HEAD_SHAPE_KEYS, head_shape_sets

CHUNK = 64  # C of the count: the chunk of the chunked backend


def flops(q, k, v, g, beta, alpha=None, *, iters: int, **settings) -> float:
    """The chunked form's forward FLOPs (module docstring)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = CHUNK
    states = 2 * K * (K + V)
    norms = 2 * C * K + 2 * K * K + 2 * C * C + 2 * C
    solve = iters * (2 * K * K + 4 * C * K)
    readout = 2 * K * V + 2 * C * K + 2 * C * V
    return B * H * T * (states + norms + solve + readout)


BENCH = OpBench(
    shape_keys=HEAD_SHAPE_KEYS,
    shape_sets=head_shape_sets(),
    gate_dims={"B": 1, "T": 257, "H": 2, "K": 32, "V": 48},
    regime="paper",
    flops=flops,
    default_backends=("chunk", "sdpa"),
    baselines={"sdpa": sdpa_baseline()},
    ratio_baselines=("sdpa", "chunk"),
    call_kwargs={"check_values": False},  # the built gates are in range: time the kernels, not the read-back
)
