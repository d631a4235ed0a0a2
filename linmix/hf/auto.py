"""Importing this module registers linmix with transformers' Auto classes: AutoConfig (model type
"linmix"), AutoModelForCausalLM and AutoTokenizer. No `trust_remote_code` is needed."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from linmix.hf.configuration import LinmixConfig
from linmix.hf.modeling import LinmixForCausalLM
from linmix.hf.tokenization import LinmixTokenizer

AutoConfig.register(LinmixConfig.model_type, LinmixConfig, exist_ok=True)
AutoModelForCausalLM.register(LinmixConfig, LinmixForCausalLM, exist_ok=True)
AutoTokenizer.register(LinmixConfig, tokenizer_class=LinmixTokenizer, exist_ok=True)
