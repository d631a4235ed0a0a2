"""Registry of model kinds: each kind names its config dataclass and its model class.

Presets, checkpoints (``model_spec`` / ``build_from_spec``), the trainer's command line and the
benchmarks build every model through it. A model whose config has ``mixer`` and ``mixer_kwargs``
fields takes overrides of its mixer's fields too (see ``apply_overrides``).
"""

from dataclasses import asdict, dataclass, fields
from typing import Callable

from torch import nn

from linmix.layers.registry import mixer_entry

MIXER_PREFIX = "mixer_kwargs."


@dataclass(frozen=True)
class ModelKind:
    """One registered model kind.

    Attributes:
        name: the kind's name, as presets and checkpoints store it.
        config_cls: the config dataclass; the model is constructed as ``model_cls(config)``.
        model_cls: the model class.
        migrate_config: turns a config dict written by an earlier version into the current
            fields, or None when every stored config is current.
    """

    name: str
    config_cls: type
    model_cls: type[nn.Module]
    migrate_config: Callable[[dict], dict] | None

    @property
    def field_names(self) -> frozenset[str]:
        """Names of the config's fields."""
        return frozenset(f.name for f in fields(self.config_cls))


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model(
    kind: str, config_cls: type, *, migrate_config: Callable[[dict], dict] | None = None
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a model class as kind ``kind``.

    Args:
        kind: the kind's name; registering a name or a class twice raises ValueError.
        config_cls: the config dataclass the class is constructed from.
        migrate_config: optional ``dict -> dict`` that upgrades a stored config of an earlier
            version (used by ``build_from_spec``).

    Returns:
        The decorator.
    """

    def decorate(model_cls: type[nn.Module]) -> type[nn.Module]:
        if kind in MODEL_KINDS:
            raise ValueError(f"model kind {kind!r} is already registered")
        if any(entry.model_cls is model_cls for entry in MODEL_KINDS.values()):
            raise ValueError(f"{model_cls.__name__} is already registered as a model kind")
        MODEL_KINDS[kind] = ModelKind(kind, config_cls, model_cls, migrate_config)
        return model_cls

    return decorate


def model_kind(kind: str) -> ModelKind:
    """The registration of ``kind``; unknown kinds raise ValueError listing the registered ones."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    return MODEL_KINDS[kind]


def build_model(kind: str, config) -> nn.Module:
    """The model of kind ``kind`` built from its config dataclass."""
    entry = model_kind(kind)
    if not isinstance(config, entry.config_cls):
        raise TypeError(f"model kind {kind!r} takes a {entry.config_cls.__name__}, got {type(config).__name__}")
    return entry.model_cls(config)


def apply_overrides(kind: str, config: dict, overrides: dict) -> dict:
    """The config fields ``config`` of a model of kind ``kind`` with ``overrides`` applied.

    Each override key goes to:

    * a field of the model config: that field (``mixer_kwargs`` as a whole is replaced);
    * ``"mixer_kwargs.FIELD"``: that field of the mixer config, merged into ``mixer_kwargs``;
    * a bare field of the model's mixer config that is no model field: ``mixer_kwargs`` too.

    Args:
        kind: the model kind.
        config: the model config's fields (e.g. a preset's); not modified.
        overrides: field name -> value.

    Returns:
        The new fields (not validated: build the config dataclass from them).

    Raises:
        ValueError: a key that is neither, naming the model's and the mixer's fields.
    """
    model_fields = model_kind(kind).field_names
    result = {**config, **{key: value for key, value in overrides.items() if key in model_fields}}
    mixer_overrides = {key: value for key, value in overrides.items() if key not in model_fields}
    if not mixer_overrides:
        return result
    mixer = result.get("mixer") if "mixer_kwargs" in model_fields else None
    mixer_fields = mixer_entry(mixer).field_names if mixer is not None else frozenset()
    unknown = sorted(
        key for key in mixer_overrides
        if mixer is None or not (key.startswith(MIXER_PREFIX) or key in mixer_fields)
    )
    if unknown:
        mixer_part = f"; fields of mixer {mixer!r} (bare or as mixer_kwargs.FIELD): {sorted(mixer_fields)}"
        raise ValueError(
            f"no model fields {unknown} in a {kind!r} model; its fields: {sorted(model_fields)}"
            + (mixer_part if mixer else "")
        )
    routed = {key.removeprefix(MIXER_PREFIX): value for key, value in mixer_overrides.items()}
    result["mixer_kwargs"] = {**result.get("mixer_kwargs", {}), **routed}
    return result


def kind_of(model: nn.Module) -> ModelKind | None:
    """The registration of ``model``'s class, or None for a model of no registered kind."""
    return next((entry for entry in MODEL_KINDS.values() if type(model) is entry.model_cls), None)


def model_spec(model: nn.Module) -> dict:
    """A JSON-friendly description from which ``build_from_spec`` rebuilds the model."""
    entry = kind_of(model)
    if entry is None:
        raise ValueError(f"{type(model).__name__} is no registered model kind ({sorted(MODEL_KINDS)})")
    return {"kind": entry.name, "config": asdict(model.config)}


def current_config_dict(model: nn.Module, stored: dict) -> dict:
    """A config dict stored for a model like ``model`` (e.g. in a checkpoint of an earlier version),
    upgraded by its kind's ``migrate_config`` and written as ``asdict`` of today's config would be.

    A dict that does not make a valid config, or a model of no registered kind, comes back unchanged.
    """
    entry = kind_of(model)
    if entry is None or entry.migrate_config is None:
        return stored
    try:
        return asdict(entry.config_cls(**entry.migrate_config(dict(stored))))
    except (TypeError, ValueError):
        return stored


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild a model from ``model_spec`` output (e.g. stored in a checkpoint), also one written
    by an earlier version (its kind's ``migrate_config`` upgrades it)."""
    entry = model_kind(spec.get("kind"))
    config = dict(spec["config"])
    if entry.migrate_config is not None:
        config = entry.migrate_config(config)
    return entry.model_cls(entry.config_cls(**config))
