"""Functional sequence mixers: no nn.Module, one public function per op, ``backend=`` dispatch.

Every op registers its backends in ``OPS`` (``linmix.ops._dispatch``), returns ``(o, final_state)``
and has a one-token step. Two process-wide guards apply to every op call (``linmix.ops._guards``):
``check_finite`` (NaN and infinity checks of inputs and outputs, off by default) and
``limit_dense_bytes`` (the largest dense intermediate a backend may build, 4 GiB by default).
"""

from linmix.ops._dispatch import OPS, Backend, Op
from linmix.ops._guards import MAX_DENSE_BYTES, check_finite, is_checking_finite, limit_dense_bytes, max_dense_bytes
from linmix.ops.causal_kernel import causal_kernel, causal_kernel_step
from linmix.ops.decayed_attention import decayed_attention, decayed_attention_step
from linmix.ops.delta_rule import DiagonalPreconditioner, delta_rule, delta_rule_step
from linmix.ops.gated_kalman import gated_kalman, gated_kalman_step
from linmix.ops.structured_mix import structured_mix, structured_mix_step

__all__ = ["MAX_DENSE_BYTES", "OPS", "Backend", "DiagonalPreconditioner", "Op", "causal_kernel", "causal_kernel_step",
           "check_finite", "decayed_attention", "decayed_attention_step", "delta_rule", "delta_rule_step",
           "gated_kalman", "gated_kalman_step", "is_checking_finite", "limit_dense_bytes", "max_dense_bytes",
           "structured_mix", "structured_mix_step"]
