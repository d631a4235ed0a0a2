"""AdamW parameter groups of the papers' two optimizer modes.

* ``simple``: weight decay on every parameter with ndim >= 2 (embeddings, linear weights, U, V,
  Kbase), none on vectors and scalars; one learning rate (also nanoGPT's rule).
* ``grouped`` (K-Operators WikiText-2): core lr x1 with decay; biases, norm scales and the scalar
  logits (theta, a, beta, eta) lr x0.5 without decay; embedding and its projection lr x0.75 without
  decay. As in the papers' code, K0's gain vector falls into "core" and is decayed.
"""

from torch import nn

from linmix.layers.norms import RMSNorm

LOGIT_NAMES = frozenset({"decay_logits", "alpha_logit", "gate_logit", "eta_logit"})
GROUPED_RULES = {  # category -> (lr_scale, weight decay applies)
    "core": (1.0, True),
    "bias": (0.5, False),
    "norm": (0.5, False),
    "embedding": (0.75, False),
    "logit": (0.5, False),
}
OPTIMIZER_MODES = ("simple", "grouped")


def _category(name: str, param: nn.Parameter, norm_ids: set[int], embedding_ids: set[int]) -> str:
    if id(param) in embedding_ids:
        return "embedding"
    if id(param) in norm_ids:
        return "norm"
    if name.rsplit(".", 1)[-1] in LOGIT_NAMES:
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
    """
    if mode not in OPTIMIZER_MODES:
        raise ValueError(f"optimizer mode must be one of {OPTIMIZER_MODES}, got {mode!r}")
    named = list(model.named_parameters())
    if mode == "simple":
        decayed = [p for _, p in named if p.dim() >= 2]
        plain = [p for _, p in named if p.dim() < 2]
        groups = [("decay", decayed, weight_decay, 1.0), ("no_decay", plain, 0.0, 1.0)]
    else:
        norm_ids = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm)) for p in m.parameters()}
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        embed_proj = getattr(model, "embed_proj", None)
        if embed_proj is not None:
            embedding_ids.add(id(embed_proj.weight))
        by_category: dict[str, list] = {c: [] for c in GROUPED_RULES}
        for name, p in named:
            by_category[_category(name, p, norm_ids, embedding_ids)].append(p)
        groups = [
            (c, by_category[c], weight_decay if decays else 0.0, scale) for c, (scale, decays) in GROUPED_RULES.items()
        ]
    return [
        {"name": name, "params": params, "weight_decay": wd, "lr_scale": scale}
        for name, params, wd, scale in groups
        if params
    ]
