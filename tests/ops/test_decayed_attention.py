"""decayed_attention: every backend against the token loop, forward and backward."""

import functools
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_close, assert_close, outputs_and_grads

from linmix.ops import decayed_attention, decayed_attention_step

B, H, K, V = 2, 2, 8, 5
SCALE = 0.5
LENGTHS = [1, 7, 63, 64, 65, 333]
REGIMES = ["const_small", "const_near_one", "const_mixed", "token_small", "token_logsigmoid", "token_mixed"]
FAST_BACKENDS = ["mask", "chunk"]
F64 = dict(ratio=1e-9, atol=1e-12)


def _log_gamma(regime: str, T: int, gen: torch.Generator) -> torch.Tensor:
    """Log decays of one regime: ``[H, K]`` for ``const_*``, ``[B, T, H, K]`` for ``token_*``."""
    shape = (H, K) if regime.startswith("const") else (B, T, H, K)
    uniform = torch.rand(shape, generator=gen, dtype=torch.float64)
    kind = regime.split("_", 1)[1]
    if kind == "small":  # gamma in [0.01, 0.05]: log around -4.6 .. -3.0
        return torch.log(0.01 + 0.04 * uniform)
    if kind == "near_one":  # gamma in [0.999, 0.9999]
        return torch.log(0.999 + 0.0009 * uniform)
    if kind == "logsigmoid":
        return F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64))
    extremes = torch.tensor([-30.0, math.log(0.01), math.log(0.5), math.log(0.9999), 0.0], dtype=torch.float64)
    return extremes[torch.randint(len(extremes), shape, generator=gen)]


def _make_inputs(T: int, log_gamma: torch.Tensor, with_h0: bool, seed: int, K: int = K, V: int = V, H: int = H):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    inputs = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V), "log_gamma": log_gamma}
    if with_h0:
        inputs["initial_state"] = randn(B, H, K, V)
    cotangents = {"o": randn(B, T, H, V), "final_state": randn(B, H, K, V)}
    return inputs, cotangents


def run(backend: str, inputs: dict, cotangents: dict, dtype=torch.float64, scale: float = SCALE) -> dict:
    """Forward and backward of ``decayed_attention``: outputs and the gradient of every input."""
    leaves = {name: x.detach().to(dtype).requires_grad_() for name, x in inputs.items()}
    o, final_state = decayed_attention(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        leaves["log_gamma"],
        scale=scale,
        initial_state=leaves.get("initial_state"),
        output_final_state=True,
        backend=backend,
    )
    return outputs_and_grads(leaves, o, final_state, cotangents)


@functools.cache
def case(regime: str, T: int, with_h0: bool):
    """Inputs, cotangents and the float64 naive result for one test case (shared by backends)."""
    seed = 1000 * T + 10 * REGIMES.index(regime) + with_h0
    log_gamma = _log_gamma(regime, T, torch.Generator().manual_seed(seed + 7))
    inputs, cotangents = _make_inputs(T, log_gamma, with_h0, seed)
    return inputs, cotangents, run("naive", inputs, cotangents)


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("T", LENGTHS, ids=[f"T{T}" for T in LENGTHS])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_matches_naive_float64(backend, T, regime, with_h0):
    inputs, cotangents, ref = case(regime, T, with_h0)
    assert_all_close(ref, run(backend, inputs, cotangents), **F64)


@pytest.mark.parametrize("regime", ["const_small", "const_mixed", "token_logsigmoid", "token_mixed"])
@pytest.mark.parametrize("T", [65, 333], ids=["T65", "T333"])
@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_float32_matches_float64(backend, T, regime):
    inputs, cotangents, ref = case(regime, T, True)
    out = run(backend, inputs, cotangents, dtype=torch.float32)
    assert out["o"].dtype == torch.float32 and out["final_state"].dtype == torch.float32
    assert_all_close(ref, out, ratio=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bfloat16_smoke(backend):
    inputs, cotangents, ref = case("token_logsigmoid", 65, True)
    out = run(backend, inputs, cotangents, dtype=torch.bfloat16)
    assert out["o"].dtype == torch.bfloat16
    assert out["final_state"].dtype == torch.float32
    assert all(out[f"d{name}"].dtype == torch.bfloat16 for name in inputs)
    assert_all_close(ref, out, ratio=1e-2)


@pytest.mark.parametrize(
    "log_gamma",
    [torch.full((H, K), math.log(0.01)), torch.full((B, 333, H, K), -30.0)],
    ids=["const_gamma_0.01", "token_log_-30"],
)
def test_chunk_strong_decay_stays_finite(log_gamma):
    inputs, cotangents = _make_inputs(333, log_gamma.double(), with_h0=True, seed=5)
    out = run("chunk", inputs, cotangents, dtype=torch.float32)
    for name, x in out.items():
        assert torch.isfinite(x).all(), f"{name} is not finite"
    assert_all_close(run("naive", inputs, cotangents), out, ratio=1e-5)


@functools.cache
def k2_case():
    """The K-Operators decay path: one head, K = r = 32, odd V = d, constant decay, scale 1."""
    T, r, d = 100, 32, 129
    log_gamma = torch.log(torch.linspace(0.15, 0.995, r, dtype=torch.float64))[None]  # [1, r]
    inputs, cotangents = _make_inputs(T, log_gamma, with_h0=False, seed=3, K=r, V=d, H=1)
    inputs["q"] = F.normalize(inputs["q"], dim=-1)
    inputs["k"] = F.normalize(inputs["k"], dim=-1)
    return inputs, cotangents, run("naive", inputs, cotangents, scale=1.0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_k2_decay_path_shape(backend):
    inputs, cotangents, ref = k2_case()
    assert_all_close(ref, run(backend, inputs, cotangents, scale=1.0), **F64)


@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_constant_decay_gradient_sums_per_token_gradient(backend):
    inputs, cotangents, _ = case("const_mixed", 65, True)
    const = run(backend, inputs, cotangents)
    per_token_inputs = dict(inputs, log_gamma=inputs["log_gamma"].expand(B, 65, H, K))
    per_token = run(backend, per_token_inputs, cotangents)
    assert_close("o", per_token["o"], const["o"], **F64)
    assert_close("dlog_gamma", per_token["dlog_gamma"].sum(dim=(0, 1)), const["dlog_gamma"], **F64)


@pytest.mark.parametrize("split", [64, 40], ids=["split_at_chunk_edge", "split_mid_chunk"])
@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_final_state_chains_across_calls(backend, split):
    inputs, _, _ = case("token_logsigmoid", 130, True)
    q, k, v, g, h0 = (inputs[n] for n in ("q", "k", "v", "log_gamma", "initial_state"))
    kwargs = dict(scale=SCALE, output_final_state=True, backend=backend)
    o_full, s_full = decayed_attention(q, k, v, g, initial_state=h0, **kwargs)
    halves = [slice(None, split), slice(split, None)]
    o1, s1 = decayed_attention(*(x[:, halves[0]] for x in (q, k, v, g)), initial_state=h0, **kwargs)
    o2, s2 = decayed_attention(*(x[:, halves[1]] for x in (q, k, v, g)), initial_state=s1, **kwargs)
    assert_close("o", o_full, torch.cat([o1, o2], dim=1), **F64)
    assert_close("final_state", s_full, s2, **F64)


@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_causal(backend):
    inputs, _, _ = case("token_logsigmoid", 130, True)
    t = 70
    perturbed = {name: x.clone() for name, x in inputs.items()}
    for name in ("q", "k", "v"):
        perturbed[name][:, t + 1] += 1.0
    perturbed["log_gamma"][:, t + 1] -= 1.0

    def outputs(args):
        return decayed_attention(
            args["q"], args["k"], args["v"], args["log_gamma"], initial_state=args["initial_state"], backend=backend
        )[0]

    before, after = outputs(inputs), outputs(perturbed)
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1], after[:, t + 1])


@pytest.mark.parametrize("per_token", [False, True], ids=["const", "token"])
@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_matches_explicit_sum(backend, per_token):
    """The closed form, written as loops over plain products of the decays gamma = exp(log_gamma):

    o[t] = scale * sum_k q[t, k] (prod_{r <= t} gamma[r, k] S0[k]
                                  + sum_{s <= t} prod_{s < r <= t} gamma[r, k] k[s, k] v[s])
    """
    T, Kd, Vd = 6, 3, 2
    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 1, T, 1, Kd, generator=gen, dtype=torch.float64)
    v = torch.randn(1, T, 1, Vd, generator=gen, dtype=torch.float64)
    h0 = torch.randn(1, 1, Kd, Vd, generator=gen, dtype=torch.float64)
    gamma = 0.1 + 0.8 * torch.rand((1, T, 1, Kd) if per_token else (1, Kd), generator=gen, dtype=torch.float64)
    gamma_at = (lambda r: gamma[0, r, 0]) if per_token else (lambda r: gamma[0])  # [K] decay applied at r

    expected = torch.zeros(1, T, 1, Vd, dtype=torch.float64)
    for t in range(T):
        for j in range(Kd):
            from_start = math.prod(gamma_at(r)[j].item() for r in range(t + 1))
            total = from_start * h0[0, 0, j]
            for s in range(t + 1):
                decay = math.prod(gamma_at(r)[j].item() for r in range(s + 1, t + 1))
                total = total + decay * k[0, s, 0, j] * v[0, s, 0]
            expected[0, t, 0] += SCALE * q[0, t, 0, j] * total
    o, _ = decayed_attention(q, k, v, gamma.log(), scale=SCALE, initial_state=h0, backend=backend)
    assert_close("o", expected, o, **F64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_output_and_state_dtypes(dtype):
    inputs, _, _ = case("const_small", 7, True)
    q, k, v, g, h0 = (inputs[n].to(dtype) for n in ("q", "k", "v", "log_gamma", "initial_state"))
    o, final_state = decayed_attention(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype
    assert final_state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_auto_is_chunk_on_cpu():
    inputs, _, _ = case("token_mixed", 65, True)
    args = [inputs[n] for n in ("q", "k", "v", "log_gamma")]
    auto = decayed_attention(*args, initial_state=inputs["initial_state"], output_final_state=True)
    chunk = decayed_attention(*args, initial_state=inputs["initial_state"], output_final_state=True, backend="chunk")
    assert torch.equal(auto[0], chunk[0]) and torch.equal(auto[1], chunk[1])


def test_final_state_is_none_unless_requested():
    inputs, _, _ = case("const_small", 7, False)
    for backend in ["naive", *FAST_BACKENDS]:
        _, final_state = decayed_attention(*(inputs[n] for n in ("q", "k", "v", "log_gamma")), backend=backend)
        assert final_state is None


def _valid_args() -> dict:
    T = 5
    return dict(
        q=torch.randn(B, T, H, K),
        k=torch.randn(B, T, H, K),
        v=torch.randn(B, T, H, V),
        log_gamma=-torch.rand(H, K),
        initial_state=torch.randn(B, H, K, V),
        scale=1.0,
        backend="chunk",
    )


BAD_INPUTS = {
    "q_not_tensor": (dict(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
    "q_int_dtype": (dict(q=torch.ones(B, 5, H, K, dtype=torch.int64)), TypeError, r"q must have a floating dtype"),
    "q_3d": (dict(q=torch.randn(B, 5, K)), ValueError, r"q must be \[B, T, H, K\], got shape \[2, 5, 8\]"),
    "k_other_K": (dict(k=torch.randn(B, 5, H, K + 1)), ValueError, r"k must have shape .*got \[2, 5, 2, 9\]"),
    "k_other_T": (dict(k=torch.randn(B, 4, H, K)), ValueError, r"k must have shape"),
    "v_other_B": (dict(v=torch.randn(B + 1, 5, H, V)), ValueError, r"v must have shape \[B, T, H, V\]"),
    "v_5d": (dict(v=torch.randn(B, 5, H, V, 1)), ValueError, r"v must be \[B, T, H, V\]"),
    "T_zero": (
        dict(q=torch.randn(B, 0, H, K), k=torch.randn(B, 0, H, K), v=torch.randn(B, 0, H, V)),
        ValueError,
        r"T=0",
    ),
    "k_dtype": (dict(k=torch.randn(B, 5, H, K, dtype=torch.float64)), TypeError, r"k has dtype torch.float64"),
    "v_device": (dict(v=torch.empty(B, 5, H, V, device="meta")), ValueError, r"v is on meta"),
    "log_gamma_device": (dict(log_gamma=torch.empty(H, K, device="meta")), ValueError, r"log_gamma is on meta"),
    "log_gamma_scalar_gate": (dict(log_gamma=-torch.rand(B, 5, H)), ValueError, r"log_gamma must have shape"),
    "log_gamma_per_key": (dict(log_gamma=-torch.rand(K)), ValueError, r"log_gamma must have shape .*got \[8\]"),
    "log_gamma_positive": (dict(log_gamma=torch.full((H, K), 0.1)), ValueError, r"log_gamma .*must be <= 0"),
    "log_gamma_nan": (dict(log_gamma=torch.full((H, K), math.nan)), ValueError, r"log_gamma contains NaN"),
    "log_gamma_neg_inf": (dict(log_gamma=torch.full((H, K), -math.inf)), ValueError, r"log_gamma must be finite"),
    "log_gamma_int": (dict(log_gamma=torch.zeros(H, K, dtype=torch.int64)), TypeError, r"log_gamma must have a float"),
    "initial_state_shape": (
        dict(initial_state=torch.randn(B, H, V, K)),
        ValueError,
        r"initial_state must have shape \[B, H, K, V\]",
    ),
    "initial_state_device": (
        dict(initial_state=torch.empty(B, H, K, V, device="meta")),
        ValueError,
        r"initial_state is on meta",
    ),
    "scale_inf": (dict(scale=math.inf), ValueError, r"scale must be finite"),
    "scale_str": (dict(scale="1"), TypeError, r"scale must be a real number"),
    "backend_unknown": (dict(backend="flash"), ValueError, r"unknown backend 'flash'; valid names are 'naive', 'mask'"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(bad):
    changes, error, match = bad
    args = _valid_args() | changes
    q, k, v, log_gamma = (args.pop(n) for n in ("q", "k", "v", "log_gamma"))
    with pytest.raises(error, match=match):
        decayed_attention(q, k, v, log_gamma, **args)


def test_check_values_false_skips_the_value_check_only():
    """``check_values=False`` reads nothing back: a positive log decay passes, a bad shape still raises."""
    args = _valid_args()
    q, k, v = (args.pop(n) for n in ("q", "k", "v"))
    args.pop("log_gamma")
    o, _ = decayed_attention(q, k, v, torch.full((H, K), 0.1), check_values=False, **args)
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match=r"log_gamma must have shape"):
        decayed_attention(q, k, v, torch.zeros(K), check_values=False, **args)


def test_k2_mixer_does_not_read_its_decays_back(monkeypatch):
    """The K2 mixer builds its log decays in range, so its forward skips the check that waits for the device."""
    from linmix.layers.k2 import K2Config, K2Mixer

    ops = importlib.import_module("linmix.ops.decayed_attention")  # the package, not the function it exports

    def refuse(*_):
        raise AssertionError("check_log_decay was called")

    monkeypatch.setattr(ops, "check_log_decay", refuse)
    layer = K2Mixer(K2Config(d_model=16, rank=4, kbase="toeplitz", kbase_taps=4, decay_backend="chunk"))
    y, _ = layer(torch.randn(2, 9, 16))
    assert y.shape == (2, 9, 16)


@pytest.mark.parametrize("per_token", [False, True], ids=["constant", "per_token"])
def test_step_continues_the_sequence(per_token):
    """Seven steps from a carried state equal the naive op over the same positions, output and state."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, K, V = 2, 7, 3, 4, 5
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    uniform = torch.rand((B, T, H, K) if per_token else (H, K), generator=gen, dtype=torch.float64)
    log_gamma = torch.log(0.01 + 0.99 * uniform)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    ref_o, ref_state = decayed_attention(
        q, k, v, log_gamma, scale=0.5, initial_state=h0, output_final_state=True, backend="naive"
    )
    state, outputs = h0, []
    for t in range(T):
        log_gamma_t = log_gamma[:, t] if per_token else log_gamma
        o_t, state = decayed_attention_step(q[:, t], k[:, t], v[:, t], log_gamma_t, state, scale=0.5)
        outputs.append(o_t)
    torch.testing.assert_close(torch.stack(outputs, dim=1), ref_o)
    torch.testing.assert_close(state, ref_state)


def test_step_rejects_a_wrong_state_shape():
    q = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, K, V\]"):
        decayed_attention_step(q, q, torch.zeros(2, 1, 3), torch.zeros(1, 4), torch.zeros(2, 1, 4, 4))
