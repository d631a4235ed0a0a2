"""The transformers config of a linmix model: its linmix model spec plus the fields transformers reads."""

from torch import nn
from transformers import PreTrainedConfig

from linmix.models.registry import model_kind, model_spec


class LinmixConfig(PreTrainedConfig):
    """Config of any registered linmix model kind (the generic LM over any mixer, the Transformer
    baseline, the K-Stack) as transformers stores it in config.json.

    Attributes:
        linmix_spec: the linmix model spec ``{"kind", "config"}`` (see `linmix.models.model_spec`);
            `LinmixForCausalLM` builds its model from it with `linmix.models.build_from_spec`.
        vocab_size: the model's vocabulary size, read from the spec.
        hidden_size: the model's width ``d_model``, read from the spec.
        tie_word_embeddings: lets transformers honour the tensors the linmix model shares between
            modules (the K-Stack's shared Kbase): saved once, tied again on loading. A tied LM head
            is no second tensor and needs nothing.
    """

    model_type = "linmix"

    linmix_spec: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.linmix_spec is not None:
            model_kind(self.linmix_spec.get("kind"))  # an unknown kind fails here, naming the registered ones
            self.vocab_size = self.linmix_spec["config"]["vocab_size"]
            self.hidden_size = self.linmix_spec["config"]["d_model"]
        super().__post_init__(**kwargs)

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs) -> "LinmixConfig":
        """The config of a linmix model.

        Args:
            model: a model of a registered kind (e.g. from `linmix.models.build`).
            kwargs: further config fields.

        Returns:
            A LinmixConfig holding ``model_spec(model)``.
        """
        return cls(linmix_spec=model_spec(model), **kwargs)
