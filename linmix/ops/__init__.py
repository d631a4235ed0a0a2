"""Functional sequence mixers: no nn.Module, one public function per op, ``backend=`` dispatch."""

from linmix.ops.causal_kernel import causal_kernel
from linmix.ops.decayed_attention import decayed_attention, decayed_attention_step

__all__ = ["causal_kernel", "decayed_attention", "decayed_attention_step"]
