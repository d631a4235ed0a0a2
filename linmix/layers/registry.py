"""Registry of token mixers: a model config names its mixer, the registry builds it.

Every registered mixer follows the layer contract:

* constructed from a dataclass config;
* ``forward(x: [B, T, d], state=None) -> (y: [B, T, d], state)``;
* ``step(x_t: [B, d], state) -> (y_t: [B, d], state)`` decodes one token;
* ``init_state(batch_size, device, dtype)`` returns the empty decoding state.
"""

from dataclasses import fields
from typing import Any, Callable

from torch import nn

MIXERS: dict[str, tuple[type, type[nn.Module]]] = {}


def register_mixer(name: str, config_cls: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a mixer module under `name` with its config dataclass."""

    def decorate(module_cls: type[nn.Module]) -> type[nn.Module]:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is already registered")
        MIXERS[name] = (config_cls, module_cls)
        return module_cls

    return decorate


def mixer_config(name: str, **kwargs: Any):
    """Build the config dataclass of mixer `name`; unknown fields raise ValueError."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(MIXERS)}")
    config_cls = MIXERS[name][0]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"mixer {name!r} has no config fields {unknown}; known fields: {sorted(known)}")
    return config_cls(**kwargs)


def build_mixer(name: str, **kwargs: Any) -> nn.Module:
    """Build mixer `name` from keyword config fields (see `mixer_config`)."""
    config = mixer_config(name, **kwargs)
    return MIXERS[name][1](config)
