"""decayed_attention with cu_seqlens: packed sequences against each sequence run alone, forward and backward."""

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_close, outputs_and_grads

from linmix.ops import decayed_attention
from linmix.ops.decayed_attention import BACKENDS

# Backends checked on packed sequences; a backend that takes cu_seqlens itself is added here too.
VARLEN_TEST_BACKENDS = ["naive", "mask", "chunk"]
H, K, V = 2, 8, 5
SCALE = 0.5
CU_SEQLENS = [0, 1, 8, 71, 404]  # lengths 1, 7, 63 and 333: across and inside 64-position chunks
F64 = dict(ratio=1e-10, atol=1e-12)


def make_case(bounds: list[int], per_token: bool, with_h0: bool, seed: int = 0) -> tuple[dict, dict]:
    """Float64 packed inputs ``[1, T, ...]`` for ``N = len(bounds) - 1`` sequences, and cotangents."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    T, N = bounds[-1], len(bounds) - 1
    inputs = {"q": randn(1, T, H, K), "k": randn(1, T, H, K), "v": randn(1, T, H, V)}
    if per_token:
        inputs["log_gamma"] = F.logsigmoid(randn(1, T, H, K) + 2.0)  # gamma mostly 0.7 .. 0.99
    else:
        inputs["log_gamma"] = torch.log(torch.linspace(0.01, 0.9999, H * K, dtype=torch.float64)).reshape(H, K)
    if with_h0:
        inputs["initial_state"] = randn(N, H, K, V)
    cotangents = {"o": randn(1, T, H, V), "final_state": randn(N, H, K, V)}
    return inputs, cotangents


def _leaves(inputs: dict, dtype: torch.dtype) -> dict:
    return {name: x.detach().to(dtype).requires_grad_() for name, x in inputs.items()}


def run_packed(backend: str, inputs: dict, cotangents: dict, cu_seqlens: torch.Tensor, dtype=torch.float64) -> dict:
    """One call on the packed batch: outputs, final states and the gradient of every input."""
    leaves = _leaves(inputs, dtype)
    o, final_state = decayed_attention(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        leaves["log_gamma"],
        scale=SCALE,
        initial_state=leaves.get("initial_state"),
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )
    return outputs_and_grads(leaves, o, final_state, cotangents)


def run_separately(inputs: dict, cotangents: dict, bounds: list[int]) -> dict:
    """The reference: the naive backend in float64 on each sequence alone, results joined."""
    leaves = _leaves(inputs, torch.float64)
    log_gamma, h0 = leaves["log_gamma"], leaves.get("initial_state")
    outputs, final_states = [], []
    for n, (start, end) in enumerate(itertools.pairwise(bounds)):
        part = slice(start, end)
        o, final_state = decayed_attention(
            leaves["q"][:, part],
            leaves["k"][:, part],
            leaves["v"][:, part],
            log_gamma[:, part] if log_gamma.dim() == 4 else log_gamma,
            scale=SCALE,
            initial_state=None if h0 is None else h0[n : n + 1],
            output_final_state=True,
            backend="naive",
        )
        outputs.append(o)
        final_states.append(final_state)
    return outputs_and_grads(leaves, torch.cat(outputs, dim=1), torch.cat(final_states, dim=0), cotangents)


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("per_token", [False, True], ids=["const", "token"])
@pytest.mark.parametrize("backend", VARLEN_TEST_BACKENDS)
def test_matches_sequences_run_separately(backend, per_token, with_h0):
    inputs, cotangents = make_case(CU_SEQLENS, per_token, with_h0)
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    out = run_packed(backend, inputs, cotangents, cu_seqlens)
    assert out["final_state"].shape == (len(CU_SEQLENS) - 1, H, K, V)
    assert_all_close(run_separately(inputs, cotangents, CU_SEQLENS), out, **F64)


@pytest.mark.parametrize("backend", VARLEN_TEST_BACKENDS)
def test_float32_matches_float64(backend):
    bounds = [0, 5, 70, 100]
    inputs, cotangents = make_case(bounds, per_token=True, with_h0=True, seed=1)
    out = run_packed(backend, inputs, cotangents, torch.tensor(bounds), dtype=torch.float32)
    assert out["o"].dtype == torch.float32 and out["final_state"].dtype == torch.float32
    assert_all_close(run_separately(inputs, cotangents, bounds), out, ratio=1e-5)


@pytest.mark.parametrize("per_token", [False, True], ids=["const", "token"])
@pytest.mark.parametrize("backend", VARLEN_TEST_BACKENDS)
def test_one_sequence_equals_plain_call(backend, per_token):
    T = 70
    inputs, cotangents = make_case([0, T], per_token, with_h0=True, seed=2)
    plain_leaves = _leaves(inputs, torch.float64)
    o, final_state = decayed_attention(
        *(plain_leaves[n] for n in ("q", "k", "v", "log_gamma")),
        scale=SCALE,
        initial_state=plain_leaves["initial_state"],
        output_final_state=True,
        backend=backend,
    )
    plain = outputs_and_grads(plain_leaves, o, final_state, cotangents)
    packed = run_packed(backend, inputs, cotangents, torch.tensor([0, T], dtype=torch.int64))
    assert_all_close(plain, packed, **F64)


@pytest.mark.parametrize("backend", VARLEN_TEST_BACKENDS)
def test_final_state_is_none_unless_requested(backend):
    inputs, _ = make_case([0, 3, 10], per_token=True, with_h0=False)
    args = (inputs[n] for n in ("q", "k", "v", "log_gamma"))
    _, final_state = decayed_attention(*args, cu_seqlens=torch.tensor([0, 3, 10]), backend=backend)
    assert final_state is None


def test_varlen_backend_receives_cu_seqlens(monkeypatch):
    """A backend in VARLEN_BACKENDS is called once, on the packed batch, with ``cu_seqlens=``."""
    module = importlib.import_module("linmix.ops.decayed_attention")
    calls = []

    def spy(q, k, v, log_gamma, scale, initial_state, output_final_state, cu_seqlens=None):
        calls.append(cu_seqlens)
        return BACKENDS["naive"](q, k, v, log_gamma, scale, initial_state, output_final_state)

    monkeypatch.setitem(BACKENDS, "spy", spy)
    monkeypatch.setattr(module, "VARLEN_BACKENDS", frozenset({"spy"}))
    inputs, _ = make_case([0, 3, 10], per_token=False, with_h0=False)
    cu_seqlens = torch.tensor([0, 3, 10])
    decayed_attention(*(inputs[n] for n in ("q", "k", "v", "log_gamma")), cu_seqlens=cu_seqlens, backend="spy")
    decayed_attention(*(inputs[n] for n in ("q", "k", "v", "log_gamma")), backend="spy")
    assert len(calls) == 2 and calls[0] is cu_seqlens and calls[1] is None


T_BAD = 12


def _valid_args() -> dict:
    return dict(
        q=torch.randn(1, T_BAD, H, K),
        k=torch.randn(1, T_BAD, H, K),
        v=torch.randn(1, T_BAD, H, V),
        log_gamma=-torch.rand(1, T_BAD, H, K),
        initial_state=torch.randn(3, H, K, V),
        cu_seqlens=torch.tensor([0, 2, 5, T_BAD], dtype=torch.int32),
        backend="chunk",
    )


def _batch_of_two() -> dict:
    return dict(
        q=torch.randn(2, T_BAD, H, K),
        k=torch.randn(2, T_BAD, H, K),
        v=torch.randn(2, T_BAD, H, V),
        log_gamma=-torch.rand(H, K),
    )


BAD_INPUTS = {
    "not_tensor": (dict(cu_seqlens=[0, 2, 5, T_BAD]), TypeError, r"cu_seqlens must be a torch.Tensor, got list"),
    "float_dtype": (
        dict(cu_seqlens=torch.tensor([0.0, 2.0, 5.0, T_BAD])),
        TypeError,
        r"cu_seqlens must have dtype torch.int32 or torch.int64, got torch.float32",
    ),
    "bool_dtype": (dict(cu_seqlens=torch.ones(4, dtype=torch.bool)), TypeError, r"cu_seqlens must have dtype"),
    "2d": (
        dict(cu_seqlens=torch.tensor([[0, 2, 5, T_BAD]])),
        ValueError,
        r"cu_seqlens must be 1-D \[N \+ 1\] with N >= 1 sequences, got shape \[1, 4\]",
    ),
    "one_entry": (dict(cu_seqlens=torch.tensor([0])), ValueError, r"cu_seqlens must be 1-D .*got shape \[1\]"),
    "device": (dict(cu_seqlens=torch.empty(4, dtype=torch.int64, device="meta")), ValueError, r"cu_seqlens is on meta"),
    "first_not_zero": (dict(cu_seqlens=torch.tensor([1, 2, 5, T_BAD])), ValueError, r"cu_seqlens must start at 0"),
    "last_below_T": (
        dict(cu_seqlens=torch.tensor([0, 2, 5, 11])),
        ValueError,
        r"cu_seqlens must end at T = 12 \(the length of q\), got 11",
    ),
    "last_above_T": (dict(cu_seqlens=torch.tensor([0, 2, 5, 13])), ValueError, r"cu_seqlens must end at T = 12"),
    "empty_sequence": (
        dict(cu_seqlens=torch.tensor([0, 5, 5, T_BAD])),
        ValueError,
        r"cu_seqlens must be strictly increasing .*got sequence 1 from 5 to 5",
    ),
    "decreasing": (
        dict(cu_seqlens=torch.tensor([0, 6, 5, T_BAD])),
        ValueError,
        r"cu_seqlens must be strictly increasing .*got sequence 1 from 6 to 5",
    ),
    "batch_of_two": (
        _batch_of_two() | dict(initial_state=None),
        ValueError,
        r"q must have batch size 1 when cu_seqlens is given .*got shape \[2, 12, 2, 8\]",
    ),
    "initial_state_per_batch": (
        dict(initial_state=torch.randn(1, H, K, V)),
        ValueError,
        r"initial_state must have shape \[N, H, K, V\] \(N sequences in cu_seqlens\) = \[3, 2, 8, 5\], got \[1, ",
    ),
    "initial_state_too_many": (
        dict(initial_state=torch.randn(4, H, K, V)),
        ValueError,
        r"initial_state must have shape \[N, H, K, V\]",
    ),
    "log_gamma_per_token_batch": (
        dict(log_gamma=-torch.rand(3, T_BAD, H, K)),
        ValueError,
        r"log_gamma must have shape .*\[B, T, H, K\] = \[1, 12, 2, 8\]",
    ),
}


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_cu_seqlens_raise(bad):
    changes, error, match = bad
    args = _valid_args() | changes
    q, k, v, log_gamma = (args.pop(n) for n in ("q", "k", "v", "log_gamma"))
    with pytest.raises(error, match=match):
        decayed_attention(q, k, v, log_gamma, **args)

