"""Chunked parallel decayed attention in plain PyTorch.

The sequence is cut into chunks of ``chunk_size`` positions. Inside a chunk the output is a small
masked attention with an explicit decay tensor; across chunks a ``[K, V]`` state carries the past.
Every decay is ``exp`` of a sum of log decays local to one chunk, so every exponent is ``<= 0`` and
nothing overflows, however strong the decay (no ``exp(-cumlog)`` factorisation).
"""

import torch

from linmix.ops.common.chunk import to_chunks


def chunk_decayed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decayed attention in chunked form: ``O(T C K)`` within chunks, ``O(T K V)`` across them.

    Inputs are validated and already in the compute dtype (see ``decayed_attention``). Padding
    positions have zero keys and a decay of exactly 1, so they leave the final state unchanged.

    Args:
        q: queries, ``[B, T, H, K]``.
        k: keys, ``[B, T, H, K]``.
        v: values, ``[B, T, H, V]``.
        log_gamma: log decay, ``[H, K]`` (constant) or ``[B, T, H, K]`` (per token).
        scale: factor applied to every output.
        initial_state: ``[B, H, K, V]`` or None for zeros.
        output_final_state: whether to return the state after the last position.
        chunk_size: positions per chunk.

    Returns:
        ``o`` of shape ``[B, T, H, V]`` and the final state ``[B, H, K, V]`` (or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if log_gamma.dim() == 2:
        log_gamma = log_gamma.expand(1, T, H, K)  # constant decay: a batch of one, no copy
    q, k, v, log_gamma = (to_chunks(x, chunk_size) for x in (q, k, v, log_gamma))
    cumlog = log_gamma.cumsum(dim=2)  # [Bg, N, C, H, K], log decay from the chunk start

    # Within each chunk: decay[i, j] = exp(sum_{j < r <= i} log_gamma[r]) for j <= i, else 0.
    # The exponent is summed directly (a cumsum down each column) rather than taken as
    # cumlog[i] - cumlog[j], which would cancel in float32 and leak large lag-0 terms into the
    # gradient of log_gamma.
    pos = torch.arange(chunk_size, device=q.device)
    below = (pos[:, None] > pos[None, :])[:, :, None, None]  # [C, C, 1, 1], j < i
    causal = (pos[:, None] >= pos[None, :])[:, :, None, None]  # [C, C, 1, 1], j <= i
    steps = log_gamma[:, :, :, None].masked_fill(~below, 0.0)  # [Bg, N, C, C, H, K]
    log_d = steps.cumsum(dim=2).masked_fill(~causal, -torch.inf)  # [Bg, N, C, C, H, K]
    decay = torch.exp(log_d)
    scores = (q[:, :, :, None] * k[:, :, None] * decay).sum(dim=-1)  # [B, N, C, C, H]
    o = torch.einsum("bnijh,bnjhv->bnihv", scores, v)  # [B, N, C, H, V]

    # Across chunks: each chunk's own contribution to the state, then a scan over chunks.
    k_to_end = k * decay[:, :, -1]  # [B, N, C, H, K], keys decayed to the chunk end
    chunk_kv = torch.einsum("bnjhk,bnjhv->bnhkv", k_to_end, v)  # [B, N, H, K, V]
    chunk_decay = torch.exp(cumlog[:, :, -1]).expand(B, -1, -1, -1)[..., None]  # [B, N, H, K, 1]
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    states_in = []
    for n in range(chunk_kv.shape[1]):
        states_in.append(state)
        state = chunk_decay[:, n] * state + chunk_kv[:, n]  # [B, H, K, V]
    states_in = torch.stack(states_in, dim=1)  # [B, N, H, K, V], the state entering each chunk
    q_from_start = q * torch.exp(cumlog)  # [B, N, C, H, K]
    o = o + torch.einsum("bnihk,bnhkv->bnihv", q_from_start, states_in)

    o = scale * o.reshape(B, -1, H, V)[:, :T]  # [B, T, H, V]
    return o, (state if output_final_state else None)
