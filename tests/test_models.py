"""Model behaviour: causality, decoding with `step` equals the parallel forward, bad inputs."""

import pytest
import torch

from linmix.layers import build_mixer
from linmix.models import LM, LMConfig, build, build_from_spec, generate, model_spec, param_groups

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
}


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


@pytest.mark.parametrize("mixer, kwargs", [
    ("k2", {"rank": 6, "kbase": "per_layer"}),
    ("k2", {"rank": 6, "kbase": "toeplitz", "kbase_taps": 4}),
    ("k2", {"rank": 6, "kbase": "none", "decay_backend": "chunk"}),
    ("attention", {"n_heads": 2}),
])
def test_mixer_contract_step_equals_forward(mixer, kwargs):
    torch.manual_seed(0)
    layer = build_mixer(mixer, d_model=16, context_length=30, **kwargs).double().eval()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    expected, none_state = layer(x)
    assert none_state is None
    state = layer.init_state(2, "cpu", torch.float64)
    outputs = []
    for t in range(23):
        y, state = layer.step(x[:, t], state)
        outputs.append(y)
    torch.testing.assert_close(torch.stack(outputs, dim=1), expected, rtol=1e-10, atol=1e-10)
    chunked_state = layer.init_state(2, "cpu", torch.float64)
    first, chunked_state = layer(x[:, :10], chunked_state)
    second, _ = layer(x[:, 10:], chunked_state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer, kwargs", [("k2", {"rank": 4}), ("attention", {"n_heads": 2})])
def test_generic_backbone_takes_any_registered_mixer(mixer, kwargs):
    torch.manual_seed(0)
    model = LM(LMConfig(vocab_size=50, mixer=mixer, d_model=16, n_layers=2, context_length=24, mixer_kwargs=kwargs))
    model = model.double().eval()
    idx = random_tokens(model, 2, 24)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 24, 50) and loss.ndim == 0
    state = model.init_state(2, "cpu", torch.float64)
    stepped = []
    for t in range(24):
        out, state = model.step(idx[:, t], state)
        stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped, dim=1), logits, rtol=1e-10, atol=1e-10)


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


def test_spec_round_trip():
    model = small_model("kops-toeplitz")
    rebuilt = build_from_spec(model_spec(model)).double().eval()
    rebuilt.load_state_dict(model.state_dict())
    idx = random_tokens(model, 1, 12)
    torch.testing.assert_close(rebuilt(idx)[0], model(idx)[0])


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
