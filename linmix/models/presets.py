"""Named, complete, versioned configurations: the model and its training recipe.

The paper presets follow spec/k_operators.md sections 4.2, 4.3 and 4.5; their parameter counts
match the spec to the digit (tests/test_presets.py).
"""

from dataclasses import dataclass, field, replace

from torch import nn

from linmix.models.registry import apply_overrides, build_model, model_kind

# Training recipes (keys of linmix.train.TrainConfig).
KOPS_TS_TRAIN = dict(
    lr=1e-2, lr_floor=3.5e-4, warmup_steps=2000, max_steps=3500, batch_size=64, weight_decay=0.02,
    betas=(0.8, 0.999), optimizer_mode="simple", eval_interval=250,
)
# The linear-time presets' step is many small kernels: compiled, they replay as CUDA graphs.
KOPS_LINEAR_TRAIN = dict(KOPS_TS_TRAIN, compile_mode="reduce-overhead")
# eval_budget: the recipe's evaluations (101 of them, each 200 x 64 random windows) read 1.7 times the
# windows it trains on; 2 keeps them whole while a few-step run still evaluates little.
KOPS_WT2_TRAIN = dict(
    lr=1e-2, lr_floor=1e-4, warmup_steps=3000, max_steps=25000, batch_size=32, weight_decay=0.02,
    betas=(0.8, 0.999), optimizer_mode="grouped", eval_interval=250, eval_budget=2.0,
)
NANOGPT_TS_TRAIN = dict(
    lr=1e-3, lr_floor=1e-4, warmup_steps=100, max_steps=5000, batch_size=64, weight_decay=0.1,
    betas=(0.9, 0.99), optimizer_mode="simple", eval_interval=250,
)

# The delta-rule presets train the generic pre-norm LM, so they take nanoGPT's AdamW recipe (betas
# (0.9, 0.99), weight decay 0.1, short warmup, cosine to a tenth), not the K-Stack's lr 1e-2 with 2000
# warmup steps; lr 2e-3 suits delta-rule models of this size (1e-3 to 3e-3), and 3500 steps of 64 x 256
# tokens are kops-ts-v2's budget, the parameter-matched baseline.
DELTA_TS_TRAIN = dict(NANOGPT_TS_TRAIN, lr=2e-3, lr_floor=2e-4, max_steps=3500)


@dataclass(frozen=True)
class Preset:
    """A named model config plus its training recipe and corpus."""

    name: str
    description: str
    model_kind: str
    model: dict
    train: dict = field(default_factory=dict)
    corpus: str = "tinyshakespeare-char"

    def model_config(self, **overrides):
        """The model config dataclass with `overrides` applied.

        Args:
            overrides: model-config fields, mixer fields as "mixer_kwargs.FIELD" or bare where no
                model field has the name (see `linmix.models.registry.apply_overrides`).

        Returns:
            The config of the preset's model kind; unknown fields or bad values raise ValueError.
        """
        config_cls = model_kind(self.model_kind).config_cls
        return config_cls(**apply_overrides(self.model_kind, self.model, overrides))

    def build_model(self, **overrides) -> nn.Module:
        """The preset's model with `overrides` applied (see `model_config`)."""
        return build_model(self.model_kind, self.model_config(**overrides))


# The K2 mixer of paper 2 (spec/k_operators.md 4.3).
_K2_V2 = dict(rank=32, gamma_min=0.15, gamma_max=0.995, gamma_init="v2", alpha_cap=0.95, decay_backend="mask")
_KOPS_TS_V2 = dict(
    vocab_size=65, d_model=128, n_k2=6, context_length=256, kbase="shared", mixer="k2", mixer_kwargs=_K2_V2,
    refine_steps_train=0, refine_steps_eval=0, head="gelu", head_mult=1,
    dropout_emb=0.08, dropout_mlp=0.10, dropout_resid=0.05, dropout_head=0.15,
)
_KOPS_TS_LINEAR = {
    **_KOPS_TS_V2, "kbase": "toeplitz", "kbase_taps": 16, "mixer_kwargs": {**_K2_V2, "decay_backend": "auto"},
}

# The delta-rule mixers and Gated KalmaNet in the generic LM at about kops-ts-v2's size (810,189
# parameters): 4 blocks of width 128, 2 heads of width 64. DeltaNet and (P)GDN have no output gate, as in
# the paper's configs (spec/preconditioned_delta.md section 4); (P)KDA keep fla's low-rank sigmoid gate,
# rank 16 = d / 8 as fla's 128 at width 1024. GKA (ridge 0.02, 30 Chebyshev steps, forgetting, alpha and
# beta gates on: spec/gated_kalmanet.md sections 4 and 5) drops its output gate too, which makes it
# gdn-ts's shapes plus the alpha gate and the gate biases (its gate, d x HK per block, would add 8%).
_DELTA_TS = dict(
    vocab_size=65, d_model=128, n_layers=4, context_length=256, mlp_ratio=4, norm="rmsnorm", bias=True, dropout=0.1,
    position_embedding=False, tie_embeddings=True,
)
_DELTA_TS_MIXERS = {
    "deltanet": ("DeltaNet", {"n_heads": 2, "use_gate": False}),
    "pdeltanet": ("Preconditioned DeltaNet (PDN: PGDN with g = 0, our reading)", {"n_heads": 2, "use_gate": False}),
    "gdn": ("Gated DeltaNet", {"n_heads": 2, "use_gate": False}),
    "pgdn": ("Preconditioned Gated DeltaNet", {"n_heads": 2, "use_gate": False}),
    "kda": ("Kimi Delta Attention", {"n_heads": 2, "low_rank": 16}),
    "pkda": ("Preconditioned KDA", {"n_heads": 2, "low_rank": 16}),
    "gka": ("Gated KalmaNet", {"n_heads": 2, "use_gate": False}),
}

# The structured mixer (spec/structured_mixing.md §5.3: slot softmax, direct readout) in the same backbone:
# 2 heads of 64, short convolutions on q, k and v as every other *-ts preset, and the cache-efficient
# lattice patterns (§3.4) with their levels from the context length (256): 2^j for j < 8 (decoding
# keeps 8 slots) and j^2 + 1 for j < 16 (16 slots).
_STRUCTURED_TS_PATTERNS = {
    "pow2": "the 2^j lattice (8 levels)",
    "sq1": "the j^2 + 1 lattice (16 levels)",
}

_PRESET_LIST = [
    Preset(
        "kops-ts-v1",
        "K-Operators paper 1, Tiny Shakespeare char: per-layer dense Kbase, gamma in (0.85, 1.0), 1 refinement step",
        "kstack",
        {**_KOPS_TS_V2, "kbase": "per_layer", "refine_steps_train": 1, "refine_steps_eval": 1,
         "mixer_kwargs": {**_K2_V2, "gamma_min": 0.85, "gamma_max": 1.0, "gamma_init": "v1", "alpha_cap": 0.8}},
        KOPS_TS_TRAIN,
    ),
    Preset(
        "kops-ts-v2",
        "K-Operators paper 2, Tiny Shakespeare char: shared dense Kbase, gamma in [0.15, 0.995], no refinement",
        "kstack",
        _KOPS_TS_V2,
        KOPS_TS_TRAIN,
    ),
    Preset(
        "kops-ts-v2-nokbase",
        "kops-ts-v2 with the Kbase path and its gates removed (decay path only)",
        "kstack",
        {**_KOPS_TS_V2, "kbase": "none"},
        KOPS_TS_TRAIN,
    ),
    Preset(
        "kops-ts-linear",
        "Linear-time kops-ts-v2: 16-tap Toeplitz Kbase shared across layers, chunked decay path",
        "kstack",
        _KOPS_TS_LINEAR,
        KOPS_LINEAR_TRAIN,
    ),
    Preset(
        "kops-ts-linear-long",
        "kops-ts-linear trained at context 1024 (16 x 1024 tokens per step, as kops-ts-v2's 64 x 256)",
        "kstack",
        {**_KOPS_TS_LINEAR, "context_length": 1024},
        # 16 windows per step against 64 per evaluation batch: its evaluations read 3.5 times the
        # windows it trains on, which an eval_budget of 4 keeps whole.
        {**KOPS_LINEAR_TRAIN, "batch_size": 16, "eval_budget": 4.0},
    ),
    Preset(
        "kops-wt2-v2",
        "K-Operators paper 2, WikiText-2 SentencePiece-8192: e64/d256/W512, shared Kbase, adaptive softmax",
        "kstack",
        {**_KOPS_TS_V2, "vocab_size": 8192, "embed_dim": 64, "d_model": 256, "context_length": 512,
         "head": "adaptive", "adaptive_cutoffs": (1024, 4096), "adaptive_div": 4.0,
         "dropout_emb": 0.16, "dropout_mlp": 0.2, "dropout_resid": 0.1, "dropout_head": 0.3},
        KOPS_WT2_TRAIN,
        corpus="wikitext2-sp8192",
    ),
    Preset(
        "nanogpt-ts",
        "nanoGPT shakespeare_char baseline: 6 layers, 6 heads, 384 wide, block 256, no biases, tied",
        "transformer",
        dict(vocab_size=65, mixer="attention", d_model=384, n_layers=6, context_length=256,
             mixer_kwargs={"n_heads": 6, "bias": False, "dropout": 0.2}, mlp_ratio=4, norm="layernorm",
             bias=False, dropout=0.2, position_embedding=True, tie_embeddings=True),
        NANOGPT_TS_TRAIN,
    ),
    *(
        Preset(
            f"{mixer}-ts",
            f"{title}, Tiny Shakespeare char: 4 blocks of width 128, 2 heads of 64, about kops-ts-v2's size",
            "lm",
            {**_DELTA_TS, "mixer": mixer, "mixer_kwargs": mixer_kwargs},
            DELTA_TS_TRAIN,
        )
        for mixer, (title, mixer_kwargs) in _DELTA_TS_MIXERS.items()
    ),
    *(
        Preset(
            f"structured-ts-{pattern}",
            f"Structured GLR over {levels}, slot softmax, Tiny Shakespeare char: "
            "4 blocks of width 128, 2 heads of 64, about kops-ts-v2's size",
            "lm",
            {**_DELTA_TS, "mixer": "structured",
             "mixer_kwargs": {"n_heads": 2, "pattern": f"{pattern}_lattice", "use_short_conv": True}},
            DELTA_TS_TRAIN,
        )
        for pattern, levels in _STRUCTURED_TS_PATTERNS.items()
    ),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    """The preset called `name`; unknown names raise KeyError listing the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def with_overrides(preset: Preset, **model_overrides) -> Preset:
    """A copy of `preset` whose model config has `model_overrides` applied.

    Args:
        preset: the preset.
        model_overrides: routed as in `Preset.model_config` (a mixer field lands in mixer_kwargs,
            merged with the preset's).

    Returns:
        The new preset; its model config is built once, so bad overrides raise ValueError here.
    """
    preset.model_config(**model_overrides)
    return replace(preset, model=apply_overrides(preset.model_kind, preset.model, model_overrides))
