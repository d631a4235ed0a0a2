"""The dispatch machinery shared by every op (``linmix.ops._dispatch``), on a throwaway op.

The toy op keeps a running sum: ``o[t] = s0 + sum_{r <= t} w * x[r]`` with ``x [B, T, D]`` per
token and ``w [D]`` shared. Its state is a pair, ``(s [B, D], count [B])`` (the positions seen),
as a future op's may be. Its backends record how dispatch called them. The op is registered for one
test and removed from ``OPS`` after it.
"""

import pytest
import torch

from linmix.ops import OPS
from linmix.ops._dispatch import Backend, Op, dispatch, register_op

NAME = "toy_running_sum"
PACKAGE = "linmix_no_such_package"  # an optional package that is not installed


def running_sum(x, w, mode, initial_state, output_final_state):
    """The toy op's computation: ``(o, (s, count))``; ``mode`` is a setting some backends refuse."""
    B, T, D = x.shape
    s0, count = initial_state if initial_state is not None else (x.new_zeros(B, D), x.new_zeros(B))
    o = s0[:, None] + (w * x).cumsum(dim=1)  # [B, T, D]
    return o, ((o[:, -1], count + T) if output_final_state else None)


class Recorder:
    """Backend functions that log each call (backend name, argument dtypes, shapes, cu_seqlens) and compute the op."""

    def __init__(self):
        self.calls = []

    def plain(self, name: str):
        def backend(x, w, mode, initial_state, output_final_state):
            self.calls.append(dict(name=name, x=x, w=w, initial_state=initial_state, cu_seqlens=None))
            return running_sum(x, w, mode, initial_state, output_final_state)

        return backend

    def varlen(self, name: str):
        def backend(x, w, mode, initial_state, output_final_state, cu_seqlens=None):
            self.calls.append(dict(name=name, x=x, w=w, initial_state=initial_state, cu_seqlens=cu_seqlens))
            if cu_seqlens is None:
                return running_sum(x, w, mode, initial_state, output_final_state)
            return _per_sequence_by_hand(x, w, mode, initial_state, output_final_state, cu_seqlens)

        return backend

    def names(self) -> list[str]:
        return [call["name"] for call in self.calls]


def _per_sequence_by_hand(x, w, mode, initial_state, output_final_state, cu_seqlens):
    outputs, sums, counts = [], [], []
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
        state = None if initial_state is None else tuple(part[n : n + 1] for part in initial_state)
        o, final_state = running_sum(x[:, start:end], w, mode, state, True)
        outputs.append(o)
        sums.append(final_state[0])
        counts.append(final_state[1])
    final_state = (torch.cat(sums), torch.cat(counts)) if output_final_state else None
    return torch.cat(outputs, dim=1), final_state


@pytest.fixture
def toy():
    """Register the toy op with recording backends; yield ``(call, recorder)``; unregister it after the test."""
    recorder = Recorder()
    op = register_op(Op(
        name=NAME,
        module=__name__,
        fn=None,
        backends={
            "reference": Backend(recorder.plain("reference"), "token loop"),
            "fused": Backend(recorder.varlen("fused"), "kernel (CUDA)", native_dtypes=True, varlen=True,
                             float64=False, needs_cuda=True, interpretable=True),
            "plain": Backend(recorder.plain("plain"), "plain, one mode", takes={"mode": ("a",)}),
            "packed": Backend(recorder.varlen("packed"), "takes cu_seqlens", varlen=True, float64=False),
            "library": Backend(recorder.plain("library"), "needs a package", requires=PACKAGE),
        },
        auto=("library", "fused", "plain", "reference"),
        per_token={"x": (3,)},
        float32_args=("w",),
        step=None,
    ))

    def call(x, w, mode="a", backend="auto", **kwargs):
        return dispatch(op, backend, dict(x=x, w=w), dict(mode=mode), **kwargs)

    try:
        yield call, recorder
    finally:
        del OPS[NAME]


def _inputs(B=2, T=5, D=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(B, T, D, generator=generator).to(dtype), torch.randn(D, generator=generator).to(dtype)


def test_auto_takes_the_first_backend_that_runs_here_and_takes_the_settings(toy):
    """``auto`` skips a backend whose package is missing, one that needs CUDA on CPU tensors (even if
    interpretable) and one that refuses the settings, in the order of ``Op.auto``."""
    call, recorder = toy
    x, w = _inputs()
    call(x, w, mode="a")
    call(x, w, mode="b")
    assert recorder.names() == ["plain", "reference"]


def test_float64_inputs_fall_back_to_the_first_auto_backend_computing_float64(toy):
    """A backend without float64 given float64 inputs runs them on the first ``auto`` backend that
    computes float64 and takes the settings (not on an earlier one that refuses them)."""
    call, recorder = toy
    x, w = _inputs(dtype=torch.float64)
    o, _ = call(x, w, mode="a", backend="packed")
    call(x, w, mode="b", backend="packed")
    call(x.float(), w.float(), mode="a", backend="packed")
    assert recorder.names() == ["plain", "reference", "packed"]
    assert o.dtype == torch.float64 and recorder.calls[0]["x"].dtype == torch.float64


def test_casts_to_the_compute_dtype_and_back(toy, monkeypatch):
    """16-bit inputs reach a backend in float32 unless it reads them natively; ``float32_args`` are
    float32 always; the output comes back in the input dtype and the state stays float32."""
    call, recorder = toy
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the CUDA-only "fused" run on CPU tensors
    x, w = _inputs(dtype=torch.bfloat16)
    for backend in ("reference", "fused"):
        o, final_state = call(x, w, backend=backend, output_final_state=True)
        assert o.dtype == torch.bfloat16 and final_state[0].dtype == torch.float32
    reference, fused = recorder.calls
    assert (reference["x"].dtype, reference["w"].dtype) == (torch.float32, torch.float32)
    assert (fused["x"].dtype, fused["w"].dtype) == (torch.bfloat16, torch.float32)


def test_refused_settings_raise_naming_the_backend_and_what_it_takes(toy):
    call, _ = toy
    x, w = _inputs()
    with pytest.raises(ValueError, match=rf"backend 'plain' of {NAME} takes mode='a' only, not mode='b'"):
        call(x, w, mode="b", backend="plain")


def test_unavailable_backends_raise_a_clear_error(toy, monkeypatch):
    """A backend whose package is missing, or that needs CUDA on CPU tensors without the
    interpreter, says so when named."""
    call, _ = toy
    x, w = _inputs()
    with pytest.raises(ValueError, match=rf"backend 'library' of {NAME} needs the optional package "
                                         rf"'{PACKAGE}', which is not installed"):
        call(x, w, backend="library")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=rf"backend 'fused' of {NAME} needs CUDA tensors, got cpu "
                                         r"\(TRITON_INTERPRET=1 runs it on the CPU\)"):
        call(x, w, backend="fused")


def _packed(with_state: bool):
    x, w = _inputs(B=1, T=12)
    cu_seqlens = torch.tensor([0, 1, 5, 12])
    state = (torch.randn(3, 3), torch.tensor([10.0, 20.0, 30.0])) if with_state else None
    return x, w, cu_seqlens, state


@pytest.mark.parametrize("with_state", [False, True], ids=["no_h0", "h0"])
def test_per_sequence_fallback_calls_the_backend_once_per_sequence(toy, with_state):
    """A backend without ``varlen`` runs each packed sequence alone: its per-token tensors cut along
    T, the shared ones whole, its row of every initial-state tensor, no ``cu_seqlens``; the tuple
    states of the sequences are joined row by row."""
    call, recorder = toy
    x, w, cu_seqlens, state = _packed(with_state)
    o, (s, count) = call(x, w, backend="reference", initial_state=state, output_final_state=True,
                         cu_seqlens=cu_seqlens)
    assert [c["x"].shape[1] for c in recorder.calls] == [1, 4, 7]
    assert all(c["w"] is recorder.calls[0]["w"] and c["w"].shape == (3,) for c in recorder.calls)
    if with_state:
        assert [tuple(part.shape[0] for part in c["initial_state"]) for c in recorder.calls] == [(1, 1)] * 3
        assert [c["initial_state"][1].item() for c in recorder.calls] == [10.0, 20.0, 30.0]
    expected_o, (expected_s, expected_count) = _per_sequence_by_hand(x, w, "a", state, True, cu_seqlens)
    torch.testing.assert_close(o, expected_o)
    torch.testing.assert_close(s, expected_s)
    torch.testing.assert_close(count, expected_count)
    assert count.tolist() == [n + (10.0 * (i + 1) if with_state else 0) for i, n in enumerate([1.0, 4.0, 7.0])]


def test_varlen_backend_is_called_once_with_cu_seqlens(toy):
    call, recorder = toy
    x, w, cu_seqlens, state = _packed(with_state=True)
    call(x, w, backend="packed", initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
    call(x, w, backend="packed")
    assert recorder.names() == ["packed", "packed"]
    assert recorder.calls[0]["cu_seqlens"] is cu_seqlens and recorder.calls[0]["x"].shape == (1, 12, 3)
    assert recorder.calls[1]["cu_seqlens"] is None


def test_final_state_is_none_unless_asked_for(toy):
    call, _ = toy
    x, w, cu_seqlens, state = _packed(with_state=True)
    assert call(x, w, backend="reference", initial_state=state)[1] is None
    assert call(x, w, backend="reference", initial_state=state, cu_seqlens=cu_seqlens)[1] is None


def test_register_op_refuses_inconsistent_tables(toy):
    """A taken name, ``auto`` naming an unknown backend, and ``auto`` without a float64 backend are refused."""
    op = OPS[NAME]
    with pytest.raises(ValueError, match=rf"op '{NAME}' is already registered"):
        register_op(op)
    fields = dict(module=__name__, fn=None, backends=op.backends, per_token={}, step=None)
    with pytest.raises(ValueError, match=r"auto must name its backends, got \('missing',\)"):
        register_op(Op(name="toy_unknown_auto", auto=("missing",), **fields))
    with pytest.raises(ValueError, match=r"one backend of auto must compute float64"):
        register_op(Op(name="toy_no_float64", auto=("fused", "packed"), **fields))
    assert "toy_unknown_auto" not in OPS and "toy_no_float64" not in OPS
