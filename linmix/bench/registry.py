"""The benchmarked ops: their backends, input builders, gate reference, shape sets and cost model.

Each ``Op`` names the backends that compute its function (gated against ``reference``) and the
baselines measured beside them (``Backend.baseline``: another function, exempt from the gate).

Cost model. FLOPs count the matrix products an op's algorithm needs, 2 per multiply-add;
elementwise work (decay exponentials, masks, norms, biases) and recomputation inside a backward
are left out. The backward of a product ``Y = A B`` is two products of the same size
(``dA = dY B^T``, ``dB = A^T dY``), so every op below costs ``fwdbwd = 3 fwd``. The count is the
op's, not a backend's: every backend of one function is credited the same work (the quadratic
``mask`` backend included), so TFLOP/s rank backends like their times do.

* decayed_attention, chunks of ``C = 64`` positions, per chunk and head: scores ``Q K^T``
  ``2 C^2 K`` (the full ``C x C`` tile, as the kernels compute it), intra-chunk output ``A V``
  ``2 C^2 V``, state read ``Q S`` ``2 C K V``, state update ``S += K^T V`` ``2 C K V``; over the
  ``T / C`` chunks: ``fwd = 2 B H T (C K + C V + 2 K V)``. The backward's eight products
  (``dA = dO V^T``, ``dQ``, ``dK`` and ``dV`` within the chunk and through the state, and the state
  gradient ``dS += Q^T dO``) are twice the forward's four.
* sdpa baseline, causal softmax attention on ``[B, H, T, K]`` with ``V = K``: ``Q K^T`` and ``P V``
  below the diagonal, ``fwd = B H T^2 (K + K)``. (FlashAttention's papers count ``3.5 fwd`` for
  fwdbwd, including the recomputed scores; here the same rule as for every op applies.)
* k2_layer per token (``d`` model width, ``r`` rank, ``L`` Toeplitz taps): projections to q and k
  ``4 d r``, decay path (decayed attention with ``H = 1, K = r, V = d``) ``2 (C r + C d + 2 r d)``,
  Kbase ``2 L d``, output projection ``2 d^2``.
* attention layer per token: qkv and output projections ``8 d^2``, plus causal attention
  ``2 B T^2 d`` over the batch; the plain sdpa baseline of k2_layer is that attention term alone.
* causal_kernel (Toeplitz, ``L`` taps): ``fwd = 2 B T H D L``.

Bytes are an ideal-traffic model: the forward reads every input once and writes the output once;
the backward reads the inputs and the output gradient and writes the input gradients:
``fwd = in + out``, ``fwdbwd = fwd + (in + out) + in = 3 in + 2 out``. Tensors are counted in the
benchmark dtype, except log decays, kept in float32; layers count their parameters as inputs.
Activations a backend keeps between its kernels are not counted, so GB/s is a lower bound. A
backend may add its own model of the bytes its kernels move (``Backend.traffic``; the Triton
decayed_attention kernels have one, with their float32 chunk states, scores and summed decays):
the bench then also reports that traffic's share of the memory roof ("kernel traffic").
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from linmix.layers import AttentionConfig, CausalSelfAttention, K2Config, K2Mixer
from linmix.ops import causal_kernel, decayed_attention
from linmix.ops.decayed_attention import BACKENDS as DECAYED_ATTENTION_BACKENDS

CHUNK = 64  # chunk length C of the cost model (the chunked backends' chunk size)
FWD_BWD_FLOP_FACTOR = 3  # fwdbwd FLOPs per forward FLOP: the backward of a product is two products
INPUT_SEED = 0  # inputs, output gradients and layer parameters are drawn from this seed
FLA_SHAPES = ((8, 2048, 16, 128), (4, 4096, 16, 128), (2, 16384, 16, 128))  # fla's (B, T, H, D)
TSWEEP_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
TOKENS_PER_BATCH = 32768  # B * T of every tsweep shape
K2_SHAPE = {"d": 1024, "r": 32, "L": 16, "heads": 16}  # K2 layer width, rank, Kbase taps; baseline heads
QUADRATIC_MAX_T = 4096  # quadratic-memory backends are skipped above this length
TOKEN_LOOP_MAX_T = 2048  # token-by-token references are skipped above this length


@dataclass(frozen=True)
class Cost:
    """An op's forward work on one shape.

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
        cost: the op's forward cost on the shape.
        mode: ``"fwd"`` or ``"fwdbwd"``.

    Returns:
        ``(flops, bytes)``.
    """
    if mode == "fwd":
        return cost.flops, cost.in_bytes + cost.out_bytes
    return FWD_BWD_FLOP_FACTOR * cost.flops, 3 * cost.in_bytes + 2 * cost.out_bytes


def _unchanged(inputs: dict, shape: dict) -> dict:
    return inputs


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One way to compute an op, or a baseline measured beside it.

    Attributes:
        run: ``prepared inputs -> output tensor``; timed.
        prepare: ``(inputs, shape) -> prepared inputs``, run once outside timing (a layout change,
            a module built from the shape). Differentiable, so the gate's gradients reach the inputs.
        baseline: computes another function (sdpa, an attention layer): exempt from the gate.
        cost: ``(shape, dtype) -> Cost`` of a baseline; None uses the op's.
        max_T: longest sequence measured; longer shapes are skipped with ``skip_reason``.
        skip_reason: why shapes beyond ``max_T`` are skipped.
        needs_cuda: only runs on a CUDA device.
        missing: ``() -> reason`` the backend cannot be imported (e.g. "not installed"), or None.
        gate_tolerance: relative RMS error allowed by the gate; None uses the op's.
        traffic: ``(shape, dtype, mode) -> bytes`` its kernels read and write in one call, by the
            backend's own model (beside the op's ideal traffic); None where there is none.
    """

    run: Callable[[dict], torch.Tensor]
    prepare: Callable[[dict, dict], dict] = _unchanged
    baseline: bool = False
    cost: Callable[[dict, torch.dtype], Cost] | None = None
    max_T: int | None = None
    skip_reason: str = ""
    needs_cuda: bool = False
    missing: Callable[[], str | None] = _always_available
    gate_tolerance: float | None = None
    traffic: Callable[[dict, torch.dtype, str], float] | None = None


@dataclass
class Op:
    """A benchmarked op.

    Attributes:
        name: the ``--op`` name.
        description: one line for ``--list``.
        backends: backend name -> Backend.
        default_backends: what ``--backends`` means when not given.
        reference: the backend the gate runs in float64 as ground truth.
        build_inputs: ``(shape, dtype, device, requires_grad) -> inputs``, a dict of tensors and
            plain values; every floating tensor is a leaf with ``requires_grad`` as asked.
        cost: ``(shape, dtype) -> Cost`` of the op's function.
        shape_keys: the keys every shape dict must hold, in label order.
        shape_sets: ``--shapes`` name -> list of shape dicts.
        gate_shape: the small shape of the correctness gate.
        options: further input settings with their defaults (merged into every shape dict).
        option_choices: option name -> its allowed values, for the options that have a fixed set.
        gate_tolerance: relative RMS error allowed by the gate (float32 against float64).
        ratio_baselines: backends that get an "x vs NAME" speed ratio column when measured.
    """

    name: str
    description: str
    backends: dict[str, Backend]
    default_backends: tuple[str, ...]
    reference: str
    build_inputs: Callable[[dict, torch.dtype, str, bool], dict]
    cost: Callable[[dict, torch.dtype], Cost]
    shape_keys: tuple[str, ...]
    shape_sets: dict[str, list[dict]]
    gate_shape: dict
    options: dict = field(default_factory=dict)
    option_choices: dict = field(default_factory=dict)
    gate_tolerance: float = 1e-3
    ratio_baselines: tuple[str, ...] = ()

    def cost_of(self, backend: str, shape: dict, dtype: torch.dtype) -> Cost:
        """The forward cost of ``backend`` on ``shape``: its own for a baseline, else the op's."""
        own = self.backends[backend].cost
        return (own or self.cost)(shape, dtype)


def shape_label(op: Op, shape: dict) -> str:
    """A compact label of a shape, e.g. ``"B8 T2048 H16 K128 V128"``."""
    return " ".join(f"{key}{shape[key]}" for key in op.shape_keys)


def decay_spread(channels: int, low: float, high: float) -> torch.Tensor:
    """Decays from ``low`` to ``high`` with ``1 - gamma`` evenly spaced on a log scale.

    Args:
        channels: how many decays.
        low: the first (smallest) decay, in (0, 1).
        high: the last (largest) decay, in (0, 1).

    Returns:
        float64 ``[channels]``.
    """
    return 1.0 - torch.logspace(math.log10(1.0 - low), math.log10(1.0 - high), channels, dtype=torch.float64)


def _normal(generator: torch.Generator, size: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.randn(size, generator=generator, device=device)


def _leaves(tensors: dict, requires_grad: bool) -> dict:
    return {name: tensor.requires_grad_(requires_grad) for name, tensor in tensors.items()}


def _tsweep(**fixed) -> list[dict]:
    return [{"B": TOKENS_PER_BATCH // T, "T": T, **fixed} for T in TSWEEP_LENGTHS]


# ----------------------------------------------------------------------------- decayed_attention


def build_decayed_attention_inputs(shape: dict, dtype: torch.dtype, device: str, requires_grad: bool) -> dict:
    """Random q, k, v and log decays for ``decayed_attention``.

    Args:
        shape: ``B, T, H, K, V``; ``decay`` ("constant": ``[H, K]`` decays spread over
            ``gamma_range``; "per-token": ``[B, T, H, K]`` log-sigmoid gates centred on those
            decays); ``gamma_range`` ``[low, high]``.
        dtype: dtype of q, k and v (log decays stay float32).
        device: where the tensors live.
        requires_grad: whether q, k, v and the log decays require gradients.

    Returns:
        ``{"q", "k", "v", "log_gamma", "scale"}`` with ``scale = K ** -0.5``.
    """
    B, T, H, K, V = (shape[key] for key in "BTHKV")
    generator = torch.Generator(device=device).manual_seed(INPUT_SEED)
    gammas = decay_spread(K, *shape["gamma_range"]).to(device)  # [K]
    if shape["decay"] == "constant":
        log_gamma = gammas.log().float().expand(H, K).contiguous()  # [H, K]
    else:
        noise = _normal(generator, (B, T, H, K), device)
        log_gamma = F.logsigmoid(torch.logit(gammas).float() + noise)  # [B, T, H, K]
    tensors = {
        "q": _normal(generator, (B, T, H, K), device).to(dtype),
        "k": _normal(generator, (B, T, H, K), device).to(dtype),
        "v": _normal(generator, (B, T, H, V), device).to(dtype),
        "log_gamma": log_gamma,
    }
    return {**_leaves(tensors, requires_grad), "scale": K**-0.5}


def decayed_attention_cost(shape: dict, dtype: torch.dtype) -> Cost:
    """Chunked decayed attention: ``fwd = 2 B H T (C K + C V + 2 K V)``."""
    B, T, H, K, V = (shape[key] for key in "BTHKV")
    gate_elements = H * K if shape["decay"] == "constant" else B * T * H * K
    in_bytes = dtype.itemsize * B * T * H * (2 * K + V) + 4 * gate_elements
    return Cost(2 * B * H * T * (CHUNK * K + CHUNK * V + 2 * K * V), in_bytes, dtype.itemsize * B * T * H * V)


def _decayed_attention_backend(name: str) -> Callable[[dict], torch.Tensor]:
    def run(inputs: dict) -> torch.Tensor:
        q, k, v, log_gamma = inputs["q"], inputs["k"], inputs["v"], inputs["log_gamma"]
        # The built decays are in range: time the kernels, not the value check's read-back (as the K2 mixer calls it).
        return decayed_attention(q, k, v, log_gamma, scale=inputs["scale"], backend=name, check_values=False)[0]

    return run


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()  # [B, T, H, D] -> [B, H, T, D]


def _sdpa_inputs(inputs: dict, shape: dict) -> dict:
    """q, k and v as ``[B, H, T, K]``; v cut or zero-padded to K channels."""
    K = shape["K"]
    v = F.pad(inputs["v"], (0, max(0, K - shape["V"])))[..., :K]
    q, k = _heads_first(inputs["q"]), _heads_first(inputs["k"])
    return {"q": q, "k": k, "v": _heads_first(v), "scale": inputs["scale"]}


def _run_sdpa(inputs: dict) -> torch.Tensor:
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], is_causal=True, scale=inputs["scale"])


def sdpa_cost(shape: dict, dtype: torch.dtype) -> Cost:
    """Causal softmax attention with ``V = K``: ``fwd = 2 B H T^2 K``."""
    B, T, H, K = (shape[key] for key in "BTHK")
    size = dtype.itemsize * B * T * H * K
    return Cost(2 * B * H * T * T * K, 3 * size, size)


@functools.cache
def fla_missing() -> str | None:
    """Why ``fla.ops.gla`` cannot be imported ("not installed", or the import error), or None."""
    try:
        importlib.import_module("fla.ops.gla")
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "fla":
            return "not installed"
        return f"import failed: {error}"
    except Exception as error:  # a broken install raises whatever its imports raise
        return f"import failed: {type(error).__name__}: {error}"
    return None


# Limits of decayed_attention's backends, shared by the K2 layers built on them.
DECAY_BACKEND_LIMITS = {
    "naive": {"max_T": TOKEN_LOOP_MAX_T, "skip_reason": "token-by-token loop"},
    "mask": {"max_T": QUADRATIC_MAX_T, "skip_reason": "quadratic memory"},
    "triton": {"needs_cuda": True},
    "fla": {"needs_cuda": True, "missing": fla_missing},
}


def _triton_kernel_traffic(shape: dict, dtype: torch.dtype, mode: str) -> float:
    """Bytes the Triton decayed_attention kernels move in one call (their model: ``triton.kernel_traffic``)."""
    traffic = importlib.import_module("linmix.ops.decayed_attention.triton").kernel_traffic
    return traffic(*(shape[key] for key in "BTHKV"), dtype.itemsize, shape["decay"] == "per-token", mode == "fwdbwd")


def _decayed_attention_backends() -> dict[str, Backend]:
    backends = {name: Backend(_decayed_attention_backend(name), **DECAY_BACKEND_LIMITS.get(name, {}))
                for name in DECAYED_ATTENTION_BACKENDS}
    if "triton" in backends:
        backends["triton"] = dataclasses.replace(backends["triton"], traffic=_triton_kernel_traffic)
    # fla's tl.dot multiplies float32 in TF32 (Triton's default), so it is held to the 5e-3 of fla's GLA tests.
    backends["fla"] = Backend(_decayed_attention_backend("fla"), **DECAY_BACKEND_LIMITS["fla"], gate_tolerance=5e-3)
    backends["sdpa"] = Backend(_run_sdpa, prepare=_sdpa_inputs, baseline=True, cost=sdpa_cost)
    return backends


DECAYED_ATTENTION = Op(
    name="decayed_attention",
    description="gated linear attention with a per-key-channel decay (linmix.ops.decayed_attention)",
    backends=_decayed_attention_backends(),
    default_backends=("chunk", "mask", "triton", "fla", "sdpa"),
    reference="chunk",
    build_inputs=build_decayed_attention_inputs,
    cost=decayed_attention_cost,
    shape_keys=("B", "T", "H", "K", "V"),
    shape_sets={
        "fla": [{"B": B, "T": T, "H": H, "K": D, "V": D} for B, T, H, D in FLA_SHAPES],
        "tsweep": _tsweep(H=16, K=128, V=128),
        "k2": _tsweep(H=1, K=K2_SHAPE["r"], V=K2_SHAPE["d"]),
        "small": [{"B": 2, "T": 64, "H": 2, "K": 16, "V": 16}, {"B": 1, "T": 130, "H": 2, "K": 16, "V": 32}],
    },
    gate_shape={"B": 1, "T": 257, "H": 2, "K": 32, "V": 48, "gamma_range": [0.01, 0.9999]},
    options={"decay": "constant", "gamma_range": [0.9, 0.999]},
    option_choices={"decay": ("constant", "per-token")},
    ratio_baselines=("fla", "sdpa", "chunk"),
)

# ----------------------------------------------------------------------------- k2_layer


def build_layer_inputs(shape: dict, dtype: torch.dtype, device: str, requires_grad: bool) -> dict:
    """The normalised input of a token-mixing layer.

    Args:
        shape: ``B, T, d`` (and the layer settings ``r, L, heads``, read by the backends).
        dtype: dtype of the input and of the layers built from it.
        device: where the input lives.
        requires_grad: whether the input requires a gradient.

    Returns:
        ``{"x": [B, T, d]}``.
    """
    generator = torch.Generator(device=device).manual_seed(INPUT_SEED)
    x = _normal(generator, (shape["B"], shape["T"], shape["d"]), device).to(dtype)
    return _leaves({"x": x}, requires_grad)


def _seeded_layer(factory: Callable[[], torch.nn.Module], like: torch.Tensor) -> torch.nn.Module:
    """A layer built on the CPU from ``INPUT_SEED``, then moved to ``like``'s device and dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INPUT_SEED)
        layer = factory()
    return layer.to(like.device, like.dtype)


def _k2_layer(decay_backend: str) -> Callable[[dict, dict], dict]:
    def prepare(inputs: dict, shape: dict) -> dict:
        config = K2Config(d_model=shape["d"], rank=shape["r"], kbase="toeplitz", kbase_taps=shape["L"],
                          decay_backend=decay_backend)
        return {"x": inputs["x"], "layer": _seeded_layer(lambda: K2Mixer(config), inputs["x"])}

    return prepare


def _attention_layer(inputs: dict, shape: dict) -> dict:
    config = AttentionConfig(d_model=shape["d"], n_heads=shape["heads"], context_length=shape["T"])
    return {"x": inputs["x"], "layer": _seeded_layer(lambda: CausalSelfAttention(config), inputs["x"])}


def _run_layer(inputs: dict) -> torch.Tensor:
    return inputs["layer"](inputs["x"])[0]


def _layer_sdpa_inputs(inputs: dict, shape: dict) -> dict:
    """Three copies of the input split into ``heads`` heads, ``[B, heads, T, d / heads]``."""
    B, T, d, heads = shape["B"], shape["T"], shape["d"], shape["heads"]
    split = inputs["x"].view(B, T, heads, d // heads)
    return {"q": _heads_first(split), "k": _heads_first(split), "v": _heads_first(split), "scale": (d // heads) ** -0.5}


def k2_layer_cost(shape: dict, dtype: torch.dtype) -> Cost:
    """K2 layer: ``fwd = 2 B T (4 d r + C r + C d + L d + d^2)``."""
    B, T, d, r, L = (shape[key] for key in ("B", "T", "d", "r", "L"))
    tokens = B * T
    params = 2 * d * r + r + L + d * d + d + 2  # U, V, decay logits, taps, W_o, b_o, gate, alpha
    flops = 2 * tokens * (4 * d * r + CHUNK * r + CHUNK * d + L * d + d * d)
    return Cost(flops, dtype.itemsize * (tokens * d + params), dtype.itemsize * tokens * d)


def attention_layer_cost(shape: dict, dtype: torch.dtype) -> Cost:
    """Attention layer: ``fwd = 8 B T d^2 + 2 B T^2 d``."""
    B, T, d = shape["B"], shape["T"], shape["d"]
    tokens = B * T
    flops = 8 * tokens * d * d + 2 * B * T * T * d
    return Cost(flops, dtype.itemsize * (tokens * d + 4 * d * d), dtype.itemsize * tokens * d)


def layer_sdpa_cost(shape: dict, dtype: torch.dtype) -> Cost:
    """Causal attention alone: ``fwd = 2 B T^2 d``."""
    B, T, d = shape["B"], shape["T"], shape["d"]
    size = dtype.itemsize * B * T * d
    return Cost(2 * B * T * T * d, 3 * size, size)


def _k2_layer_backends() -> dict[str, Backend]:
    backends = {name: Backend(_run_layer, prepare=_k2_layer(name), **DECAY_BACKEND_LIMITS.get(name, {}))
                for name in DECAYED_ATTENTION_BACKENDS}
    backends["attention"] = Backend(_run_layer, prepare=_attention_layer, baseline=True, cost=attention_layer_cost)
    backends["sdpa"] = Backend(_run_sdpa, prepare=_layer_sdpa_inputs, baseline=True, cost=layer_sdpa_cost)
    return backends


K2_LAYER = Op(
    name="k2_layer",
    description="K2Mixer layer (toeplitz Kbase), one backend per decay_backend, against attention",
    backends=_k2_layer_backends(),
    default_backends=("chunk", "mask", "triton", "attention", "sdpa"),
    reference="chunk",
    build_inputs=build_layer_inputs,
    cost=k2_layer_cost,
    shape_keys=("B", "T", "d", "r", "L", "heads"),
    shape_sets={
        "fla": [{"B": B, "T": T, **K2_SHAPE} for B, T, _, _ in FLA_SHAPES],
        "tsweep": _tsweep(**K2_SHAPE),
        "k2": _tsweep(**K2_SHAPE),
        "small": [{"B": B, "T": T, "d": 64, "r": 8, "L": 16, "heads": 4} for B, T in ((2, 64), (1, 130))],
    },
    gate_shape={"B": 1, "T": 257, "d": 64, "r": 8, "L": 16, "heads": 4},
    ratio_baselines=("attention", "sdpa", "chunk"),
)

# ----------------------------------------------------------------------------- causal_kernel


def build_causal_kernel_inputs(shape: dict, dtype: torch.dtype, device: str, requires_grad: bool) -> dict:
    """An input and a per-head Toeplitz filter for ``causal_kernel``.

    Args:
        shape: ``B, T, H, D, L``.
        dtype: dtype of both tensors.
        device: where they live.
        requires_grad: whether both require gradients.

    Returns:
        ``{"x": [B, T, H, D], "kernel": [H, L]}``, the filter a decaying exponential plus noise.
    """
    B, T, H, D, L = (shape[key] for key in "BTHDL")
    generator = torch.Generator(device=device).manual_seed(INPUT_SEED)
    x = _normal(generator, (B, T, H, D), device)
    taps = torch.exp(-0.15 * torch.arange(L, device=device)) + 0.1 * _normal(generator, (H, L), device)
    return _leaves({"x": x.to(dtype), "kernel": taps.to(dtype)}, requires_grad)


def causal_kernel_cost(shape: dict, dtype: torch.dtype) -> Cost:
    """Toeplitz causal kernel: ``fwd = 2 B T H D L``."""
    B, T, H, D, L = (shape[key] for key in "BTHDL")
    size = dtype.itemsize * B * T * H * D
    return Cost(2 * B * T * H * D * L, size + dtype.itemsize * H * L, size)


def _causal_kernel_backend(name: str) -> Callable[[dict], torch.Tensor]:
    def run(inputs: dict) -> torch.Tensor:
        return causal_kernel(inputs["x"], inputs["kernel"], form="toeplitz", backend=name)

    return run


CAUSAL_KERNEL = Op(
    name="causal_kernel",
    description="Toeplitz causal kernel with L taps per head (linmix.ops.causal_kernel)",
    backends={
        "conv": Backend(_causal_kernel_backend("conv")),
        "matmul": Backend(_causal_kernel_backend("matmul"), max_T=QUADRATIC_MAX_T, skip_reason="quadratic memory"),
        "naive": Backend(_causal_kernel_backend("naive"), max_T=TOKEN_LOOP_MAX_T, skip_reason="token-by-token loop"),
        "triton": Backend(_causal_kernel_backend("triton"), needs_cuda=True),
    },
    default_backends=("conv", "matmul", "triton"),
    reference="naive",
    build_inputs=build_causal_kernel_inputs,
    cost=causal_kernel_cost,
    shape_keys=("B", "T", "H", "D", "L"),
    shape_sets={
        "fla": [{"B": B, "T": T, "H": H, "D": D, "L": 16} for B, T, H, D in FLA_SHAPES],
        "tsweep": _tsweep(H=16, D=128, L=16),
        "k2": _tsweep(H=1, D=K2_SHAPE["d"], L=K2_SHAPE["L"]),
        "small": [{"B": 2, "T": 64, "H": 2, "D": 16, "L": 16}, {"B": 1, "T": 130, "H": 2, "D": 16, "L": 16}],
    },
    gate_shape={"B": 1, "T": 257, "H": 2, "D": 24, "L": 16},
    ratio_baselines=("matmul", "conv"),
)

OPS: dict[str, Op] = {op.name: op for op in (DECAYED_ATTENTION, K2_LAYER, CAUSAL_KERNEL)}


def get_op(name: str) -> Op:
    """The registered op called ``name``.

    Raises:
        ValueError: no op has that name.
    """
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; registered ops: {', '.join(OPS)}")
    return OPS[name]


def register_backend(op_name: str, backend_name: str, backend: Backend) -> None:
    """Add a backend to a registered op (it is gated like the op's own backends).

    Args:
        op_name: the op, e.g. ``"decayed_attention"``.
        backend_name: the new backend's name; must not be taken.
        backend: how to run it.

    Raises:
        ValueError: the op is unknown or already has a backend of that name.
    """
    op = get_op(op_name)
    if backend_name in op.backends:
        raise ValueError(f"op {op_name!r} already has a backend {backend_name!r}")
    op.backends[backend_name] = backend
