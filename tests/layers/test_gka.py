"""Properties of the Gated KalmaNet mixer beyond the layer contract: the layer computes the equations of
spec/gated_kalmanet.md §2 (checked against a token loop written from them), its initialisation, and
the parameters that take no weight decay."""

import pytest
import torch
from torch.nn import functional as F

from linmix.layers import build_mixer
from linmix.models import build
from linmix.models.param_groups import param_groups

TOGGLES = ("use_forget_gate", "use_alpha", "use_beta_gate", "use_gate")
# Every toggle on, every toggle off, and each one off alone.
VARIANTS = [dict.fromkeys(TOGGLES, True), dict.fromkeys(TOGGLES, False)] + [
    {**dict.fromkeys(TOGGLES, True), off: False} for off in TOGGLES
]


def spec_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """The GKA layer of spec §2, one token at a time with exact ridge solves, from the layer's weights.

    Args:
        layer: a ``GatedKalmaNet``; only its parameters and config are read.
        x: ``[B, T, d]``.

    Returns:
        ``[B, T, d]``.
    """
    cfg = layer.config
    B, T, _ = x.shape
    H, K, W = cfg.n_heads, cfg.key_head_dim, cfg.conv_size
    projected = x @ layer.qkv_proj.weight.T  # [B, T, 3HK]
    padded = F.pad(projected, (0, 0, W - 1, 0))
    conv = sum(padded[:, j: j + T] * layer.conv.weight[:, j] for j in range(W))  # lag W-1-j at tap j
    q, k, v = F.silu(conv).unflatten(-1, (3, H, K)).unbind(2)  # [B, T, H, K] each
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    gates = torch.sigmoid(x @ layer.gate_proj.weight.T + layer.gate_proj.bias) if layer.gate_proj is not None else None
    beta = gates[..., :H] + 1e-6 if cfg.use_beta_gate else torch.ones(B, T, H, dtype=x.dtype)
    alpha = gates[..., -H:] if cfg.use_alpha else torch.ones(B, T, H, dtype=x.dtype)
    if cfg.use_forget_gate:
        dt = F.softplus(x @ layer.decay_proj.weight.T + layer.dt_bias)
        gamma = torch.exp(-torch.exp(layer.A_log) * dt)  # [B, T, H]
    else:
        gamma = torch.ones(B, T, H, dtype=x.dtype)
    k, v = beta[..., None] * k, beta[..., None] * v
    gram = torch.zeros(B, H, K, K, dtype=x.dtype)
    kv = torch.zeros(B, H, K, K, dtype=x.dtype)
    eye = torch.eye(K, dtype=x.dtype)
    outputs = []
    for t in range(T):
        decay = gamma[:, t, :, None, None]
        gram = decay * gram + k[:, t, :, :, None] * k[:, t, :, None, :]
        kv = decay * kv + k[:, t, :, :, None] * v[:, t, :, None, :]
        ridge = cfg.ridge * torch.linalg.matrix_norm(gram)[..., None, None]  # Frobenius, [B, H, 1, 1]
        solved = torch.linalg.solve(gram + ridge * eye, q[:, t])  # [B, H, K]
        mixed = q[:, t] + alpha[:, t, :, None] * (solved - q[:, t])
        outputs.append(torch.einsum("bhk,bhkv->bhv", mixed, kv) / K ** 0.5)
    o = torch.stack(outputs, dim=1)  # [B, T, H, K]
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.o_norm.weight
    if cfg.use_gate:
        o = o * F.silu(x @ layer.o_gate_proj.weight.T).unflatten(-1, (H, K))
    return o.flatten(-2) @ layer.o_proj.weight.T


@pytest.mark.parametrize("toggles", VARIANTS, ids=lambda t: "-".join(f"{k[4:]}={int(v)}" for k, v in t.items()))
def test_the_layer_computes_the_spec_equations(toggles):
    torch.manual_seed(0)
    layer = build_mixer("gka", d_model=24, n_heads=2, conv_size=3, backend="exact", **toggles).double()
    with torch.no_grad():  # gates away from their initial values, so that each one changes the output
        for param in layer.parameters():
            param.add_(0.3 * torch.randn_like(param))
    x = torch.randn(2, 13, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # float32 tolerances: linmix's RMSNorm normalises in float32 whatever the dtype
        torch.testing.assert_close(layer(x)[0], spec_layer(layer, x), rtol=1e-5, atol=1e-5)


def test_the_chebyshev_solve_approaches_the_exact_one():
    """30 Chebyshev steps at ridge 0.02: relative error about 3e-4 (spec §0), far below the gap to 0 steps."""
    torch.manual_seed(0)
    layer = build_mixer("gka", d_model=32, n_heads=2, backend="exact").double()
    x = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = layer(x)[0]
        errors = {}
        for iters in (0, 30):
            layer.config.iters, layer.config.backend = iters, "chunk"
            errors[iters] = ((layer(x)[0] - exact).norm() / exact.norm()).item()
    assert errors[30] < 2e-3 < errors[0]


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    layer = build_mixer("gka", d_model=64, n_heads=2)
    A = layer.A_log.exp()
    assert ((A > 0) & (A <= 16)).all()  # A ~ U(0, 16), spec §5 item 9
    dt = F.softplus(layer.dt_bias)
    assert (dt >= 1e-4 - 1e-9).all() and (dt <= 0.1 + 1e-6).all()
    assert torch.equal(layer.gate_proj.bias, torch.zeros(4))  # beta and alpha of 2 heads
    assert layer.decay_proj.bias is None
    for name, param in layer.named_parameters():
        if name.endswith("proj.weight"):
            assert abs(param.std().item() - 0.02) < 0.005, name


@pytest.mark.parametrize("use_forget_gate, expected", [(True, {"A_log", "dt_bias"}), (False, set())])
def test_decay_parameters_take_no_weight_decay(use_forget_gate, expected):
    model = build("gka-ts", **{"mixer_kwargs.use_forget_gate": use_forget_gate})
    mixer = model.blocks[0].mixer
    assert set(mixer.no_weight_decay) == expected
    no_decay = {id(p) for group in param_groups(model, "simple", 0.1) if group["weight_decay"] == 0.0
                for p in group["params"]}
    assert all(id(getattr(mixer, name)) in no_decay for name in expected)
    assert id(mixer.qkv_proj.weight) not in no_decay and id(mixer.conv.weight) not in no_decay


@pytest.mark.parametrize("field, value, match", [
    ("ridge", 0.0, "ridge"), ("iters", -1, "iters"), ("n_heads", 5, "multiple of n_heads"),
    ("head_dim", 0, "head_dim"), ("backend", "fast", "backend"),
])
def test_bad_settings_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        build_mixer("gka", **{"d_model": 16, "n_heads": 2, field: value})
