"""Hugging Face transformers integration (the optional extra `linmix[hf]`).

`import linmix.hf.auto` registers linmix with transformers' AutoConfig, AutoModelForCausalLM and
AutoTokenizer; `linmix export` (`linmix.hf.export`) turns a training checkpoint into a folder they
load. The classes, importable from here (which imports transformers on first use):

    LinmixConfig         configuration.py  the linmix model spec as a transformers config
    LinmixForCausalLM    modeling.py       forward with labels and cache, generate()
    LinmixCache          cache.py          the recurrent decoding state under generate()
    LinmixTokenizer      tokenization.py   a linmix tokenizer behind transformers' interface

This package imports nothing heavy itself, so that the `linmix` command's parser can load
`linmix.hf.export` at once.
"""

import importlib

_HOMES = {
    "LinmixConfig": "linmix.hf.configuration",
    "LinmixForCausalLM": "linmix.hf.modeling",
    "LinmixPreTrainedModel": "linmix.hf.modeling",
    "LinmixCache": "linmix.hf.cache",
    "LinmixTokenizer": "linmix.hf.tokenization",
    "export_checkpoint": "linmix.hf.export",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """The class or function `name`, imported from its module with the Auto classes registered."""
    if name not in _HOMES:
        raise AttributeError(f"module 'linmix.hf' has no attribute {name!r}")
    importlib.import_module("linmix.hf.auto")
    return getattr(importlib.import_module(_HOMES[name]), name)
