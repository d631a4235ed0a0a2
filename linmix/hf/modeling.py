"""transformers model classes around a linmix model: `forward` with HF's labels and cache, and
`generate()` through a `LinmixCache` that equals `linmix.models.generate` token for token."""

from dataclasses import fields

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from linmix.hf.cache import LinmixCache
from linmix.hf.configuration import LinmixConfig
from linmix.models.registry import build_from_spec

# transformers 5.24 renamed the cache of model inputs and outputs from `past_key_values` to `cache`.
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
IGNORE_INDEX = -100  # labels that take no part in the loss (transformers' convention)
UNSUPPORTED_INPUTS = ("inputs_embeds", "output_attentions", "output_hidden_states")


class LinmixPreTrainedModel(PreTrainedModel):
    """Base of the linmix transformers models: config class, weight prefix, stateful decoding."""

    config_class = LinmixConfig
    base_model_prefix = "linmix"
    main_input_name = "input_ids"
    _is_stateful = True  # generate refuses assisted decoding, which would need to roll the state back

    def _init_weights(self, module: nn.Module) -> None:
        """Zero `module`'s non-persistent buffers; leave its weights as the linmix model initialised them.

        from_pretrained builds the model on the meta device and calls this for the modules that the
        weights file did not fill: those with non-persistent buffers, which in linmix models are
        running sums that start at zero (evaluation diagnostics).
        """
        for name in module._non_persistent_buffers_set:
            buffer = getattr(module, name)
            if buffer is not None:
                buffer.zero_()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate must not make a key-value DynamicCache: `forward` makes a `LinmixCache`."""
        return False


class LinmixForCausalLM(LinmixPreTrainedModel, GenerationMixin):
    """A linmix language model (any registered kind) as a transformers causal LM.

    The linmix model is the submodule `linmix`, so the weights are its tensors under the prefix
    "linmix.". Tensors the model shares between modules (the K-Stack's shared Kbase) are declared
    tied, so that safetensors stores each once.

    Args:
        config: a LinmixConfig holding the model's linmix spec.
    """

    def __init__(self, config: LinmixConfig):
        super().__init__(config)
        if config.linmix_spec is None:
            raise ValueError("LinmixConfig.linmix_spec is None: make the config with LinmixConfig.from_model(model)")
        # from_pretrained(dtype=...) builds under that default dtype; tensors a linmix model makes
        # in float32 explicitly follow it too.
        self.linmix = build_from_spec(config.linmix_spec).to(torch.get_default_dtype())
        self._tied_weights_keys = shared_parameter_names(self.linmix, prefix="linmix.")
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding."""
        return self.linmix.embed

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        cache: LinmixCache | None = None,
        past_key_values: LinmixCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits of every position, the loss of `labels`, and the decoding cache.

        Args:
            input_ids: [B, T] tokens; with a cache, the tokens after those it has seen.
            labels: [B, T] targets as transformers writes them: the input ids themselves (position t
                is scored on labels[:, t + 1]), IGNORE_INDEX where no loss is wanted.
            cache: the cache of the tokens before `input_ids` (`past_key_values` in transformers < 5.24).
            past_key_values: the same, under its earlier name.
            use_cache: decode through a cache (made if none is given) and return it; default: whether
                a cache is given.
            attention_mask: [B, T_total] ones; linmix models take no padding.
            return_dict: False for a tuple (transformers' convention).
            kwargs: other transformers inputs, ignored (position_ids, ...); inputs_embeds,
                output_attentions and output_hidden_states are not supported.

        Returns:
            CausalLMOutputWithPast: loss (mean next-token cross-entropy in float32, or None), logits
            [B, T, V] (log-probabilities for an adaptive head; with a cache past the model's window,
            those of the last `window` positions) and the cache (or None).
        """
        unsupported = [name for name in UNSUPPORTED_INPUTS if _is_given(kwargs.get(name))]
        if unsupported:
            raise ValueError(f"LinmixForCausalLM does not support {unsupported}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("linmix models take no padding: attention_mask must be all ones "
                             "(give prompts of equal length)")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = cache is not None
        if use_cache:
            if cache is None:
                cache = LinmixCache(self.linmix, input_ids.shape[0], input_ids.device, self.dtype)
            logits = cache.advance(self.linmix, input_ids)
        else:
            cache = None
            logits = self.linmix(input_ids)[0]
        loss = None if labels is None else causal_lm_loss(logits, labels)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, use_cache: bool = True, **kwargs
    ) -> dict:
        """The inputs of `forward` at one step of generate: the tokens the cache has not seen.

        Args:
            input_ids: [B, T] the whole sequence so far.
            attention_mask: generate's [B, T] mask.
            use_cache: whether generate decodes with a cache.
            kwargs: generate's other model inputs; the cache under `cache` or `past_key_values`.

        Returns:
            The keyword arguments of `forward`.
        """
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache, "attention_mask": attention_mask}


def _is_given(value) -> bool:
    """Whether a transformers option is set (neither None nor False; tensors count as set)."""
    return value is not None and value is not False


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32, transformers' causal-LM convention.

    Args:
        logits: [B, T, V] (log-probabilities serve too).
        labels: [B, T]; position t is scored on labels[:, t + 1]; IGNORE_INDEX marks no target.

    Returns:
        The scalar loss.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be [B, T] = {list(logits.shape[:2])}, got {list(labels.shape)}")
    shifted = logits[:, :-1].float().flatten(0, 1)  # [B (T - 1), V]
    return F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def shared_parameter_names(module: nn.Module, prefix: str = "") -> dict[str, str]:
    """Names under which `module` reaches a parameter it already reached under another name.

    Args:
        module: any module.
        prefix: put before every name (the module's name in its parent, with the dot).

    Returns:
        {later name: first name} for every such parameter.
    """
    first_names: dict[int, str] = {}
    shared = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        first = first_names.setdefault(id(parameter), name)
        if first != name:
            shared[prefix + name] = prefix + first
    return shared
