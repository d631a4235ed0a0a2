"""Chunked delta rule in plain PyTorch: the WY (UT-transform) form of spec/preconditioned_delta.md §3.

In a chunk of ``C`` positions entered with state ``S``, write ``G_i`` for the log decay from the chunk
start to position ``i`` (a scalar per value head, or a K-vector for per-channel decays) and
``Gamma_ij = exp(G_i - G_j)``. Unrolling ``S_i = Gamma_i0 S + sum_{j<=i} Gamma_ij kw_j u_j^T`` in
``u_i = beta_i (v_i - S_{i-1}'^T k_i)`` gives a unit lower-triangular system per chunk:

* ``(I + A_kk) U = beta V - beta (K * exp(G)) S`` with ``A_kk[i, j] = beta_i k_i^T Gamma_ij kw_j`` (``j < i``,
  read keys on rows, write keys on columns), solved once for both right-hand sides: ``U = U' - W S``;
* ``O = (Q * exp(G)) S + A_qk U`` with ``A_qk[i, j] = q_i^T Gamma_ij kw_j`` (``j <= i``);
* ``S <- exp(G_C) S + (KW * exp(G_C - G))^T U``, sequentially over chunks.

Every exponent is a sum of log decays over a span of positions, ``<= 0``, and is summed directly over
that span (masked cumulative sums), never as a difference of two long prefix sums, so nothing
overflows and nothing cancels, however strong the decay. Per-channel decays cannot leave the
``[C, C]`` interaction to a matrix product whole; as in fla's KDA kernels, the chunk is cut into
sub-blocks of 16: the diagonal blocks take the decay elementwise (``[16, 16, K]`` per block), and a
block ``(I, J)`` below them factors ``Gamma_ij = exp(L_i) exp(mid_IJ) exp(R_j)`` through the block
boundaries, with ``L`` the sum from the start of block I to i, ``R`` the sum after j to the end of
block J, and ``mid`` the sum of the blocks between: each factor ``<= 1``.

The preconditioner's statistics ``A_t`` (a per-channel scalar-decay scan) are chunked the same way:
``A_t = exp(P_t) A_start + sum_{j<=t} exp(P_t - P_j) beta^P_j k_j^2`` within a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmix.ops.common.chunk import heads_chunks, heads_unchunk, segsum, suffix_after
from linmix.ops.delta_rule.naive import State, value_heads
from linmix.ops.delta_rule.precond import write_gain

SUB_BLOCK = 16  # positions of the sub-blocks of a chunk for per-channel decays


def precondition_keys(k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, center: torch.Tensor, x: float,
                      eps: float, A: torch.Tensor | None, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The write keys ``gain(A_t) * k_t`` and the final key statistics.

    Args:
        k: normalised keys ``[B, T, H, K]``.
        g: log decay of A ``[B, T, H]``.
        beta: strength ``[B, T, H]``.
        center: ``[H]``.
        x: the gain's range.
        eps: added to A inside the log.
        A: ``[B, H, K]`` statistics before the first position, or None for zeros.
        chunk_size: positions per chunk.

    Returns:
        the write keys ``[B, T, H, K]`` and ``A`` after the last position ``[B, H, K]``.
    """
    B, T, H, K = k.shape
    kc, gc, bc = (heads_chunks(t, chunk_size) for t in (k, g, beta))  # [B, H, N, C, K], [B, H, N, C] x 2
    local = torch.exp(segsum(gc)) @ (bc[..., None] * kc * kc)  # [B, H, N, C, K]: A_t from a zero start
    from_start = torch.exp(gc.cumsum(dim=-1))[..., None]  # [B, H, N, C, 1]
    A = k.new_zeros(B, H, K) if A is None else A
    starts = []
    for n in range(kc.shape[2]):
        starts.append(A)
        A = from_start[:, :, n, -1] * A + local[:, :, n, -1]  # [B, H, K]
    stats = from_start * torch.stack(starts, dim=2)[:, :, :, None] + local  # [B, H, N, C, K]
    gain = write_gain(stats, center[:, None, None, None], x, eps)
    return heads_unchunk(gain * kc, T), A


class _Decay:
    """The decays of a chunked call: the factors and the two ``[C, C]`` interactions the WY form needs.

    ``g`` is None (no decay), ``[B, H, N, C]`` (one per head) or ``[B, H, N, C, K]`` (per channel).
    """

    def __init__(self, g: torch.Tensor | None):
        self.g = g
        if g is None:
            return
        if g.dim() == 4:  # one decay per head: exact [C, C] decay matrices
            self.matrix = torch.exp(segsum(g))  # [B, H, N, C, C]
            self.from_start = torch.exp(g.cumsum(dim=-1))[..., None]  # [B, H, N, C, 1]
            self.to_end = torch.exp(suffix_after(g, dim=-1))[..., None]  # [B, H, N, C, 1]
            return
        C = g.shape[-2]
        self.sub = min(SUB_BLOCK, C)
        blocks = g.unflatten(-2, (C // self.sub, self.sub))  # [B, H, N, nb, c, K]
        within = blocks.cumsum(dim=-2)  # [B, H, N, nb, c, K]: from the block start to i
        self.row = torch.exp(within)
        self.col = torch.exp(suffix_after(blocks, dim=-2))  # after j to the block end
        between = segsum(within[..., -1, :].transpose(-1, -2))  # [B, H, N, K, nb, nb]: blocks J < M <= I
        between = torch.cat([torch.full_like(between[..., :1, :], -torch.inf), between[..., :-1, :]], dim=-2)
        self.across = torch.exp(between)  # [B, H, N, K, nb, nb]: blocks strictly between J and I, 0 for I <= J
        self.diagonal = torch.exp(segsum(blocks.transpose(-1, -2)))  # [B, H, N, nb, K, c, c]
        self.from_start = torch.exp(g.cumsum(dim=-2))  # [B, H, N, C, K]
        self.to_end = torch.exp(suffix_after(g, dim=-2))  # [B, H, N, C, K]

    def interaction(self, a: torch.Tensor, b: torch.Tensor, strict: bool) -> torch.Tensor:
        """``M[i, j] = a_i^T Gamma_ij b_j`` for ``j <= i`` (``j < i`` if ``strict``), 0 above: ``[B, H, N, C, C]``.

        Args:
            a: rows ``[B, H, N, C, K]``.
            b: columns ``[B, H, N, C, K]``.
            strict: whether to leave out the diagonal.
        """
        C = a.shape[-2]
        pos = torch.arange(C, device=a.device)
        if self.g is None or self.g.dim() == 4:
            scores = a @ b.transpose(-1, -2)  # [B, H, N, C, C]
            scores = scores.tril() if self.g is None else scores * self.matrix
        else:
            nb = C // self.sub
            ab, bb = a.unflatten(-2, (nb, self.sub)), b.unflatten(-2, (nb, self.sub))  # [B, H, N, nb, c, K]
            diagonal = torch.einsum("...nid,...njd,...ndij->...nij", ab, bb, self.diagonal)  # [B, H, N, nb, c, c]
            below = torch.einsum("...Iid,...dIJ,...Jjd->...IJij", ab * self.row, self.across, bb * self.col)
            eye = torch.eye(nb, dtype=a.dtype, device=a.device)[:, :, None, None]
            blocks = below + eye * diagonal[..., :, None, :, :]  # [B, H, N, nb(I), nb(J), c, c]
            scores = blocks.transpose(-3, -2).reshape(*a.shape[:-2], C, C)
        return scores.masked_fill(pos[:, None] == pos[None, :], 0.0) if strict else scores

    def total(self, n: int) -> torch.Tensor | None:
        """The decay of chunk ``n`` from its start to its end, shaped for a state ``[B, H, K, V]``."""
        if self.g is None:
            return None
        return self.from_start[:, :, n, -1, :, None]  # [B, H, 1, 1] or [B, H, K, 1]


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    precond_g: torch.Tensor | None = None,
    precond_beta: torch.Tensor | None = None,
    precond_center: torch.Tensor | None = None,
    *,
    scale: float,
    normalize_qk: bool,
    x: float,
    eps: float,
    initial_state: State | None,
    output_final_state: bool,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, State | None]:
    """The delta rule in chunked WY form: ``O(T C (K + V))`` within chunks, ``O(T K V)`` across them.

    Inputs are validated and already in the compute dtype (see ``linmix.ops.delta_rule``); the
    arguments are ``naive_delta_rule``'s. Padding positions have zero keys, ``beta = 0`` and no
    decay, so they leave the states unchanged.

    Returns:
        ``o [B, T, HV, V]`` and the final state (``S``, or ``(S, A)``) or None.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    precond = precond_g is not None
    S, A = None, None
    if initial_state is not None:
        S, A = initial_state if precond else (initial_state, None)
    if normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    kw = k
    if precond:
        kw, A = precondition_keys(k, precond_g, precond_beta, precond_center, x, eps, A, chunk_size)
    q, k, kw = (heads_chunks(value_heads(t, HV, dim=2), chunk_size) for t in (scale * q, k, kw))  # [B, HV, N, C, K]
    v, beta = heads_chunks(v, chunk_size), heads_chunks(beta, chunk_size)[..., None]  # [B, HV, N, C, V], [B, HV, N, C, 1]
    decay = _Decay(None if g is None else heads_chunks(g, chunk_size))
    from_start = 1.0 if g is None else decay.from_start

    # Within chunks: the unit lower-triangular system, one solve for U' = T beta V and W = T beta K exp(G).
    A_kk = decay.interaction(beta * k, kw, strict=True)  # [B, HV, N, C, C]
    rhs = torch.cat([beta * v, beta * k * from_start], dim=-1)  # [B, HV, N, C, V + K]
    U, W = torch.linalg.solve_triangular(A_kk, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    # Across chunks: the state entering each chunk and the chunk's corrected values U' - W S.
    kw_to_end = kw if g is None else kw * decay.to_end  # [B, HV, N, C, K]
    S = q.new_zeros(B, HV, K, V) if S is None else S
    states_in, values = [], []
    for n in range(q.shape[2]):
        states_in.append(S)
        values.append(U[:, :, n] - W[:, :, n] @ S)  # [B, HV, C, V]
        total = decay.total(n)
        S = (S if total is None else total * S) + kw_to_end[:, :, n].transpose(-1, -2) @ values[-1]
    states_in, values = torch.stack(states_in, dim=2), torch.stack(values, dim=2)  # [B, HV, N, K|C, V]

    o = (q * from_start) @ states_in + decay.interaction(q, kw, strict=False) @ values  # [B, HV, N, C, V]
    o = heads_unchunk(o, T)
    if not output_final_state:
        return o, None
    return o, ((S, A) if precond else S)
