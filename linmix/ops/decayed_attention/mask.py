"""Quadratic decayed attention through an explicit ``[T, T]`` decay matrix.

``o = scale * (A @ v)`` with ``A[t, s] = sum_k q[t, k] k[s, k] D[t, s, k]`` for ``s <= t``, where
``D[t, s, k] = exp(cumlog[t, k] - cumlog[s, k])``. The difference is masked to ``-inf`` above the
diagonal before ``exp``, so every exponent is ``<= 0`` and nothing overflows.
"""

import torch

# On the CPU, the product of a block of query rows with every key, [B, rows, T, H, K], is kept near
# this size: small enough to stay in cache between its multiply and its sum (a block of 8 rows at
# the K2 shape, B 64, T 256, K 32, trains 2.4 times faster than the whole [B, T, T, H, K]). On a GPU
# the whole product is one pass.
ROW_BLOCK_BYTES = 2**24


def _log_decays(log_gamma: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log decay between every pair of positions, and from the start to every position.

    Returns:
        ``log_d`` of shape ``[Bg, T, T, H, K]``: ``log_d[t, s]`` is the log of the decay applied
        to a token written at ``s`` by the time it is read at ``t``, ``-inf`` for ``s > t``.
        ``cumlog`` of shape ``[Bg, T, H, K]``: the log decay of the initial state at ``t``.
        ``Bg`` is 1 for a constant decay and ``B`` for a per-token one.
    """
    pos = torch.arange(T, device=log_gamma.device)
    lag = pos[:, None] - pos[None, :]  # [T, T]
    causal = (lag >= 0)[None, :, :, None, None]  # [1, T, T, 1, 1]
    if log_gamma.dim() == 2:
        lag = lag.to(log_gamma.dtype)
        diff = lag[None, :, :, None, None] * log_gamma  # [1, T, T, H, K]
        cumlog = (pos + 1).to(log_gamma.dtype)[None, :, None, None] * log_gamma  # [1, T, H, K]
    else:
        # Accumulate in float64: a difference of two long cumsums in float32 would lose the small
        # lags' decays to cancellation.
        cumlog64 = log_gamma.to(torch.float64).cumsum(dim=1)  # [B, T, H, K]
        diff = (cumlog64[:, :, None] - cumlog64[:, None, :]).to(log_gamma.dtype)  # [B, T, T, H, K]
        cumlog = cumlog64.to(log_gamma.dtype)
    return diff.masked_fill(~causal, -torch.inf), cumlog


def _row_blocks(q: torch.Tensor) -> list[slice]:
    """Slices of the query rows whose products with every key, ``[B, rows, T, H, K]``, hold about
    ``ROW_BLOCK_BYTES`` on the CPU (at least one row each); one slice of all rows elsewhere."""
    B, T, H, K = q.shape
    rows = max(1, ROW_BLOCK_BYTES // max(1, B * T * H * K * q.element_size())) if q.device.type == "cpu" else T
    return [slice(start, min(start + rows, T)) for start in range(0, T, rows)]


def _rows_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """The outputs of a block of query rows: ``q`` ``[B, rows, H, K]``, their ``decay`` rows
    ``[Bg, rows, T, H, K]`` (zero above the diagonal); returns ``[B, rows, H, V]``."""
    # An explicit product and sum: its backward is about 2x faster than a three-operand einsum's.
    scores = (q[:, :, None] * k[:, None] * decay).sum(dim=-1)  # [B, rows, T, H]
    return torch.einsum("btsh,bshv->bthv", scores, v)


def mask_decayed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decayed attention in quadratic form; memory ``O(T^2 K)`` for the decay tensor.

    Inputs are validated and already in the compute dtype (see ``decayed_attention``).

    Args:
        q: queries, ``[B, T, H, K]``.
        k: keys, ``[B, T, H, K]``.
        v: values, ``[B, T, H, V]``.
        log_gamma: log decay, ``[H, K]`` (constant) or ``[B, T, H, K]`` (per token).
        scale: factor applied to every output.
        initial_state: ``[B, H, K, V]`` or None for zeros.
        output_final_state: whether to return the state after the last position.

    Returns:
        ``o`` of shape ``[B, T, H, V]`` and the final state ``[B, H, K, V]`` (or None).
    """
    T = q.shape[1]
    log_d, cumlog = _log_decays(log_gamma, T)
    decay = torch.exp(log_d)  # [Bg, T, T, H, K]
    o = torch.cat([_rows_output(q[:, rows], k, v, decay[:, rows]) for rows in _row_blocks(q)], dim=1)  # [B, T, H, V]
    if initial_state is not None:
        q_decayed = q * torch.exp(cumlog)  # [B, T, H, K]
        o = o + torch.einsum("bthk,bhkv->bthv", q_decayed, initial_state)
    if not output_final_state:
        return scale * o, None
    k_decayed = k * decay[:, -1]  # [B, T, H, K], decayed to the last position
    final_state = torch.einsum("bshk,bshv->bhkv", k_decayed, v)  # [B, H, K, V]
    if initial_state is not None:
        final_state = final_state + torch.exp(cumlog[:, -1, :, :, None]) * initial_state
    return scale * o, final_state
