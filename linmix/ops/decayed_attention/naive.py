"""Token-by-token decayed attention: the executable spec of the op.

``S_t = diag(exp(log_gamma_t)) S_{t-1} + k_t v_t^T`` and ``o_t = scale * S_t^T q_t``.
"""

import torch


def naive_decayed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the recurrence one position at a time.

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
    B, T, H, K = q.shape
    V = v.shape[-1]
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    per_token = log_gamma.dim() == 4
    outputs = []
    for t in range(T):
        gamma = torch.exp(log_gamma[:, t] if per_token else log_gamma)  # [B, H, K] or [H, K]
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        state = gamma[..., None] * state + kv  # [B, H, K, V]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))  # [B, H, V]
    o = torch.stack(outputs, dim=1)  # [B, T, H, V]
    return o, (state if output_final_state else None)
