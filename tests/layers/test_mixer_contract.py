"""The layer contract, checked for every registered mixer on every one of its registered test configs.

A new mixer is covered by registering it (``register_mixer(..., test_configs=...)``): no name of a
mixer appears here. Everything runs in float64, where the parallel and the recurrent forms agree to
rounding.
"""

import pytest
import torch

from linmix.layers import MIXERS, build_mixer
from linmix.models import LM, LMConfig

WIDTH = 16
CONTEXT = 32
LENGTH = 23  # odd, shorter than CONTEXT (a dense Kbase or a KV cache holds CONTEXT positions)
BATCH = 2
TOLERANCE = dict(rtol=1e-10, atol=1e-10)

CASES = [(name, label) for name, entry in sorted(MIXERS.items()) for label in entry.test_configs]


def make_mixer(name: str, label: str, seed: int = 0):
    """The mixer `name` with its test config `label`, width WIDTH, in float64 and eval mode."""
    entry = MIXERS[name]
    sizes = {key: value for key, value in (("d_model", WIDTH), ("context_length", CONTEXT)) if key in entry.field_names}
    torch.manual_seed(seed)
    return build_mixer(name, **sizes, **entry.test_configs[label]).double().eval()


def random_input(length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, length, WIDTH, generator=generator, dtype=torch.float64)  # [B, T, d]


def structure(state):
    """The shape of a state without its values: nested dicts and lists, tensors as their rank."""
    if isinstance(state, torch.Tensor):
        return f"tensor of rank {state.dim()}"
    if isinstance(state, dict):
        return {key: structure(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [structure(value) for value in state]
    return type(state).__name__


parametrize_cases = pytest.mark.parametrize("name, label", CASES, ids=[f"{n}-{label}" for n, label in CASES])


@parametrize_cases
def test_forward_without_state_returns_none(name, label):
    layer = make_mixer(name, label)
    y, state = layer(random_input())
    assert y.shape == (BATCH, LENGTH, WIDTH) and y.dtype == torch.float64
    assert state is None


@parametrize_cases
def test_step_decoding_equals_forward(name, label):
    layer = make_mixer(name, label)
    x = random_input()
    expected, _ = layer(x)
    state = layer.init_state(BATCH, "cpu", torch.float64)
    outputs = []
    for t in range(LENGTH):
        y_t, state = layer.step(x[:, t], state)
        assert y_t.shape == (BATCH, WIDTH)
        outputs.append(y_t)
    torch.testing.assert_close(torch.stack(outputs, dim=1), expected, **TOLERANCE)


@parametrize_cases
def test_forward_in_pieces_with_the_carried_state_equals_the_whole(name, label):
    layer = make_mixer(name, label)
    x = random_input()
    expected, _ = layer(x)
    state = layer.init_state(BATCH, "cpu", torch.float64)
    pieces = []
    for start, end in ((0, 10), (10, 11), (11, LENGTH)):  # a piece of one position among longer ones
        y, state = layer(x[:, start:end], state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, **TOLERANCE)


@parametrize_cases
def test_state_after_forward_has_the_structure_of_init_state(name, label):
    layer = make_mixer(name, label)
    initial = layer.init_state(BATCH, "cpu", torch.float64)
    expected = structure(initial)
    _, state = layer(random_input(), initial)
    assert structure(state) == expected
    _, state = layer.step(random_input()[:, 0], state)
    assert structure(state) == expected


@parametrize_cases
def test_causality(name, label):
    layer = make_mixer(name, label)
    x = random_input()
    expected, _ = layer(x)
    for t in (0, 9, LENGTH - 2):
        changed = x.clone()
        changed[:, t + 1] += 1.0
        y, _ = layer(changed)
        torch.testing.assert_close(y[:, : t + 1], expected[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(y[:, t + 1], expected[:, t + 1])


@parametrize_cases
def test_compiled_forward_equals_eager(name, label):
    torch._dynamo.reset()  # a fresh cache: past the recompile limit fullgraph=True fails
    layer = make_mixer(name, label)
    x = random_input()

    def forward(x):
        return layer(x)[0]

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), forward(x), **TOLERANCE)


@parametrize_cases
def test_every_parameter_gets_a_gradient(name, label):
    layer = make_mixer(name, label).train()
    y, _ = layer(random_input())
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    (y * weights).sum().backward()
    for param_name, param in layer.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, f"{param_name}: {param.grad}"


@parametrize_cases
def test_wrong_input_width_is_rejected(name, label):
    layer = make_mixer(name, label)
    with pytest.raises(ValueError, match=str(WIDTH)):
        layer(torch.randn(BATCH, 5, WIDTH + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=str(WIDTH)):
        layer.step(torch.randn(BATCH, WIDTH + 1, dtype=torch.float64), layer.init_state(BATCH, "cpu", torch.float64))


@parametrize_cases
def test_lm_backbone_decodes_with_step_as_its_forward(name, label):
    torch.manual_seed(0)
    config = LMConfig(vocab_size=50, mixer=name, d_model=WIDTH, n_layers=2, context_length=24,
                      mixer_kwargs=MIXERS[name].test_configs[label])
    model = LM(config).double().eval()
    idx = torch.randint(50, (BATCH, 24), generator=torch.Generator().manual_seed(3))
    logits, loss = model(idx, idx)
    assert logits.shape == (BATCH, 24, 50) and loss.ndim == 0
    state = model.init_state(BATCH, "cpu", torch.float64)
    prefix, state = model.prefill(idx[:, :5], state)
    stepped = [prefix]
    for t in range(5, 24):
        out, state = model.step(idx[:, t], state)
        stepped.append(out[:, None])
    torch.testing.assert_close(torch.cat(stepped, dim=1), logits, **TOLERANCE)
