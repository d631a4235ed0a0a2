"""Registry of token mixers: a model config names its mixer, the registry builds it.

Every registered mixer subclasses ``linmix.layers.base.Mixer`` (the layer contract) and is
constructed from a dataclass config. Its registration also says how the platform exercises it:
the tiny configs the layer contract suite (tests/layers/) runs, the config the layer benchmark
builds at large width, and which config field picks the backend of which op.
"""

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable

from linmix.layers.base import Mixer
from linmix.ops import OPS

# Fields the tests and the benchmark set themselves; a mixer's test configs leave them out.
SIZE_FIELDS = ("d_model", "context_length")


def _no_bench_fields(d_model: int) -> dict:
    return {}


@dataclass(frozen=True)
class MixerEntry:
    """One registered mixer.

    Attributes:
        name: the name model configs use (``mixer="k2"``).
        config_cls: the mixer's config dataclass.
        module_cls: the ``Mixer`` subclass, constructed as ``module_cls(config)``.
        test_configs: named tiny configs (config fields besides d_model and context_length) that
            the layer contract suite runs.
        bench_config: ``bench_config(d_model) -> dict``, the config fields (besides d_model and
            context_length) the layer benchmark uses at width d_model. The benchmark builds
            ``build_mixer(name, d_model=d, context_length=T, **entry.bench_config(d),
            **{entry.backend_field: backend})`` for each backend of the op ``backend_op``.
        backend_field: the config field that picks the backend of ``backend_op``, or None.
        backend_op: the ``linmix.ops`` op whose backends ``backend_field`` takes, or None.
    """

    name: str
    config_cls: type
    module_cls: type[Mixer]
    test_configs: dict[str, dict]
    bench_config: Callable[[int], dict]
    backend_field: str | None
    backend_op: str | None

    @property
    def field_names(self) -> frozenset[str]:
        """Names of the config's fields."""
        return frozenset(f.name for f in fields(self.config_cls))


MIXERS: dict[str, MixerEntry] = {}


def register_mixer(
    name: str,
    config_cls: type,
    *,
    test_configs: dict[str, dict],
    bench_config: Callable[[int], dict] | None = None,
    backend_field: str | None = None,
    backend_op: str | None = None,
) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator that registers a ``Mixer`` subclass under ``name``.

    Args:
        name: the mixer's name; registering a name twice raises ValueError.
        config_cls: the dataclass the module is constructed from.
        test_configs: at least one named tiny config for the layer contract suite: ``{label:
            {field: value}}`` without d_model and context_length, which the suite fills.
        bench_config: ``d_model -> {field: value}``, the layer benchmark's config at that width;
            None when the config's defaults serve.
        backend_field: a config field that picks the backend of ``backend_op``.
        backend_op: the op (a ``linmix.ops`` function name) whose backends ``backend_field`` takes;
            given together with ``backend_field``.

    Returns:
        The decorator; it raises TypeError for a class that is not a ``Mixer`` subclass.
    """
    if not (isinstance(config_cls, type) and is_dataclass(config_cls)):
        raise TypeError(f"config_cls of mixer {name!r} must be a dataclass, got {config_cls!r}")
    known = {f.name for f in fields(config_cls)}
    if not test_configs:
        raise ValueError(f"test_configs of mixer {name!r} must name at least one config")
    for label, config in test_configs.items():
        unknown = sorted(set(config) - known)
        if unknown or any(size in config for size in SIZE_FIELDS):
            raise ValueError(
                f"test_configs[{label!r}] of mixer {name!r} may only set fields of {config_cls.__name__} besides "
                f"{', '.join(SIZE_FIELDS)}; got {sorted(config)}, known: {sorted(known)}"
            )
    if (backend_field is None) != (backend_op is None):
        raise ValueError(
            f"mixer {name!r}: give backend_field and backend_op together, got {backend_field!r} and {backend_op!r}"
        )
    if backend_field is not None and backend_field not in known:
        raise ValueError(
            f"backend_field {backend_field!r} of mixer {name!r} is no field of {config_cls.__name__}: {sorted(known)}"
        )

    def decorate(module_cls: type[Mixer]) -> type[Mixer]:
        if not (isinstance(module_cls, type) and issubclass(module_cls, Mixer)):
            raise TypeError(f"mixer {name!r} must be a subclass of linmix.layers.Mixer, got {module_cls!r}")
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is already registered")
        MIXERS[name] = MixerEntry(
            name, config_cls, module_cls, {label: dict(config) for label, config in test_configs.items()},
            bench_config or _no_bench_fields, backend_field, backend_op,
        )
        return module_cls

    return decorate


def mixer_entry(name: str) -> MixerEntry:
    """The registration of mixer ``name``; unknown names raise ValueError listing the registered ones."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(MIXERS)}")
    return MIXERS[name]


def mixer_config(name: str, **kwargs: Any):
    """Build the config dataclass of mixer ``name``; unknown fields, and a backend field that names
    no backend of its op, raise ValueError naming the known ones."""
    entry = mixer_entry(name)
    unknown = sorted(set(kwargs) - entry.field_names)
    if unknown:
        raise ValueError(f"mixer {name!r} has no config fields {unknown}; known fields: {sorted(entry.field_names)}")
    config = entry.config_cls(**kwargs)
    if entry.backend_field is not None:
        backend, choices = getattr(config, entry.backend_field), OPS[entry.backend_op].backend_names()
        if backend not in choices:
            raise ValueError(f"{entry.backend_field} of mixer {name!r} must be one of {', '.join(choices)}; "
                             f"got {backend!r}")
    return config


def mixer_config_in_model(name: str, mixer_kwargs: dict, model_fields: dict):
    """The config of mixer ``name`` inside a model: the model's own values filled in, then ``mixer_kwargs``.

    Args:
        name: the mixer.
        mixer_kwargs: the mixer's own config fields, as a model config holds them.
        model_fields: fields the model sets (e.g. d_model, context_length); each is filled in where
            the mixer's config has it, and ``mixer_kwargs`` may not set it.

    Returns:
        The mixer's config dataclass (validated by its constructor).
    """
    owned = sorted(set(mixer_kwargs) & set(model_fields))
    if owned:
        raise ValueError(f"mixer_kwargs may not set {owned}: the model sets them from its own fields")
    known = mixer_entry(name).field_names
    filled = {key: value for key, value in model_fields.items() if key in known}
    return mixer_config(name, **filled, **mixer_kwargs)


def build_mixer(name: str, **kwargs: Any) -> Mixer:
    """Build mixer ``name`` from keyword config fields (see ``mixer_config``)."""
    config = mixer_config(name, **kwargs)
    return MIXERS[name].module_cls(config)
