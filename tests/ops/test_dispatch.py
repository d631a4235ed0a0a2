"""The dispatch machinery shared by every op (``linmix.ops._dispatch``), on a throwaway op.

The toy op keeps a running sum: ``o[t] = s0 + sum_{r <= t} w * x[r]`` with ``x [B, T, D]`` per
token and ``w [D]`` shared. Its state is a pair, ``(s [B, D], count [B])`` (the positions seen),
as a future op's may be. Its backends record how dispatch called them. The op is registered for one
test and removed from ``OPS`` after it. The guards every call passes (``linmix.ops._guards``: the
finite check, the dense-size limit) are checked on it too.
"""

import pytest
import torch

from linmix.ops import OPS, check_finite, is_checking_finite, limit_dense_bytes, max_dense_bytes
from linmix.ops._dispatch import Backend, Op, dispatch, register_op
from linmix.ops._guards import env_bytes, env_flag

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


def squared_length_bytes(x, w, mode, initial_state, output_final_state, cu_seqlens=None):
    """A made-up dense intermediate of the "dense" backend: a float32 ``[T, T]`` matrix."""
    return 4 * x.shape[1] ** 2, f"a [T, T] matrix for x of shape {list(x.shape)}"


def result_shapes(tensors, settings, initial_state, sequences):
    """``o [B, T, D]`` and the state ``([N, D], [N])``."""
    x = tensors["x"]
    return tuple(x.shape), ((sequences, x.shape[2]), (sequences,))


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
            "dense": Backend(recorder.plain("dense"), "builds a [T, T] matrix", materializes=squared_length_bytes),
        },
        auto=("library", "fused", "plain", "reference"),
        per_token={"x": (3,)},
        float32_args=("w",),
        step=None,
        result_shapes=result_shapes,
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


# ---- zero sizes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [dict(B=0), dict(D=0, output_final_state=False)], ids=["B0", "D0_no_state"])
def test_empty_results_reach_no_backend(toy, dims):
    """Empty outputs with no final state asked for, or an empty one, come back without a backend
    call, shaped and typed as the backend's would be, and a backward gives zero gradients."""
    call, recorder = toy
    output_final_state = dims.pop("output_final_state", True)
    x, w = (t.requires_grad_() for t in _inputs(**dims, dtype=torch.bfloat16))
    o, final_state = call(x, w, backend="fused", output_final_state=output_final_state)
    assert recorder.calls == []
    assert o.shape == x.shape and o.dtype == torch.bfloat16
    if output_final_state:
        assert [(part.shape, part.dtype) for part in final_state] == [((0, 3), torch.float32), ((0,), torch.float32)]
    (o.sum() + sum(part.sum() for part in final_state or ())).backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def test_empty_output_with_a_state_to_compute_reaches_the_backend(toy):
    """D = 0 empties ``o`` and ``s`` but not the position count of the state: the backend computes it."""
    call, recorder = toy
    x, w = _inputs(D=0)
    _, (s, count) = call(x, w, backend="reference", output_final_state=True)
    assert recorder.names() == ["reference"] and s.shape == (2, 0) and count.tolist() == [5.0, 5.0]


def test_zero_length_passes_the_initial_state_through(toy):
    """With T = 0 the final state is a float32 copy of the initial state, whose gradient is the final
    state's; no backend runs."""
    call, recorder = toy
    x, w = (t.requires_grad_() for t in _inputs(T=0))
    state = (torch.randn(2, 3, dtype=torch.float64).requires_grad_(), torch.tensor([4.0, 9.0]).requires_grad_())
    o, final_state = call(x, w, backend="reference", initial_state=state, output_final_state=True)
    assert recorder.calls == [] and o.shape == (2, 0, 3)
    assert all(out is not given and out.dtype == torch.float32 and torch.equal(out, given.float())
               for out, given in zip(final_state, state, strict=True))
    (2 * final_state[0].sum() + 3 * final_state[1].sum()).backward()
    assert torch.equal(state[0].grad, torch.full((2, 3), 2.0, dtype=torch.float64))
    assert torch.equal(state[1].grad, torch.full((2,), 3.0)) and torch.equal(x.grad, torch.zeros_like(x))
    assert call(x, w, backend="reference", output_final_state=True)[1][1].tolist() == [0.0, 0.0]


# ---- the finite check --------------------------------------------------------------------------------------


def test_finite_check_names_the_op_the_argument_and_the_first_bad_entry(toy):
    call, _ = toy
    x, w, cu_seqlens, state = _packed(with_state=True)
    state[1][1:] = torch.tensor([torch.nan, -torch.inf])
    before = is_checking_finite()
    with check_finite(False):
        call(x, w, initial_state=state, cu_seqlens=cu_seqlens)  # off: no check
    with check_finite():
        assert is_checking_finite()
        with pytest.raises(ValueError, match=rf"^{NAME}: argument initial_state\[1\] holds nan at \[1\]$"):
            call(x, w, initial_state=state, cu_seqlens=cu_seqlens)
        x[0, 4, 2] = torch.inf
        with pytest.raises(ValueError, match=rf"^{NAME}: argument x holds inf at \[0, 4, 2\]$"):
            call(x, w)
    assert is_checking_finite() == before


def test_finite_check_names_the_backend_of_a_non_finite_output(toy):
    """Finite inputs whose running sum overflows float32: the backend is named, and the output."""
    call, _ = toy
    x, w = _inputs()
    x[:, :, 1] = 3e38
    w[1] = 2.0
    with check_finite(), pytest.raises(ValueError, match=rf"^{NAME}: backend 'plain' returned inf at \[0, 0, 1\] "
                                                         r"of o from finite inputs$"):
        call(x, w)


def test_finite_check_lets_torch_compile_trace_without_a_graph_break(toy):
    """The check reads values, so it is skipped while torch.compile traces: the graph stays whole."""
    call, _ = toy
    x, w = _inputs()
    torch._dynamo.reset()
    with check_finite():
        compiled = torch.compile(lambda x, w: call(x, w, backend="reference")[0], fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x, w), call(x, w, backend="reference")[0])


def test_switches_set_for_the_process_or_for_a_block():
    """A switch called alone keeps its setting; used in ``with`` it restores the previous one."""
    before = max_dense_bytes()
    try:
        limit_dense_bytes(1000)
        with limit_dense_bytes(10):
            assert max_dense_bytes() == 10
        assert max_dense_bytes() == 1000
    finally:
        limit_dense_bytes(before)
    with pytest.raises(TypeError, match=r"enabled must be a bool, got int"):
        check_finite(1)
    with pytest.raises(TypeError, match=r"limit must be an int \(bytes\), got float"):
        limit_dense_bytes(1e9)
    with pytest.raises(ValueError, match=r"limit must be >= 0 bytes, got -1"):
        limit_dense_bytes(-1)


def test_environment_variables_set_the_guards_at_import(monkeypatch):
    """``LINMIX_CHECK_FINITE`` is a flag (unset: off), ``LINMIX_MAX_DENSE_BYTES`` a byte count (unset: the
    default); other values are refused naming the variable."""
    monkeypatch.delenv("LINMIX_CHECK_FINITE", raising=False)
    monkeypatch.delenv("LINMIX_MAX_DENSE_BYTES", raising=False)
    assert env_flag("LINMIX_CHECK_FINITE") is False and env_bytes("LINMIX_MAX_DENSE_BYTES", 7) == 7
    for value, expected in (("1", True), ("true", True), ("ON", True), ("0", False), ("no", False)):
        monkeypatch.setenv("LINMIX_CHECK_FINITE", value)
        assert env_flag("LINMIX_CHECK_FINITE") is expected
    monkeypatch.setenv("LINMIX_CHECK_FINITE", "maybe")
    with pytest.raises(ValueError, match=r"LINMIX_CHECK_FINITE='maybe' must be 1 or 0"):
        env_flag("LINMIX_CHECK_FINITE")
    monkeypatch.setenv("LINMIX_MAX_DENSE_BYTES", "17_179_869_184")
    assert env_bytes("LINMIX_MAX_DENSE_BYTES", 7) == 16 * 2**30
    monkeypatch.setenv("LINMIX_MAX_DENSE_BYTES", "16GB")
    with pytest.raises(ValueError, match=r"LINMIX_MAX_DENSE_BYTES='16GB' must be a whole number of bytes"):
        env_bytes("LINMIX_MAX_DENSE_BYTES", 7)


# ---- the dense-size limit ----------------------------------------------------------------------------------


def test_dense_limit_applies_to_each_call_of_the_backend(toy):
    """The limit is checked on the arguments each backend call gets: packed sequences run one by one are
    checked one by one (the longest, 7 positions: 196 bytes), not as the packed whole (12: 576)."""
    call, _ = toy
    x, w, cu_seqlens, _ = _packed(with_state=False)
    with limit_dense_bytes(196):
        call(x, w, backend="dense", cu_seqlens=cu_seqlens)
    with limit_dense_bytes(195), pytest.raises(ValueError, match=(
            rf"^{NAME}: backend 'dense' would build a \[T, T\] matrix for x of shape \[1, 7, 3\]: 196 bytes, "
            r"over the limit of 195 bytes; raise the limit with "
            r"linmix.ops.limit_dense_bytes\(n\) or the environment variable LINMIX_MAX_DENSE_BYTES=n")):
        call(x, w, backend="dense", cu_seqlens=cu_seqlens)
