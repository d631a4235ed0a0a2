"""Baselines: functions measured beside an entry's backends, exempt from the gate (they compute another function).

The shared one is causal softmax attention through ``scaled_dot_product_attention`` (cuDNN or
FlashAttention on a GPU), the quadratic reference point of every linear-time mixer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linmix.bench.cost import counted_flops
from linmix.bench.target import Contender


@dataclass(frozen=True)
class Baseline:
    """A function measured beside an entry's backends; its FLOPs are counted (linmix.bench.cost).

    Attributes:
        description: one line for ``--list``.
        prepare: ``inputs -> prepared inputs``, outside timing.
        run: ``prepared inputs -> output tensor``; timed.
    """

    description: str
    prepare: Callable[[dict], dict]
    run: Callable[[dict], torch.Tensor]

    def contender(self) -> Contender:
        """The baseline as the runner drives it."""
        return Contender(self.description, self.run, functools.partial(counted_flops, self.prepare, self.run),
                         prepare=self.prepare, baseline=True)


def heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """``q, k, v`` from ``[B, T, H, D]`` to ``[B, H, T, D]``, ``v`` cut or zero-padded to ``q``'s width.

    With more value heads than query heads (GVA: ``HV`` a multiple of ``H``, value head ``j`` reading
    key head ``j // (HV // H)``), each query and key head is repeated for its value heads, so that the
    attention has the op's ``HV`` output heads.
    """
    groups = v.shape[2] // q.shape[2]
    if groups > 1 and v.shape[2] % q.shape[2] == 0:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    width = q.shape[-1]
    v = F.pad(v, (0, max(0, width - v.shape[-1])))[..., :width]
    return {name: x.transpose(1, 2).contiguous() for name, x in (("q", q), ("k", k), ("v", v))}


def causal_sdpa(prepared: dict) -> torch.Tensor:
    """Causal softmax attention of ``prepared["q"], ["k"], ["v"]`` (``[B, H, T, D]``), scale ``D ** -0.5``."""
    return F.scaled_dot_product_attention(prepared["q"], prepared["k"], prepared["v"], is_causal=True)


def _named_heads_first(names: tuple[str, str, str], inputs: dict) -> dict[str, torch.Tensor]:
    return heads_first(*(inputs[name] for name in names))


def sdpa_baseline(q: str = "q", k: str = "k", v: str = "v") -> Baseline:
    """Causal attention on an op's own ``[B, T, H, D]`` tensors ``q``, ``k`` and ``v`` (named by the op).

    Args:
        q: the input that serves as queries.
        k: the input that serves as keys.
        v: the input that serves as values (cut or zero-padded to the queries' width).

    Returns:
        the Baseline.
    """
    return Baseline(f"causal softmax attention (scaled_dot_product_attention) on {q}, {k}, {v}",
                    functools.partial(_named_heads_first, (q, k, v)), causal_sdpa)
