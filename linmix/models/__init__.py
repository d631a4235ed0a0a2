"""Language models, named presets and the helpers to build them."""

from dataclasses import asdict

from torch import nn

from linmix.models.generate import generate
from linmix.models.kstack import KStackConfig, KStackLM
from linmix.models.lm import LM, LMConfig, TransformerLM
from linmix.models.param_groups import param_groups
from linmix.models.presets import PRESETS, Preset, get_preset, with_overrides

MODEL_CLASSES = {"kstack": KStackLM, "transformer": TransformerLM, "lm": LM}


def build(preset_name: str, **overrides) -> nn.Module:
    """Build the model of preset `preset_name` with model-config `overrides` applied."""
    preset = get_preset(preset_name)
    return MODEL_CLASSES[preset.model_kind](preset.model_config(**overrides))


def model_spec(model: nn.Module) -> dict:
    """A JSON-friendly description from which `build_from_spec` rebuilds the model."""
    kind = next(k for k, cls in MODEL_CLASSES.items() if type(model) is cls)
    return {"kind": kind, "config": asdict(model.config)}


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild a model from `model_spec` output (e.g. stored in a checkpoint)."""
    kind = spec.get("kind")
    if kind not in MODEL_CLASSES:
        raise ValueError(f"model kind must be one of {sorted(MODEL_CLASSES)}, got {kind!r}")
    config_cls = KStackConfig if kind == "kstack" else LMConfig
    return MODEL_CLASSES[kind](config_cls(**spec["config"]))


__all__ = [
    "LM",
    "PRESETS",
    "KStackConfig",
    "KStackLM",
    "LMConfig",
    "Preset",
    "TransformerLM",
    "build",
    "build_from_spec",
    "generate",
    "get_preset",
    "model_spec",
    "param_groups",
    "with_overrides",
]
