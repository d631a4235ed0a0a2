"""delta_rule's benchmark entry (``linmix bench --op delta_rule``, linmix.bench.op_entries).

The variant is the input regime: ``--option regime=dn|gdn|kda|pdn|pgdn|pkda`` (default ``pgdn``), or
any other regime of the test spec (``gdn_gva``, ``pkda_gva``, the extreme gates, ...).

Work of the chunked WY form, in chunks of ``C = 64`` positions, per chunk and value head (full
``C x C`` tiles, as the kernels compute them): ``A_kk = (beta K) KW^T`` ``2 C^2 K``; the triangular
solve for ``U'`` and ``W`` ``C^2 (K + V)`` (half a product of ``C x C`` by ``C x (K + V)``); the
corrected values ``U' - W S`` ``2 C K V``; the state update ``KW^T U`` ``2 C K V``; the output
``Q S`` ``2 C K V``, ``A_qk = Q KW^T`` ``2 C^2 K`` and ``A_qk U`` ``2 C^2 V``. Summed, ``C^2 (5K + 3V) + 6 C K V``
per chunk, so over the ``T / C`` chunks ``B HV T (C (5K + 3V) + 6 K V)``. The preconditioner's
statistics add a decayed ``C x C`` product by ``beta^P k^2`` per key head and chunk, ``2 C^2 K``:
``2 B H T C K``. Per-channel decays (KDA) only add elementwise work, not counted.
"""

from linmix.bench.baselines import sdpa_baseline
from linmix.bench.op_entries import OpBench
from linmix.bench.shapes import HEAD_SHAPE_KEYS, head_shape_sets

CHUNK = 64  # C of the count: the chunk of the chunked backends and fla's kernels


def flops(q, k, v, beta, precond_g=None, **tensors_and_settings) -> float:
    """``B HV T (C (5K + 3V) + 6 K V)``, plus ``2 B H T C K`` with a preconditioner (module docstring)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    work = B * HV * T * (CHUNK * (5 * K + 3 * V) + 6 * K * V)
    return work + (0 if precond_g is None else 2 * B * H * T * CHUNK * K)


BENCH = OpBench(
    shape_keys=HEAD_SHAPE_KEYS,
    shape_sets=head_shape_sets(),
    gate_dims={"B": 1, "T": 257, "H": 2, "K": 32, "V": 48},
    regime="pgdn",
    flops=flops,
    default_backends=("triton", "chunk", "fla", "sdpa"),
    baselines={"sdpa": sdpa_baseline()},
    ratio_baselines=("fla", "sdpa", "chunk"),
    call_kwargs={"check_values": False},  # the built gates are in range: time the kernels, not the read-back
)
