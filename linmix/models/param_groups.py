"""AdamW parameter groups of the papers' two optimizer modes.

* ``simple``: weight decay on every parameter with ndim >= 2 (embeddings, linear weights, U, V,
  Kbase), none on vectors and scalars nor on the declared parameters (below); one learning rate
  (also nanoGPT's rule).
* ``grouped`` (K-Operators WikiText-2): core lr x1 with decay; biases, norm scales and the declared
  parameters (K2's theta, a, beta, the stack's eta) lr x0.5 without decay; embedding and its
  projection lr x0.75 without decay. As in the papers' code, K0's gain vector falls into "core"
  and is decayed.

A module declares its own parameters that take no weight decay in ``no_weight_decay``, a tuple of
attribute names (see ``linmix.layers.Mixer``); a declared name whose attribute is None (an optional
parameter the module was built without) is skipped.
"""

from torch import nn

from linmix.layers.norms import RMSNorm

GROUPED_RULES = {  # category -> (lr_scale, weight decay applies)
    "core": (1.0, True),
    "bias": (0.5, False),
    "norm": (0.5, False),
    "embedding": (0.75, False),
    "logit": (0.5, False),
}
OPTIMIZER_MODES = ("simple", "grouped")
_ABSENT = object()


def declared_no_decay(model: nn.Module) -> set[int]:
    """Ids of the parameters that their modules list in ``no_weight_decay``.

    Args:
        model: the model; every submodule's ``no_weight_decay`` (default ``()``) is read.

    Returns:
        The parameters' ids.

    Raises:
        ValueError: a declared name that is no parameter of the module itself.
    """
    ids = set()
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        for name in getattr(module, "no_weight_decay", ()):
            if name in own:
                ids.add(id(own[name]))
            elif getattr(module, name, _ABSENT) is not None:
                raise ValueError(
                    f"{type(module).__name__}.no_weight_decay names {name!r}, which is no parameter of the module "
                    f"itself (its own parameters: {sorted(own)})"
                )
    return ids


def _category(name: str, param: nn.Parameter, norm_ids: set[int], embedding_ids: set[int], logit_ids: set[int]) -> str:
    if id(param) in embedding_ids:
        return "embedding"
    if id(param) in norm_ids:
        return "norm"
    if id(param) in logit_ids:
        return "logit"
    if name.endswith("bias") and param.dim() == 1:
        return "bias"
    return "core"


def param_groups(model: nn.Module, mode: str, weight_decay: float) -> list[dict]:
    """AdamW groups for `model`: dicts with "name", "params", "weight_decay" and "lr_scale".

    Args:
        model: the model; shared parameters appear once.
        mode: "simple" or "grouped".
        weight_decay: decay for the groups that take it.

    Returns:
        The non-empty groups; every parameter is in exactly one.
    """
    if mode not in OPTIMIZER_MODES:
        raise ValueError(f"optimizer mode must be one of {OPTIMIZER_MODES}, got {mode!r}")
    named = list(model.named_parameters())
    no_decay_ids = declared_no_decay(model)
    if mode == "simple":
        decayed = [p for _, p in named if p.dim() >= 2 and id(p) not in no_decay_ids]
        plain = [p for _, p in named if p.dim() < 2 or id(p) in no_decay_ids]
        groups = [("decay", decayed, weight_decay, 1.0), ("no_decay", plain, 0.0, 1.0)]
    else:
        norm_ids = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm)) for p in m.parameters()}
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        embed_proj = getattr(model, "embed_proj", None)
        if embed_proj is not None:
            embedding_ids.add(id(embed_proj.weight))
        by_category: dict[str, list] = {c: [] for c in GROUPED_RULES}
        for name, p in named:
            by_category[_category(name, p, norm_ids, embedding_ids, no_decay_ids)].append(p)
        groups = [
            (c, by_category[c], weight_decay if decays else 0.0, scale) for c, (scale, decays) in GROUPED_RULES.items()
        ]
    return [
        {"name": name, "params": params, "weight_decay": wd, "lr_scale": scale}
        for name, params, wd, scale in groups
        if params
    ]
