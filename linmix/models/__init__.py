"""Language models, named presets and the helpers to build them."""

from torch import nn

from linmix.models.generate import generate
from linmix.models.kstack import KStackConfig, KStackLM
from linmix.models.lm import LM, LMConfig, TransformerLM
from linmix.models.param_groups import param_groups
from linmix.models.presets import PRESETS, Preset, get_preset, with_overrides
from linmix.models.registry import (
    MODEL_KINDS,
    ModelKind,
    apply_overrides,
    build_from_spec,
    build_model,
    model_kind,
    model_spec,
    register_model,
)


def build(preset_name: str, **overrides) -> nn.Module:
    """Build the model of preset `preset_name` with `overrides` applied (see `Preset.model_config`)."""
    return get_preset(preset_name).build_model(**overrides)


__all__ = [
    "LM",
    "MODEL_KINDS",
    "PRESETS",
    "KStackConfig",
    "KStackLM",
    "LMConfig",
    "ModelKind",
    "Preset",
    "TransformerLM",
    "apply_overrides",
    "build",
    "build_from_spec",
    "build_model",
    "generate",
    "get_preset",
    "model_kind",
    "model_spec",
    "param_groups",
    "register_model",
    "with_overrides",
]
