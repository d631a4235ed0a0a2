"""The mixer registry: what a registration must hold, and how mixers are built by name."""

from dataclasses import dataclass

import pytest
import torch

import linmix.ops
from linmix.layers import MIXERS, Mixer, build_mixer, mixer_config, register_mixer


@dataclass
class ScaleConfig:
    d_model: int
    factor: float = 2.0
    backend: str = "naive"


class Scale(Mixer):
    """A stateless position-wise scaling: the smallest mixer that satisfies the contract."""

    def __init__(self, config: ScaleConfig):
        super().__init__()
        self.config = config

    def forward(self, x, state=None):
        return self.config.factor * x, state

    def init_state(self, batch_size, device, dtype):
        return None


@pytest.fixture
def scratch_registry():
    """Registrations made by a test are removed after it."""
    saved = dict(MIXERS)
    yield
    MIXERS.clear()
    MIXERS.update(saved)


def test_a_registered_mixer_is_built_by_name(scratch_registry):
    register_mixer("scale", ScaleConfig, test_configs={"double": {}}, backend_field="backend",
                   backend_op="decayed_attention")(Scale)
    entry = MIXERS["scale"]
    assert (entry.name, entry.config_cls, entry.module_cls) == ("scale", ScaleConfig, Scale)
    assert entry.test_configs == {"double": {}} and entry.bench_config(64) == {}
    assert entry.field_names == {"d_model", "factor", "backend"}
    layer = build_mixer("scale", d_model=4, factor=3.0)
    assert isinstance(layer, Scale) and layer.window == float("inf") and layer.no_weight_decay == ()
    y_t, state = layer.step(torch.ones(2, 4), None)  # the default step: forward on one position
    assert torch.equal(y_t, torch.full((2, 4), 3.0)) and state is None


def test_a_duplicate_name_is_refused(scratch_registry):
    register_mixer("scale", ScaleConfig, test_configs={"double": {}})(Scale)
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("scale", ScaleConfig, test_configs={"double": {}})(Scale)
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("k2", ScaleConfig, test_configs={"double": {}})(Scale)


def test_a_class_that_is_no_mixer_is_refused(scratch_registry):
    with pytest.raises(TypeError, match="subclass of linmix.layers.Mixer"):
        register_mixer("linear", ScaleConfig, test_configs={"double": {}})(torch.nn.Linear)
    with pytest.raises(TypeError, match="dataclass"):
        register_mixer("scale", dict, test_configs={"double": {}})
    assert "linear" not in MIXERS


@pytest.mark.parametrize("kwargs, match", [
    (dict(test_configs={}), "at least one"),
    (dict(test_configs={"wide": {"d_model": 8}}), "besides d_model"),
    (dict(test_configs={"odd": {"colour": "red"}}), "colour"),
    (dict(test_configs={"double": {}}, backend_field="kernel", backend_op="decayed_attention"), "no field"),
    (dict(test_configs={"double": {}}, backend_field="backend"), "together"),
])
def test_incomplete_registrations_are_refused(kwargs, match, scratch_registry):
    with pytest.raises(ValueError, match=match):
        register_mixer("scale", ScaleConfig, **kwargs)


def test_a_mixer_must_implement_forward_and_init_state():
    class Incomplete(Mixer):
        def forward(self, x, state=None):
            return x, state

    with pytest.raises(TypeError, match="init_state"):
        Incomplete()


def test_unknown_names_and_fields_are_named():
    with pytest.raises(ValueError, match=r"unknown mixer 'nope'; registered mixers: \['attention', .*'k2'"):
        build_mixer("nope", d_model=8)
    with pytest.raises(ValueError, match=r"no config fields \['colour'\]; known fields: .*'rank'"):
        mixer_config("k2", d_model=8, colour="red")


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_builds_at_its_bench_config(name):
    """What `linmix bench --op layer --mixer NAME` builds: the bench config at a large width, with the
    backend field set to backends of the op (every op has "naive" and "chunk"), which agree."""
    entry = MIXERS[name]
    d_model, context_length = 256, 512
    x = torch.randn(1, 8, d_model, generator=torch.Generator().manual_seed(0))

    def output(**backend):
        torch.manual_seed(0)
        layer = build_mixer(name, d_model=d_model, context_length=context_length, **entry.bench_config(d_model),
                            **backend)
        return layer(x)[0]

    assert output().shape == (1, 8, d_model)
    if entry.backend_op is not None:
        assert callable(getattr(linmix.ops, entry.backend_op))
        naive, chunk = (output(**{entry.backend_field: backend}) for backend in ("naive", "chunk"))
        torch.testing.assert_close(chunk, naive, rtol=1e-4, atol=1e-5)
