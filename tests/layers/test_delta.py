"""Properties of the delta-rule mixers beyond the layer contract: their initialisation, the parameters
that take no weight decay, and the preconditioner at x = 1 giving back the plain mixer."""

import pytest
import torch

from linmix.layers import build_mixer
from linmix.models import build
from linmix.models.param_groups import param_groups

PAIRS = [("deltanet", "pdeltanet"), ("gdn", "pgdn"), ("kda", "pkda")]
NAMES = [name for pair in PAIRS for name in pair]


@pytest.mark.parametrize("name", NAMES)
def test_initialisation_follows_the_paper(name):
    torch.manual_seed(0)
    layer = build_mixer(name, d_model=64, n_heads=2)
    params = dict(layer.named_parameters())
    for a_log in ("A_log", "precond_A_log"):
        if a_log in params:
            assert (params[a_log].exp() <= 16).all()  # A = exp(A_log) ~ U(0, 16)
    for dt_bias in ("dt_bias", "precond_dt_bias"):
        if dt_bias in params:
            dt = torch.nn.functional.softplus(params[dt_bias])
            assert (dt >= 1e-4 - 1e-9).all() and (dt <= 0.1 + 1e-6).all()
    if "precond_center" in params:
        assert torch.equal(params["precond_center"], torch.full((2,), -0.2))
    for param_name, param in params.items():
        if param_name.endswith("proj.weight") or param_name.endswith(".0.weight") or param_name.endswith(".1.weight"):
            assert abs(param.std().item() - 0.02) < 0.005, param_name


@pytest.mark.parametrize("preset", [f"{name}-ts" for name in NAMES])
def test_gates_and_centres_take_no_weight_decay(preset):
    model = build(preset)
    mixer = model.blocks[0].mixer
    expected = {"A_log", "dt_bias"} if "deltanet" not in preset else set()
    if preset.startswith("p"):
        expected |= {"precond_A_log", "precond_dt_bias", "precond_center"}
    assert set(mixer.no_weight_decay) == expected
    no_decay = {id(p) for group in param_groups(model, "simple", 0.1) if group["weight_decay"] == 0.0
                for p in group["params"]}
    assert all(id(getattr(mixer, name)) in no_decay for name in expected)
    assert id(mixer.qkv_proj.weight) not in no_decay and id(mixer.conv.weight) not in no_decay


@pytest.mark.parametrize("plain, preconditioned", PAIRS)
def test_preconditioner_at_x_one_is_the_plain_mixer(plain, preconditioned):
    torch.manual_seed(0)
    config = dict(d_model=16, n_heads=2, n_v_heads=4, backend="chunk")
    base = build_mixer(plain, **config).double()
    precond = build_mixer(preconditioned, **config, precond_x=1.0).double()
    own = dict(precond.named_parameters())
    assert set(own) - {name for name, _ in base.named_parameters()} == {
        "precond_A_log", "precond_dt_bias", "precond_center"}
    with torch.no_grad():
        for name, param in base.named_parameters():
            own[name][: param.shape[0]].copy_(param)  # gate_proj's extra rows: the preconditioner's gates
        x = torch.randn(2, 19, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(precond(x)[0], base(x)[0], rtol=1e-10, atol=1e-10)
