"""Variable-length batches for backends without native ``cu_seqlens`` support: one call per sequence.

``N`` sequences packed along T (``[1, T, ...]``, boundaries in ``cu_seqlens``) are independent: the
state starts afresh (from that sequence's row of ``initial_state``) at every sequence start. This is
the reference semantics that a backend taking ``cu_seqlens`` itself must match.
"""

from collections.abc import Callable

import torch


def per_sequence_decayed_attention(
    fn: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the backend ``fn`` on each packed sequence and join the results.

    Inputs are validated and already in the backend's dtypes (see ``decayed_attention``).

    Args:
        fn: a backend, ``fn(q, k, v, log_gamma, scale, initial_state, output_final_state)``.
        q: queries, ``[1, T, H, K]``.
        k: keys, ``[1, T, H, K]``.
        v: values, ``[1, T, H, V]``.
        log_gamma: log decay, ``[H, K]`` (constant, shared by every sequence) or ``[1, T, H, K]``.
        scale: factor applied to every output.
        initial_state: ``[N, H, K, V]`` or None for zeros.
        output_final_state: whether to return the state after each sequence's last position.
        cu_seqlens: ``[N + 1]`` sequence boundaries, 0 first and T last, strictly increasing.

    Returns:
        ``o`` of shape ``[1, T, H, V]`` and the final states ``[N, H, K, V]`` (or None).
    """
    lengths = cu_seqlens.diff().tolist()
    qs, ks, vs = (x.split(lengths, dim=1) for x in (q, k, v))
    log_gammas = log_gamma.split(lengths, dim=1) if log_gamma.dim() == 4 else [log_gamma] * len(lengths)
    states = [None] * len(lengths) if initial_state is None else initial_state.split(1, dim=0)  # [1, H, K, V] each
    outputs, final_states = [], []
    for q_n, k_n, v_n, log_gamma_n, state_n in zip(qs, ks, vs, log_gammas, states, strict=True):
        o, final_state = fn(q_n, k_n, v_n, log_gamma_n, scale, state_n, output_final_state)
        outputs.append(o)
        final_states.append(final_state)
    o = torch.cat(outputs, dim=1)  # [1, T, H, V]
    return o, (torch.cat(final_states, dim=0) if output_final_state else None)
