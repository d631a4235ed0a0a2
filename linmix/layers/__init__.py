"""Token mixers (nn.Module) with one interface, and the registry that builds them by name."""

from linmix.layers.attention import AttentionConfig, CausalSelfAttention
from linmix.layers.base import Mixer
from linmix.layers.delta import (
    DeltaNet,
    DeltaNetConfig,
    DeltaRuleConfig,
    DeltaRuleMixer,
    GatedDeltaNet,
    GDNConfig,
    KDAConfig,
    KimiDeltaAttention,
    PDeltaNetConfig,
    PGDNConfig,
    PKDAConfig,
    PreconditionedDeltaNet,
    PreconditionedGatedDeltaNet,
    PreconditionedKDA,
)
from linmix.layers.gka import GatedKalmaNet, GKAConfig
from linmix.layers.k2 import K2Config, K2Mixer
from linmix.layers.kbase import BaseKernel
from linmix.layers.mlp import MLP
from linmix.layers.norms import RMSNorm, make_norm
from linmix.layers.registry import (
    MIXERS,
    MixerEntry,
    build_mixer,
    mixer_config,
    mixer_config_in_model,
    mixer_entry,
    register_mixer,
)
from linmix.layers.short_conv import ShortConv
from linmix.layers.structured import StructuredConfig, StructuredMixer

__all__ = [
    "MIXERS",
    "MLP",
    "AttentionConfig",
    "BaseKernel",
    "CausalSelfAttention",
    "DeltaNet",
    "DeltaNetConfig",
    "DeltaRuleConfig",
    "DeltaRuleMixer",
    "GDNConfig",
    "GKAConfig",
    "GatedDeltaNet",
    "GatedKalmaNet",
    "KDAConfig",
    "KimiDeltaAttention",
    "K2Config",
    "K2Mixer",
    "Mixer",
    "MixerEntry",
    "PDeltaNetConfig",
    "PGDNConfig",
    "PKDAConfig",
    "PreconditionedDeltaNet",
    "PreconditionedGatedDeltaNet",
    "PreconditionedKDA",
    "RMSNorm",
    "ShortConv",
    "StructuredConfig",
    "StructuredMixer",
    "build_mixer",
    "make_norm",
    "mixer_config",
    "mixer_config_in_model",
    "mixer_entry",
    "register_mixer",
]
