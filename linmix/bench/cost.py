"""The cost model of ``linmix bench``: the work and the ideal memory traffic of one call.

Work. FLOPs count the matrix products of an algorithm, 2 per multiply-add; elementwise work
(decay exponentials, masks, norms, biases, activations) and recomputation inside a backward are
left out. The backward of a product ``Y = A B`` is two products of the same size
(``dA = dY B^T``, ``dB = A^T dY``), so every entry costs ``fwdbwd = 3 fwd``. The count is the
function's, not a backend's: every backend of one op is credited the same work (the quadratic
``mask`` backend and the ``naive`` loop included), so TFLOP/s rank backends like their times do.

* An op declares its forward count beside it, in its package's ``bench.py``, with its derivation.
* Layers and baselines are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
  forward on the meta device (matrix products and convolutions; elementwise work is left out, as
  above). Causal ``scaled_dot_product_attention`` is counted over the pairs below the diagonal:
  ``T^2 / 2`` per head, ``fwd = B H T^2 (K + V)`` (torch's counter would count the full ``T x T``).
  A layer is counted through its op's ``"auto"`` backend on the meta device (the chunked form of
  decayed_attention), whose in-chunk scores are an elementwise sum and so not counted.

Bytes are an ideal-traffic model: the forward reads every input once and writes the output once;
the backward reads the inputs and the output gradient and writes the input gradients:
``fwd = in + out``, ``fwdbwd = fwd + (in + out) + in = 3 in + 2 out``. They are the bytes of the
tensors a row runs on: its inputs in the benchmark dtype (an op's float32 arguments, such as log
decays, in float32), a layer's parameters (counted as inputs) and the output. Activations a
backend keeps between its kernels are not counted, so GB/s is a lower bound. An entry may add a
backend's own model of the bytes its kernels move (its ``traffic``): the bench then also reports
that traffic's share of the memory roof ("kernel traffic").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from linmix.bench.inputs import meta_copies

FWD_BWD_FLOP_FACTOR = 3  # fwdbwd FLOPs per forward FLOP: the backward of a product is two products


@dataclass(frozen=True)
class Cost:
    """The forward work and ideal traffic of one call.

    Attributes:
        flops: forward floating-point operations (2 per multiply-add).
        in_bytes: bytes of the inputs (and layer parameters), read once.
        out_bytes: bytes of the output, written once.
    """

    flops: float
    in_bytes: float
    out_bytes: float


def mode_cost(cost: Cost, mode: str) -> tuple[float, float]:
    """FLOPs and bytes of one call in a mode, by the model of this module's docstring.

    Args:
        cost: the forward cost of the call.
        mode: ``"fwd"`` or ``"fwdbwd"``.

    Returns:
        ``(flops, bytes)``.
    """
    if mode == "fwd":
        return cost.flops, cost.in_bytes + cost.out_bytes
    return FWD_BWD_FLOP_FACTOR * cost.flops, 3 * cost.in_bytes + 2 * cost.out_bytes


class CausalAttentionFlops(TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` calls by their pairs, ``T^2 / 2`` per head when causal.

    Inside the mode an attention call computes nothing: it returns an empty output of the right
    shape (the counting runs on the meta device), so ``FlopCounterMode`` does not see its products.

    Attributes:
        flops: the FLOPs of the calls seen so far.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]  # [..., Tq, E], [..., Tk, E], [..., Tk, Ev]
        causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
        pairs = q.shape[-2] * k.shape[-2] / (2 if causal else 1)
        self.flops += 2 * math.prod(q.shape[:-2]) * pairs * (q.shape[-1] + v.shape[-1])
        return q.new_empty(*q.shape[:-1], v.shape[-1])


def counted_flops(prepare: Callable[[dict], dict], run: Callable[[dict], torch.Tensor], inputs: dict) -> float:
    """The forward FLOPs of ``run(prepare(inputs))``, counted on the meta device (module docstring).

    Args:
        prepare: builds the call's arguments from the inputs (a layer, a layout change).
        run: the call.
        inputs: the inputs; only their shapes and dtypes are read.

    Returns:
        the FLOPs of its matrix products, convolutions and attention.
    """
    counter = FlopCounterMode(display=False)
    with counter, CausalAttentionFlops() as attention:
        run(prepare(meta_copies(inputs)))
    return counter.get_total_flops() + attention.flops
