"""Functional sequence mixers: no nn.Module, one public function per op, ``backend=`` dispatch.

Every op registers its backends in ``OPS`` (``linmix.ops._dispatch``), returns ``(o, final_state)``
and has a one-token step.
"""

from linmix.ops._dispatch import OPS, Backend, Op
from linmix.ops.causal_kernel import causal_kernel, causal_kernel_step
from linmix.ops.decayed_attention import decayed_attention, decayed_attention_step

__all__ = ["OPS", "Backend", "Op", "causal_kernel", "causal_kernel_step", "decayed_attention",
           "decayed_attention_step"]
