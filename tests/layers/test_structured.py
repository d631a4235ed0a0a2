"""Properties of the structured mixer beyond the layer contract: the layer computes the equations of
spec/structured_mixing.md §5.3 (checked against a token loop written from them), the coefficient maps'
normalisation, the pattern sizes chosen from the context length, the configs it refuses, and the
parameters that take no weight decay."""

import math

import pytest
import torch
from torch.nn import functional as F

from linmix.layers import build_mixer
from linmix.layers.structured import default_pattern_size
from linmix.models import build
from linmix.models.param_groups import param_groups
from linmix.ops.structured_mix.patterns import Lattice

WIDTH = 12
VARIANTS = {
    "softmax_pow2_direct": dict(pattern="pow2", coefficients="slot_softmax", readout="direct"),
    "softmax_sq1_kernel_conv": dict(pattern="sq1", pattern_size=3, coefficients="slot_softmax", readout="kernel",
                                    use_short_conv=True),
    "gates_order2_direct": dict(pattern="kth_order", pattern_size=2, coefficients="normalized_gates"),
    "gates_signed_dense_kernel": dict(pattern="dense", pattern_size=5, coefficients="normalized_gates", signed=True,
                                      readout="kernel"),
    "softmax_pow2_lattice_conv": dict(pattern="pow2_lattice", coefficients="slot_softmax", use_short_conv=True),
    "softmax_sq1_lattice_kernel": dict(pattern="sq1_lattice", pattern_size=5, coefficients="slot_softmax",
                                       readout="kernel"),
    "gates_signed_sq1_lattice": dict(pattern="sq1_lattice", coefficients="normalized_gates", signed=True),
}


def spec_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """The structured layer of spec §5.3, one token at a time with explicit slots, from the layer's weights.

    Args:
        layer: a ``StructuredMixer``; only its parameters and config are read.
        x: ``[B, T, d]``.

    Returns:
        ``[B, T, d]``.
    """
    cfg = layer.config
    B, T, _ = x.shape
    H, K = cfg.n_heads, cfg.key_head_dim
    idx = layer.pattern.index_table(T).tolist()  # [T, L]: the position level j of token t reads, -1 for none
    projected = x @ layer.qkv_proj.weight.T  # [B, T, C]
    if cfg.use_short_conv:
        W = cfg.conv_size
        padded = F.pad(projected, (0, 0, W - 1, 0))
        projected = sum(padded[:, j: j + T] * layer.conv.weight[:, j] for j in range(W))  # lag W-1-j at tap j
    heads = projected.unflatten(-1, (-1, H, K))  # [B, T, 1 or 3, H, K]
    q, k, v = heads.unbind(2) if heads.shape[2] == 3 else (None, None, heads[:, :, 0])
    ys = []  # the mixed values y_t, [B, H, Dx] each
    outputs = []
    for t in range(T):
        valid = [p >= 0 for p in idx[t]]
        if cfg.coefficients == "slot_softmax":
            logits = [(q[:, t] * k[:, t]).sum(-1) / math.sqrt(K) + layer.slot_bias[:, 0]]
            logits += [(q[:, t] * k[:, p]).sum(-1) / math.sqrt(K) + layer.slot_bias[:, 1 + j] if p >= 0
                       else torch.full((B, H), -math.inf, dtype=x.dtype) for j, p in enumerate(idx[t])]
            weights = torch.softmax(torch.stack(logits, -1), -1)  # [B, H, 1 + L]
            alpha, beta = weights[..., 0], weights[..., 1:]
        else:
            r = (x[:, t] @ layer.gate_proj.weight.T + layer.gate_proj.bias).unflatten(-1, (H, -1))  # [B, H, 1 + L]
            alpha = torch.sigmoid(r[..., 0])
            beta = (torch.tanh if cfg.signed else torch.sigmoid)(r[..., 1:]) * torch.tensor(valid, dtype=x.dtype)
            total = alpha + beta.abs().sum(-1)
            alpha, beta = alpha / total.clamp_min(1), beta / total.clamp_min(1)[..., None]
        value = v[:, t] if cfg.readout == "direct" else (k[:, t, :, :, None] * v[:, t, :, None, :]).flatten(-2)
        y = alpha[..., None] * value
        for j, p in enumerate(idx[t]):
            if p >= 0:
                y = y + beta[..., j, None] * ys[p]
        ys.append(y)
        o = y if cfg.readout == "direct" else torch.einsum("bhk,bhkv->bhv", q[:, t] / math.sqrt(K),
                                                             y.unflatten(-1, (K, K)))
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.o_norm.weight
        outputs.append(o.flatten(-2) @ layer.o_proj.weight.T)
    return torch.stack(outputs, dim=1)


def make_layer(variant: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    layer = build_mixer("structured", d_model=WIDTH, context_length=16, n_heads=2, **VARIANTS[variant], **extra)
    layer = layer.double()
    with torch.no_grad():  # biases and norm scales off their zero and one inits, so that the test sees them
        for name, parameter in layer.named_parameters():
            if name.endswith("bias") or name.startswith("o_norm"):
                parameter.add_(torch.randn_like(parameter))
    return layer


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_computes_the_spec_equations(variant):
    layer = make_layer(variant)
    x = torch.randn(2, 13, WIDTH, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, _ = layer(x)
    torch.testing.assert_close(y, spec_layer(layer, x), rtol=1e-10, atol=1e-12)


def coefficients(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha [B, T, H] and beta [B, T, H, L] that the layer hands the op on x."""
    captured = {}

    def spy(xs, alpha, beta, **settings):
        captured.update(alpha=alpha, beta=beta)
        return original(xs, alpha, beta, **settings)

    import linmix.layers.structured as module

    original = module.structured_mix
    module.structured_mix = spy
    try:
        layer(x)
    finally:
        module.structured_mix = original
    return captured["alpha"], captured["beta"]


def test_slot_softmax_rows_are_convex_over_the_existing_levels():
    layer = make_layer("softmax_pow2_direct")
    x = 5 * torch.randn(3, 16, WIDTH, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    alpha, beta = coefficients(layer, x)
    assert (alpha > 0).all() and (beta >= 0).all()
    torch.testing.assert_close(alpha + beta.sum(-1), torch.ones_like(alpha))
    before_start = torch.arange(16)[:, None] < torch.tensor(layer.pattern.offsets)  # [T, L]
    beta = beta.transpose(2, 3)  # [B, T, L, H]
    assert (beta[:, before_start] == 0).all() and (beta[:, ~before_start] > 0).all()


@pytest.mark.parametrize("signed", [False, True])
def test_normalized_gates_have_total_l1_at_most_one(signed):
    variant = "gates_signed_dense_kernel" if signed else "gates_order2_direct"
    layer = make_layer(variant)
    with torch.no_grad():
        layer.gate_proj.weight.mul_(100)  # saturated gates: the normalisation binds
    x = torch.randn(3, 16, WIDTH, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    alpha, beta = coefficients(layer, x)
    total = alpha + beta.abs().sum(-1)
    assert (total <= 1 + 1e-12).all() and (total > 0.99).any()
    assert bool((beta < 0).any()) == signed


def test_a_long_sequence_stays_bounded_with_saturated_gates():
    """The L1 normalisation keeps the recurrence non-expansive: outputs never exceed the values' scale."""
    layer = make_layer("gates_signed_dense_kernel")
    with torch.no_grad():
        layer.gate_proj.weight.mul_(100)
    x = torch.randn(1, 200, WIDTH, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y, _ = layer(x)
    assert y.isfinite().all() and y.abs().max() < 100


@pytest.mark.parametrize("pattern, context, size, offsets", [
    ("pow2", 256, 8, (1, 2, 4, 8, 16, 32, 64, 128)),
    ("pow2", 257, 9, None),
    ("sq1", 256, 16, None),
    ("kth_order", 256, 8, (1, 2, 3, 4, 5, 6, 7, 8)),
    ("dense", 64, 63, None),
    ("pow2", 1, 1, (1,)),
    ("dense", 1, 1, (1,)),
])
def test_pattern_size_from_the_context_length(pattern, context, size, offsets):
    assert default_pattern_size(pattern, context) == size
    layer = build_mixer("structured", d_model=8, n_heads=1, pattern=pattern, context_length=context)
    assert layer.pattern.levels == size
    assert layer.pattern.max_offset < max(context, 2)
    if offsets is not None:
        assert layer.pattern.offsets == offsets


def test_an_explicit_pattern_size_wins_and_first_order_takes_none():
    layer = build_mixer("structured", d_model=8, n_heads=1, pattern="sq1", pattern_size=4, context_length=999)
    assert layer.pattern.offsets == (1, 2, 5, 10)
    assert build_mixer("structured", d_model=8, n_heads=1, pattern="first_order").pattern.offsets == (1,)


@pytest.mark.parametrize("fields, match", [
    ({"pattern": "pow3"}, "pattern must be one of"),
    ({"coefficients": "softmax"}, "coefficients must be one of"),
    ({"readout": "state"}, "readout must be one of"),
    ({"pattern": "first_order", "pattern_size": 2}, "pattern_size must be None"),
    ({"pattern_size": 0}, "pattern_size must be an int >= 1"),
    ({"signed": True}, "signed=True needs coefficients='normalized_gates'"),
    ({"n_heads": 3}, "multiple of n_heads=3"),
    ({"backend": "triton"}, "backend of mixer 'structured' must be one of"),
])
def test_bad_configs_are_rejected_at_construction(fields, match):
    with pytest.raises(ValueError, match=match):
        build_mixer("structured", d_model=8, **{"n_heads": 2, **fields})


@pytest.mark.parametrize("pattern, levels, offsets", [
    ("pow2_lattice", 10, (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
    ("sq1_lattice", 32, None),
])
def test_a_lattice_decodes_with_one_slot_per_level(pattern, levels, offsets):
    """The cache-efficient patterns (spec §3.4) keep L slots of outputs and keys, not the last f(L - 1) positions."""
    layer = build_mixer("structured", d_model=8, n_heads=2, pattern=pattern, context_length=1024)
    assert isinstance(layer.pattern, Lattice) and layer.pattern.levels == levels
    assert offsets is None or layer.pattern.offsets == offsets
    state = layer.init_state(3, "cpu", torch.float32)
    (slots, position), keys = state["mix"], state["keys"]
    assert slots.shape == (3, 2, levels, 4) and keys.shape == (3, levels, 2, 4) and position.dtype == torch.int64
    _, state = layer(torch.randn(3, 700, 8), state)
    assert state["mix"][0].shape == slots.shape and state["mix"][1].tolist() == [700] * 3


def test_level_biases_take_no_weight_decay():
    model = build("structured-ts-pow2", d_model=16, n_layers=1, context_length=32)
    groups = param_groups(model, "simple", weight_decay=0.1)
    no_decay = {id(p) for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    mixer = model.blocks[0].mixer
    assert id(mixer.slot_bias) in no_decay and id(mixer.qkv_proj.weight) not in no_decay
