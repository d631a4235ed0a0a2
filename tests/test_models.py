"""Model behaviour: causality, decoding with `step` equals the parallel forward, bad inputs, the
K-Stack with any mixer, parameter groups, specs (also those of earlier versions) and the model-kind
registry. The mixers' own contract is checked in tests/layers/."""

import pytest
import torch

from linmix.models import (
    LM,
    MODEL_KINDS,
    KStackConfig,
    KStackLM,
    LMConfig,
    TransformerLM,
    build,
    build_from_spec,
    build_model,
    generate,
    model_spec,
    param_groups,
    register_model,
)
from linmix.layers import RMSNorm

SMALL_KSTACK = dict(d_model=24, rank=8, context_length=40, n_k2=2)
SMALL_GPT = dict(d_model=32, n_layers=2, context_length=40, mixer_kwargs={"n_heads": 4, "bias": False, "dropout": 0.2})

MODELS = {
    "kops-ts-v1": ("kops-ts-v1", SMALL_KSTACK),
    "kops-ts-v2": ("kops-ts-v2", SMALL_KSTACK),
    "kops-ts-v2-nokbase": ("kops-ts-v2-nokbase", SMALL_KSTACK),
    "kops-toeplitz": ("kops-ts-v2", {**SMALL_KSTACK, "kbase": "toeplitz", "kbase_taps": 5}),
    "kops-refine-2": ("kops-ts-v1", {**SMALL_KSTACK, "refine_steps_eval": 2}),
    "kops-adaptive": ("kops-wt2-v2", {**SMALL_KSTACK, "vocab_size": 300, "embed_dim": 12, "adaptive_cutoffs": (50, 150)}),
    "nanogpt-ts": ("nanogpt-ts", SMALL_GPT),
    "gka-ts": ("gka-ts", {"d_model": 16, "n_layers": 2, "context_length": 40}),
    "structured-ts-sq1": ("structured-ts-sq1", {"d_model": 16, "n_layers": 2, "context_length": 40}),
    "structured-offsets": ("structured-ts-pow2", {"d_model": 16, "n_layers": 2, "context_length": 40, "pattern": "pow2",
                                                  "coefficients": "normalized_gates", "signed": True}),
    "kstack-attention": ("kops-ts-v2", {"d_model": 24, "context_length": 40, "n_k2": 2, "kbase": "none",
                                        "mixer": "attention", "mixer_kwargs": {"n_heads": 2}}),
}
# What `model_spec` wrote for MODELS["kops-toeplitz"] before K2's fields moved into mixer_kwargs.
OLD_KSTACK_SPEC = {"kind": "kstack", "config": {
    "vocab_size": 65, "d_model": 24, "embed_dim": None, "n_k2": 2, "rank": 8, "context_length": 40, "kbase": "toeplitz",
    "kbase_taps": 5, "gamma_min": 0.15, "gamma_max": 0.995, "gamma_init": "v2", "alpha_cap": 0.95, "gate_init": 8.0,
    "gate_floor": 0.0, "refine_steps_train": 0, "refine_steps_eval": 0, "eta_init": 0.3, "head": "gelu", "head_mult": 1,
    "adaptive_cutoffs": [1024, 4096], "adaptive_div": 4.0, "dropout_emb": 0.08, "dropout_mlp": 0.1,
    "dropout_resid": 0.05, "dropout_head": 0.15, "decay_backend": "mask",
}}
# The "grouped" mode's logit parameters before modules declared them (`no_weight_decay`): by name.
OLD_LOGIT_NAMES = {"decay_logits", "alpha_logit", "gate_logit", "eta_logit"}


def small_model(key: str) -> torch.nn.Module:
    torch.manual_seed(0)
    preset, overrides = MODELS[key]
    return build(preset, **overrides).double().eval()


def random_tokens(model, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_causality(key):
    model = small_model(key)
    idx = random_tokens(model, 2, 33)
    logits, _ = model(idx)
    for t in (0, 11, 31):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % model.config.vocab_size
        other, _ = model(changed)
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(other[:, t + 1], logits[:, t + 1])


@pytest.mark.parametrize("key", sorted(MODELS))
def test_step_decoding_equals_forward(key):
    model = small_model(key)
    idx = random_tokens(model, 3, 37)
    expected, _ = model(idx)
    state = model.init_state(3, "cpu", torch.float64)
    prefix, state = model.prefill(idx[:, :6], state)
    pieces = [prefix]
    for t in range(6, 37):
        logits, state = model.step(idx[:, t], state)
        pieces.append(logits[:, None])
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("key", ["kops-refine-2", "nanogpt-ts"])
def test_step_decodes_through_the_blocks_step(key, monkeypatch):
    model = small_model(key)
    state = model.init_state(2, "cpu", torch.float64)
    _, state = model.prefill(random_tokens(model, 2, 4), state)
    calls = []
    for block in model.blocks:
        step = block.step
        monkeypatch.setattr(block, "step", lambda h, s, step=step: calls.append(h.shape) or step(h, s))
    monkeypatch.setattr(model, "prefill", None)  # a step must not go through prefill
    logits, _ = model.step(torch.zeros(2, dtype=torch.long), state)
    assert logits.shape == (2, model.config.vocab_size)
    applications = max(model.config.refine_steps_eval, 1) if key.startswith("kops") else 1
    assert calls == [(2, model.config.d_model)] * (len(model.blocks) * applications)


@pytest.mark.parametrize("key", ["kops-ts-v2", "nanogpt-ts"])
def test_step_rejects_tokens_that_are_not_one_per_sequence(key):
    model = small_model(key)
    state = model.init_state(1, "cpu", torch.float64)
    with pytest.raises(TypeError, match=r"\[B\] torch.long"):
        model.step(torch.zeros(1, 1, dtype=torch.long), state)
    with pytest.raises(ValueError, match=r"\[0, 65\)"):
        model.step(torch.full((1,), 65), state)


def test_stack_fills_its_fields_into_the_mixer_config():
    model = build("kops-ts-linear", d_model=24, n_k2=2, rank=8)
    for block in model.k2_blocks:
        config = block.mixer.config
        assert (config.d_model, config.context_length, config.kbase, config.kbase_taps) == (24, 256, "shared", 16)
        assert (config.rank, config.decay_backend) == (8, "auto")
        assert block.mixer.kernel is model.shared_kernel
    per_layer = build("kops-ts-v1", **SMALL_KSTACK)
    assert len({id(block.mixer.kernel) for block in per_layer.k2_blocks}) == 2
    assert {block.mixer.config.kbase for block in per_layer.k2_blocks} == {"per_layer"}


def test_kstack_with_another_mixer_reports_none_for_what_it_lacks():
    model = small_model("kstack-attention")
    assert [type(block.mixer).__name__ for block in model.k2_blocks] == ["CausalSelfAttention"] * 2
    model(random_tokens(model, 2, 10))
    diag = model.diagnostics()
    for key in ("gamma", "gate", "alpha", "kbase_share", "kbase_to_mix", "kbase_lag_profile"):
        assert diag[key] == [None, None], key
    assert diag["eta"] == pytest.approx(0.3) and diag["refine_delta"] is None


def test_kstack_mixer_configs_are_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match="mixer 'attention' has no Kbase"):
        KStackConfig(mixer="attention", mixer_kwargs={"n_heads": 2})
    with pytest.raises(ValueError, match=r"mixer_kwargs may not set \['d_model', 'kbase'\]"):
        KStackConfig(mixer_kwargs={"d_model": 8, "kbase": "none"})
    with pytest.raises(ValueError, match="rank must be >= 1"):
        KStackConfig(mixer_kwargs={"rank": 0})
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        KStackConfig(mixer="nope")
    with pytest.raises(ValueError, match=r"mixer_kwargs may not set \['context_length'\]"):
        LMConfig(vocab_size=10, mixer="attention", mixer_kwargs={"n_heads": 2, "context_length": 8})


def test_kbase_upper_triangle_gets_no_gradient():
    torch.manual_seed(0)
    model = build("kops-ts-v1", **SMALL_KSTACK)
    idx = random_tokens(model, 2, 40)
    _, loss = model(idx, idx)
    loss.backward()
    for block in model.k2_blocks:
        grad = block.mixer.kernel.weight.grad
        assert torch.count_nonzero(torch.triu(grad, diagonal=1)) == 0
        assert torch.count_nonzero(torch.tril(grad)) > 0


def test_shared_kernel_is_one_parameter():
    model = build("kops-ts-v2")
    kernels = {id(block.mixer.kernel.weight) for block in model.k2_blocks}
    assert kernels == {id(model.shared_kernel.weight)}


def test_initial_gamma_conventions():
    v1 = build("kops-ts-v1").k2_blocks[0].mixer.gamma()
    v2 = build("kops-ts-v2").k2_blocks[0].mixer.gamma()
    assert 0.9924 < v1.min() < v1.max() < 0.99926  # paper-1 code quirk: sigmoid(theta) in [0.95, 0.995]
    torch.testing.assert_close(v2, torch.linspace(0.95, 0.995 - 1e-4, 32), rtol=0, atol=1e-6)  # spec 3.5.3


def test_refinement_uses_the_learned_step():
    model = build("kops-ts-v1", **SMALL_KSTACK).eval()
    assert abs(model.eta().item() - 0.3) < 1e-6
    idx = random_tokens(model, 1, 10)
    with torch.no_grad():
        h0 = model.embed_tokens(idx)
        expected = h0 + model.eta() * (model.stack(h0)[0] - h0)
        torch.testing.assert_close(model.hidden(h0)[0], expected)


def test_param_groups_cover_every_parameter_once():
    model = build("kops-wt2-v2", **{**SMALL_KSTACK, "vocab_size": 300, "embed_dim": 12, "adaptive_cutoffs": (50, 150)})
    for mode in ("simple", "grouped"):
        groups = param_groups(model, mode, 0.02)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())
    grouped = {g["name"]: g for g in param_groups(model, "grouped", 0.02)}
    assert grouped["logit"]["lr_scale"] == 0.5 and grouped["logit"]["weight_decay"] == 0.0
    assert id(model.embed_proj.weight) in {id(p) for p in grouped["embedding"]["params"]}
    assert id(model.k0.gain) in {id(p) for p in grouped["core"]["params"]}  # the papers' quirk
    with pytest.raises(ValueError, match="optimizer mode"):
        param_groups(model, "fancy", 0.1)


def _old_rule_groups(model, mode: str) -> dict[str, set[int]]:
    """The groups' parameter ids as the name-based rule (OLD_LOGIT_NAMES) made them."""
    norms = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, torch.nn.LayerNorm)) for p in m.parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    if getattr(model, "embed_proj", None) is not None:
        embeddings.add(id(model.embed_proj.weight))
    groups: dict[str, set[int]] = {}
    for name, p in model.named_parameters():
        if mode == "simple":
            group = "decay" if p.dim() >= 2 else "no_decay"
        elif id(p) in embeddings:
            group = "embedding"
        elif id(p) in norms:
            group = "norm"
        elif name.rsplit(".", 1)[-1] in OLD_LOGIT_NAMES:
            group = "logit"
        elif name.endswith("bias") and p.dim() == 1:
            group = "bias"
        else:
            group = "core"
        groups.setdefault(group, set()).add(id(p))
    return groups


@pytest.mark.parametrize("preset", ["kops-ts-v1", "kops-wt2-v2", "kops-ts-v2-nokbase", "nanogpt-ts"])
def test_declared_no_decay_parameters_give_the_groups_of_the_name_rule(preset):
    model = build(preset)
    for mode in ("simple", "grouped"):
        groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, mode, 0.02)}
        assert groups == _old_rule_groups(model, mode), mode


def test_a_declared_name_that_is_no_own_parameter_is_refused():
    model = small_model("kops-ts-v2")
    model.k0.no_weight_decay = ("norm",)  # a submodule, not a parameter of K0 itself
    with pytest.raises(ValueError, match=r"K0.no_weight_decay names 'norm'"):
        param_groups(model, "grouped", 0.02)


def test_spec_round_trip():
    model = small_model("kops-toeplitz")
    rebuilt = build_from_spec(model_spec(model)).double().eval()
    rebuilt.load_state_dict(model.state_dict())
    idx = random_tokens(model, 1, 12)
    torch.testing.assert_close(rebuilt(idx)[0], model(idx)[0])


def test_spec_of_the_previous_version_loads():
    """A checkpoint's spec written with K2's fields at the K-Stack level: they move into mixer_kwargs."""
    model = small_model("kops-toeplitz")
    rebuilt = build_from_spec(OLD_KSTACK_SPEC)
    assert rebuilt.config.mixer == "k2" and rebuilt.config.mixer_kwargs == {
        "rank": 8, "gamma_min": 0.15, "gamma_max": 0.995, "gamma_init": "v2", "alpha_cap": 0.95, "gate_init": 8.0,
        "gate_floor": 0.0, "decay_backend": "mask"}
    assert rebuilt.config.mixer_config() == model.config.mixer_config()
    stack_fields = [{**model_spec(m)["config"], "mixer_kwargs": None} for m in (rebuilt, model)]
    assert stack_fields[0] == stack_fields[1]
    rebuilt.double().eval().load_state_dict(model.state_dict())
    idx = random_tokens(model, 1, 12)
    torch.testing.assert_close(rebuilt(idx)[0], model(idx)[0])


def test_model_kinds_are_one_registry():
    assert {kind: entry.model_cls for kind, entry in MODEL_KINDS.items()} == {
        "kstack": KStackLM, "transformer": TransformerLM, "lm": LM}
    assert [model_spec(small_model(key))["kind"] for key in ("kops-ts-v2", "nanogpt-ts")] == ["kstack", "transformer"]
    lm = LM(LMConfig(vocab_size=20, mixer="k2", d_model=16, n_layers=1, mixer_kwargs={"rank": 4}))
    assert type(build_from_spec(model_spec(lm))) is LM
    with pytest.raises(ValueError, match="model kind 'lm' is already registered"):
        register_model("lm", LMConfig)(type("OtherLM", (LM,), {}))
    with pytest.raises(ValueError, match="LM is already registered"):
        register_model("lm2", LMConfig)(LM)
    with pytest.raises(ValueError, match=r"model kind must be one of \['kstack', 'lm', 'transformer'\], got 'rnn'"):
        build_from_spec({"kind": "rnn", "config": {}})
    with pytest.raises(TypeError, match="takes a KStackConfig"):
        build_model("kstack", lm.config)
    assert set(MODEL_KINDS) == {"kstack", "transformer", "lm"}


def test_generate_past_the_window_and_greedy_is_deterministic():
    model = small_model("kops-ts-v2")
    prompt = random_tokens(model, 2, 5)
    out = generate(model, prompt, 60, temperature=0.0)
    assert out.shape == (2, 65)
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, generate(model, prompt, 60, temperature=0.0))


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(2, 5), TypeError, "torch.long"),
    (torch.zeros(5, dtype=torch.long), TypeError, r"\[B, T\]"),
    (torch.full((1, 5), 65), ValueError, r"\[0, 65\)"),
    (torch.zeros(1, 41, dtype=torch.long), ValueError, "window 40"),
])
def test_bad_tokens_are_rejected(bad, error, match):
    model = small_model("kops-ts-v2")
    with pytest.raises(error, match=match):
        model(bad)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="gamma_min"):
        build("kops-ts-v2", gamma_min=0.9, gamma_max=0.5)
    with pytest.raises(ValueError, match="kbase"):
        build("kops-ts-v2", kbase="diagonal")
    with pytest.raises(ValueError, match="unknown mixer"):
        LMConfig(vocab_size=10, mixer="nope")
    with pytest.raises(ValueError, match="n_heads"):
        build("nanogpt-ts", mixer_kwargs={"n_heads": 5})


def test_diagnostics_report_learned_dynamics_and_eval_shares():
    model = small_model("kops-refine-2")
    idx = random_tokens(model, 2, 30)
    empty = model.diagnostics()
    assert empty["kbase_share"] == [None, None] and empty["refine_delta"] is None
    model(idx)
    diag = model.diagnostics()
    assert len(diag["gamma"]) == 2 and len(diag["gamma"][0]) == 8
    assert all(0.85 < g < 1.0 for layer in diag["gamma"] for g in layer)
    assert abs(diag["eta"] - 0.3) < 1e-6
    assert all(0.0 < s < 1.0 for s in diag["kbase_share"])
    assert len(diag["refine_delta"]) == 2 and all(d > 0 for d in diag["refine_delta"])
    assert diag["kbase_lag_profile"][0][0] > diag["kbase_lag_profile"][0][5]  # the exponential init
    assert model.diagnostics()["kbase_share"] == [None, None]  # read and reset
    model.train()
    model(idx)
    assert model.diagnostics()["kbase_share"] == [None, None]  # training forwards are not measured


def test_kbase_share_is_the_norm_ratio_of_the_two_paths():
    model = small_model("kops-ts-v2")
    idx = random_tokens(model, 2, 30)
    with torch.no_grad():
        h, _ = model.k1_in(model.embed_tokens(idx))
        block = model.k2_blocks[0]
        base, decay, _ = block.mixer.paths(block.mixer_norm(h))
        model.diagnostics()
        model(idx)
    expected = base.norm() / (base.norm() + decay.norm())
    assert model.diagnostics()["kbase_share"][0] == pytest.approx(expected.item(), rel=1e-6)  # float32 sums


class _LargestSquareTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest pair of dimensions >= `length` seen in any op's output."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length
        self.square_outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and sum(size >= self.length for size in t.shape) >= 2:
                self.square_outputs.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("preset, quadratic", [("kops-ts-linear", False), ("kops-ts-v2", True)])
def test_linear_preset_never_builds_a_t_by_t_tensor(preset, quadratic):
    length = 333  # longer than every width of the model, so only a T x T tensor has two such dims
    model = build(preset, context_length=length, decay_backend="chunk" if not quadratic else "mask")
    idx = random_tokens(model, 2, length)
    recorder = _LargestSquareTensor(length)
    with recorder:
        _, loss = model(idx, idx)
        loss.backward()
    assert bool(recorder.square_outputs) == quadratic, recorder.square_outputs[:3]


def test_linear_preset_decodes_with_constant_memory():
    torch.manual_seed(0)
    model = build("kops-ts-linear", d_model=24, rank=8, n_k2=2).double().eval()
    assert model.window == float("inf")
    state = model.init_state(1, "cpu", torch.float64)
    token = torch.zeros(1, dtype=torch.long)

    def state_numel(s):
        return sum(t.numel() for app in s for layer in app if layer for t in layer.values() if isinstance(t, torch.Tensor))

    sizes = []
    for step in range(600):  # past the training context of 256
        logits, state = model.step(token, state)
        token = logits.argmax(dim=-1)
        if step in (10, 599):
            sizes.append(state_numel(state))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("key", ["kops-toeplitz", "nanogpt-ts"])
def test_forward_compiles_without_graph_break(key):
    """``torch.compile(fullgraph=True)`` of a whole training loss (the token checks stay out of the graph)."""
    model = small_model(key)
    idx, targets = random_tokens(model, 2, 33), random_tokens(model, 2, 33, seed=2)

    def loss(idx, targets):
        return model(idx, targets)[1]

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(idx, targets), loss(idx, targets))
