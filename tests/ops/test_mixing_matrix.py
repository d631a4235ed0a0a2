"""Properties of the explicit operators of ``linmix.ops.mixing_matrix`` that the contract suite does not check.

The contract suite (check 12) compares every op's output with its matrix times the values. Here: the
matrix of causal softmax attention (no op of its own) against ``scaled_dot_product_attention``, the
closed forms of spec/structured_mixing.md §2.3 against ours, and the segment sums of the decays.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from linmix.ops.common.chunk import segsum
from linmix.ops.mixing_matrix import (
    apply_mixing_matrix,
    decayed_attention_matrix,
    delta_rule_matrix,
    softmax_attention_matrix,
    structured_mix_matrix,
)

B, H, K, V = 2, 3, 6, 4


def _normal(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("T", [1, 7, 65])
def test_softmax_attention_matrix_is_causal_sdpa(T):
    """``M v`` is causal SDPA at its default scale (the ``attention`` mixer's); rows sum to 1, zeros above
    the diagonal."""
    generator = torch.Generator().manual_seed(T)
    q, k, v = (_normal(generator, B, T, H, size) for size in (K, K, V))
    M = softmax_attention_matrix(q, k)  # [B, H, T, T]
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
    assert_close("o", expected.transpose(1, 2), apply_mixing_matrix(M, v), ratio=1e-12)
    assert torch.equal(M.triu(1), torch.zeros_like(M))
    assert_close("row sums", torch.ones(B, H, T, dtype=torch.float64), M.sum(-1), ratio=1e-14)


def test_segment_sums_are_the_decay_products():
    """``exp(segsum(g))[t, s]`` is ``prod_{l=s+1..t} exp(g_l)`` below the diagonal, 1 on it, 0 above."""
    generator = torch.Generator().manual_seed(0)
    g = -torch.rand(5, generator=generator, dtype=torch.float64)
    expected = torch.zeros(5, 5, dtype=torch.float64)
    for t in range(5):
        for s in range(t + 1):
            expected[t, s] = math.prod(math.exp(g[l]) for l in range(s + 1, t + 1))
    assert_close("decays", expected, torch.exp(segsum(g)), ratio=1e-15)


def test_scalar_decay_is_one_semiseparable():
    """A constant decay ``a`` per head gives §2.3's ``M = (a^(t - s) L) ⊙ scale Q K^T`` (powers, not sums)."""
    T, scale = 9, 0.7
    generator = torch.Generator().manual_seed(1)
    q, k = _normal(generator, B, T, H, K), _normal(generator, B, T, H, K)
    decay = torch.tensor([0.3, 0.9, 1.0], dtype=torch.float64)  # [H]
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # [T, T]
    powers = torch.where(lag >= 0, decay[:, None, None] ** lag.clamp_min(0), 0.0)  # [H, T, T]
    expected = powers * scale * torch.einsum("bthk,bshk->bhts", q, k)
    log_gamma = torch.log(decay)[:, None].expand(H, K)
    assert_close("M", expected, decayed_attention_matrix(q, k, log_gamma, scale=scale), ratio=1e-13)


def test_delta_rule_with_orthogonal_keys_writes_once():
    """Orthonormal keys in order (T <= K, no decay): the erase never meets a past key, so ``u = beta v``
    and ``M = scale (Q K^T ⊙ L) diag(beta)``, the masked linear attention of the pseudo-values."""
    T = K
    generator = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(_normal(generator, K, K))[0]  # [K, K], orthonormal columns
    k = basis.T.expand(B, H, T, K).transpose(1, 2).contiguous()  # [B, T, H, K]
    q = F.normalize(_normal(generator, B, T, H, K), dim=-1)
    beta = torch.rand(B, T, H, generator=generator, dtype=torch.float64)
    expected = 0.5 * torch.einsum("bthk,bshk->bhts", q, k).tril() * beta.transpose(1, 2)[:, :, None, :]
    assert_close("M", expected, delta_rule_matrix(q, k, beta, scale=0.5), ratio=1e-13)


def test_structured_mix_first_order_is_a_gated_recurrence():
    """Offsets {1}: ``M[t, s] = alpha_s prod_{l=s+1..t} beta_l`` (§2.3's diagonal-SSM row, a path product)."""
    T = 8
    generator = torch.Generator().manual_seed(3)
    alpha = _normal(generator, B, T, H)
    beta = torch.rand(B, T, H, 1, generator=generator, dtype=torch.float64)
    products = torch.exp(segsum(torch.log(beta[..., 0]).transpose(1, 2)))  # [B, H, T, T]
    expected = products * alpha.transpose(1, 2)[:, :, None, :]
    assert_close("M", expected, structured_mix_matrix(alpha, beta, (1,)), ratio=1e-13)
