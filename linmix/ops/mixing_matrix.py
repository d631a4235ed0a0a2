"""The explicit ``[T, T]`` operator of every op: ``o = M v`` per head (spec/structured_mixing.md §2).

Every op of linmix is linear in its values once the other inputs are fixed: the keys, gates and
strengths decide a lower-triangular ``M`` (one per batch entry and head) and the output is
``o[:, t] = sum_{s <= t} M[t, s] v[:, s]``. These functions build ``M`` in closed form, each
independently of the op's backends, from the op's own equations:

* ``decayed_attention_matrix``: ``M[t, s] = scale * sum_k q_t[k] k_s[k] prod_{l=s+1..t} gamma_l[k]``
  (the decay acts on the key channels, so one ``M`` serves every value channel);
* ``causal_kernel_matrix``: the kernel itself, dense (``tril`` of its top-left ``T x T``) or Toeplitz;
* ``softmax_attention_matrix``: ``softmax(scale * q k^T + causal mask)`` (the ``attention`` mixer);
* ``delta_rule_matrix``: the UT form ``M = W (I + B)^{-1} diag(beta)`` of the delta rule;
* ``gated_kalman_matrix``: ``M[t, s] = scale * q_mix_t . k_s beta_s^2 prod_{l=s+1..t} gamma_l``, with
  ``q_mix_t`` from the ridge solve, which depends on the keys and gates only;
* ``structured_mix_matrix``: ``M = (I - B)^{-1} diag(alpha)`` of a recurrence on past outputs at fixed offsets.

Every ``M`` is for a zero initial state (none, for ``causal_kernel``): a state adds an affine term
(for ``gated_kalman`` it also changes the solve, hence ``M``). Matrices are float64 or float32 as
their inputs; run them in float64 for an oracle. They build ``[B, H, K, T, T]`` decay tensors: checks
and analyses of short sequences, not a backend. ``apply_mixing_matrix`` applies one to values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmix.ops.common.chunk import segsum
from linmix.ops.delta_rule.precond import DiagonalPreconditioner, write_gain
from linmix.ops.gated_kalman.solve import token_exact_solve, token_solve


def apply_mixing_matrix(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``o[:, t] = sum_s M[..., t, s] v[:, s]``: ``M`` applied along the position axis of ``v``.

    Args:
        M: ``[..., T, T]``, broadcastable against ``v`` with its position axis moved next to last:
            ``[B, H, T, T]`` for ``v [B, T, H, V]``, ``[T, T]`` for any ``v``, ``[H, T, T]`` for
            ``v [B, T, H, D]``.
        v: ``[B, T, ...]``, the values (``x`` of ``causal_kernel``).

    Returns:
        ``o``, shaped like ``v`` (with broadcast dims).
    """
    return (M @ v.movedim(1, -2)).movedim(-2, 1)


def _decays(log_decay: torch.Tensor) -> torch.Tensor:
    """``Gamma[b, h, c, t, s] = prod_{l=s+1..t} exp(log_decay[b, l, h, c])``, zero above the diagonal.

    Args:
        log_decay: ``[B, T, H, C]`` (``C`` key channels, or 1 for a decay per head).

    Returns:
        ``[B, H, C, T, T]``.
    """
    return torch.exp(segsum(log_decay.permute(0, 2, 3, 1)))


def decayed_attention_matrix(q: torch.Tensor, k: torch.Tensor, log_gamma: torch.Tensor, *,
                             scale: float | None = None) -> torch.Tensor:
    """The operator of ``decayed_attention`` (GLA, the K2 decay path) from a zero state.

    ``M[t, s] = scale * sum_k q_t[k] k_s[k] prod_{l=s+1..t} exp(log_gamma_l[k])`` for ``s <= t``: the
    state recurrence ``S_t = diag(gamma_t) S_{t-1} + k_t v_t^T`` unrolled and read by ``scale * q_t``.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        log_gamma: log decay ``[H, K]`` (constant) or ``[B, T, H, K]`` (per token).
        scale: factor of the output; None means ``K ** -0.5`` (as the op).

    Returns:
        ``M [B, H, T, T]``, lower triangular.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    log_gamma = log_gamma.expand(q.shape).to(q.dtype)  # [B, T, H, K]
    gamma = _decays(log_gamma)  # [B, H, K, T, T]
    return scale * torch.einsum("bthk,bshk,bhkts->bhts", q, k, gamma)


def causal_kernel_matrix(kernel: torch.Tensor, T: int, *, form: str = "auto") -> torch.Tensor:
    """The operator of ``causal_kernel`` on ``T`` positions from no past input.

    Dense: ``M[t, s] = kernel[t, s]`` for ``s <= t`` (the top-left ``T x T`` lower triangle);
    Toeplitz: ``M[t, s] = kernel[..., t - s]`` for ``0 <= t - s < L``, zero elsewhere.

    Args:
        kernel: ``[W, W]`` (dense, ``W >= T``), ``[L]`` or ``[H, L]`` (Toeplitz).
        T: the number of positions.
        form: ``"dense"``, ``"toeplitz"`` or ``"auto"`` (square 2-D means dense), as the op.

    Returns:
        ``M [T, T]`` (dense or shared filter) or ``[H, T, T]`` (one filter per head).
    """
    if form == "auto":
        form = "dense" if kernel.dim() == 2 and kernel.shape[0] == kernel.shape[1] else "toeplitz"
    if form == "dense":
        return kernel[:T, :T].tril()
    positions = torch.arange(T, device=kernel.device)
    lag = positions[:, None] - positions[None, :]  # [T, T], t - s
    L = kernel.shape[-1]
    inside = (lag >= 0) & (lag < L)
    taps = kernel[..., lag.clamp(0, L - 1)]  # [..., T, T]
    return taps.masked_fill(~inside, 0.0)


def softmax_attention_matrix(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """The operator of causal softmax attention (the ``attention`` mixer, ``scaled_dot_product_attention``).

    ``M = softmax(scale * q k^T + mask)`` row by row, the mask ``-inf`` above the diagonal.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        scale: factor of the scores; None means ``K ** -0.5`` (SDPA's default, the mixer's).

    Returns:
        ``M [B, H, T, T]``, lower triangular with rows summing to 1.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    T = q.shape[1]
    scores = scale * torch.einsum("bthk,bshk->bhts", q, k)  # [B, H, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1)


def _key_statistics(k: torch.Tensor, precond: DiagonalPreconditioner) -> torch.Tensor:
    """``A_t = sum_{s <= t} prod_{l=s+1..t} exp(g_l) beta_s k_s^2`` ``[B, T, H, K]``: the preconditioner's
    statistics from ``A_0 = 0``, for keys ``k [B, T, H, K]`` (normalised as the op uses them)."""
    decay = _decays(precond.g.to(k.dtype)[..., None])[:, :, 0]  # [B, H, T, T]
    return torch.einsum("bhts,bsh,bshk->bthk", decay, precond.beta.to(k.dtype), k * k)


def delta_rule_matrix(q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, *, g: torch.Tensor | None = None,
                      precond: DiagonalPreconditioner | None = None, scale: float | None = None,
                      normalize_qk: bool = True) -> torch.Tensor:
    """The operator of ``delta_rule`` (DN, GDN, KDA and PDN, PGDN, PKDA) from a zero state.

    With ``Gamma_{t,s} = prod_{l=s+1..t} Diag(alpha_l)`` (a scalar per value head, or one per key
    channel: ``K x K`` diagonal either way) the state from zero is ``S_t = sum_{s <= t} Gamma_{t,s}
    kw_s u_s^T``, so the pseudo-values ``u_t = beta_t (v_t - k_t^T Diag(alpha_t) S_{t-1})`` solve
    ``(I + B) U = diag(beta) V`` with ``B[t, s] = beta_t k_t^T Gamma_{t,s} kw_s`` for ``s < t``, and
    ``o_t = S_t^T q_t = sum_{s <= t} (q_t^T Gamma_{t,s} kw_s) u_s``. Hence the UT form

        ``M = W (I + B)^{-1} diag(beta)``,  ``W[t, s] = q_t^T Gamma_{t,s} kw_s`` (``s <= t``),

    with q and k normalised, q scaled, and the write key ``kw = k`` or ``gain(A_t) k_t`` (its
    statistics ``A`` from zero as well). Neither depends on ``v``: one ``M`` per value head.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        beta: write strengths ``[B, T, HV]``; ``HV`` a multiple of ``H`` (value head j reads key
            head ``j // (HV // H)``).
        g: log decay, None, ``[B, T, HV]`` or ``[B, T, HV, K]``.
        precond: the write key's preconditioner (``g``, ``beta`` ``[B, T, H]``, ``center [H]``), or None.
        scale: factor of the queries; None means ``K ** -0.5``.
        normalize_qk: whether q and k are L2-normalised first.

    Returns:
        ``M [B, HV, T, T]``, lower triangular.
    """
    B, T, H, K = q.shape
    HV = beta.shape[2]
    scale = K**-0.5 if scale is None else float(scale)
    if normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    kw = k
    if precond is not None:
        center = precond.center.to(k.dtype)[:, None]  # [H, 1]
        kw = write_gain(_key_statistics(k, precond), center, precond.x, precond.eps) * k  # [B, T, H, K]
    q, k, kw = (x.repeat_interleave(HV // H, dim=2) for x in (scale * q, k, kw))  # [B, T, HV, K]
    if g is None:
        g = q.new_zeros(B, T, HV)
    log_decay = g.to(q.dtype)[..., None] if g.dim() == 3 else g.to(q.dtype)  # [B, T, HV, 1|K]
    gamma = _decays(log_decay)  # [B, HV, 1|K, T, T]
    W = torch.einsum("bthk,bshk,bhkts->bhts", q, kw, gamma)  # [B, HV, T, T]
    beta = beta.to(q.dtype).transpose(1, 2)  # [B, HV, T]
    strict = torch.einsum("bthk,bshk,bhkts->bhts", k, kw, gamma).tril(-1)  # [B, HV, T, T]
    eye = torch.eye(T, dtype=q.dtype, device=q.device)
    pseudo = torch.linalg.solve_triangular(eye + beta[..., :, None] * strict, torch.diag_embed(beta), upper=False,
                                           unitriangular=True)  # [B, HV, T, T]: U = pseudo @ V
    return W @ pseudo


def gated_kalman_matrix(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
                        ridge: float = 0.02, iters: int | None = 30, alpha: torch.Tensor | None = None,
                        scale: float | None = None) -> torch.Tensor:
    """The operator of ``gated_kalman`` from a zero state.

    The Gram state ``H_t = sum_{s <= t} Gamma_{t,s} beta_s^2 k_s k_s^T`` (``Gamma_{t,s} = prod_{l=s+1..t}
    exp(g_l)``) and so the solve ``x_t ~ (H_t + lambda_t I)^{-1} q_t`` and the readout query
    ``q_mix_t = q_t + alpha_t (x_t - q_t)`` (``x_t`` without ``alpha``) do not depend on ``v``; the
    values enter through ``U_t = sum_{s <= t} Gamma_{t,s} beta_s^2 k_s v_s^T`` only, so
    ``o_t = scale U_t^T q_mix_t`` gives

        ``M[t, s] = scale * Gamma_{t,s} beta_s^2 (q_mix_t . k_s)``.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        g: log decay ``[B, T, H]``.
        beta: strengths ``[B, T, H]`` (scaling keys and values).
        ridge: ``lambda_t = ridge * ||H_t||_F``.
        iters: Chebyshev steps of the solve, as the op's backends run it; None solves exactly (the
            ``exact`` backend).
        alpha: mixing weights ``[B, T, H]``, or None for 1.
        scale: factor of the readout; None means ``K ** -0.5``.

    Returns:
        ``M [B, H, T, T]``, lower triangular.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    gamma = _decays(g.to(q.dtype)[..., None])[:, :, 0]  # [B, H, T, T]
    keys = beta.to(q.dtype)[..., None] * k  # [B, T, H, K]
    gram = torch.einsum("bhts,bshk,bshj->bthkj", gamma, keys, keys)  # [B, T, H, K, K]
    x = token_exact_solve(gram, q, ridge) if iters is None else token_solve(gram, q, ridge, iters)  # [B, T, H, K]
    q_mix = x if alpha is None else q + alpha.to(q.dtype)[..., None] * (x - q)
    return scale * gamma * torch.einsum("bthk,bshk,bsh->bhts", q_mix, keys, beta.to(q.dtype))


def structured_mix_matrix(alpha: torch.Tensor, beta: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """The operator of ``structured_mix`` with translation-invariant offsets, from a zero state.

    ``y_t = alpha_t x_t + sum_k beta_{t,k} y_{t - f(k)}`` is ``Y = diag(alpha) X + B Y`` with
    ``B[t, t - f(k)] = beta_{t,k}`` (strictly lower, offsets before position 0 dropped: their outputs
    are the zero state), so ``M = (I - B)^{-1} diag(alpha)`` (spec/structured_mixing.md §2.1).

    Args:
        alpha: direct coefficients ``[B, T, H]``.
        beta: recurrent coefficients ``[B, T, H, K]``, level ``k`` at offset ``offsets[k]``.
        offsets: ``f(0) < ... < f(K - 1)``, positive.

    Returns:
        ``M [B, H, T, T]``, lower triangular.
    """
    T = alpha.shape[1]
    recurrent = alpha.new_zeros(alpha.shape[0], alpha.shape[2], T, T)  # [B, H, T, T]
    positions = torch.arange(T, device=alpha.device)
    for level, offset in enumerate(offsets):
        rows = positions[offset:]  # t >= f(k)
        recurrent[..., rows, rows - offset] = beta[:, offset:, :, level].transpose(1, 2)
    eye = torch.eye(T, dtype=alpha.dtype, device=alpha.device)
    return torch.linalg.solve_triangular(eye - recurrent, torch.diag_embed(alpha.transpose(1, 2)), upper=False,
                                         unitriangular=True)
