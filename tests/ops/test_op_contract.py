"""The op contract, checked for every backend of every registered op (``linmix.ops.OPS``) from its test spec.

No op or backend is named here: an op joins by its registration and the ``SPEC`` of its ``testing``
module (see ``op_harness``). Every check runs on the CPU and, under ``-m gpu``, on CUDA (an external
library's backend under its own marker); the float64 reference stays on the CPU. The checks:

1. outputs and every gradient equal the ``naive`` backend in float64 (backends that compute
   float64), in float32 and in a bf16 smoke case, at the spec's tolerances;
2. ``output_final_state`` and the state dtypes; a zero initial state is no initial state;
3. a sequence split inside a chunk or on a chunk boundary, the state carried, equals the whole;
4. packed sequences (``cu_seqlens``, int32 and int64) equal each sequence run alone;
5. the one-token step run from the initial state equals the parallel form;
6. causality, bitwise;
7. ``torch.compile(fullgraph=True)`` equals eager, gradients included;
8. every bad input of the spec raises its error; bad ``cu_seqlens`` and refused settings raise;
9. a dimension of size 0 (each of the spec's and T) gives empty results of the right shapes and
   zero gradients, alike on every backend, or a ValueError naming an argument;
10. with ``check_finite`` on, a NaN or infinite input is named with its first bad entry;
11. a backend's dense intermediate is refused past ``limit_dense_bytes`` with the bytes it needs,
    which are those of the largest tensor its forward allocates;
12. from a zero initial state the output is the spec's explicit ``[T, T]`` operator applied to the
    values, per head (``linmix.ops.mixing_matrix``), and every op declares that operator.
"""

import dataclasses
import re

import pytest
import torch
from helpers import assert_all_close, assert_close
from op_harness import (
    EXTERNAL,
    FULL,
    COVERING,
    COVERING_LENGTHS,
    PACKED_LENGTHS,
    REFERENCE,
    Case,
    assert_result_dtypes,
    budget,
    call,
    case_inputs,
    compute_dtypes,
    cuda_marks,
    dtype_name,
    ends,
    entries,
    exact_dtype,
    float_items,
    is_per_token,
    leaves_of,
    matrix_params,
    matrix_reference,
    param,
    reference,
    refused_regimes,
    regime_settings,
    results,
    run,
    skip_unless_runnable,
    state_items,
    state_to,
    taken_regimes,
    tolerance,
)

from linmix.ops import OPS, check_finite, limit_dense_bytes
from linmix.ops._dispatch import compute_dtype, map_state
from linmix.ops._testing import spec_of

BF16 = torch.bfloat16
COMPILE_LENGTH = 20
DEVICES = ("cpu", "cuda")


def _budget(op_name: str, backend: str, device: str) -> str:
    return budget(OPS[op_name].backends[backend], device)


def _spec(op_name: str):
    return spec_of(OPS[op_name])


def _cut(op_name: str, tensors: dict, positions) -> dict:
    """The per-token tensors at ``positions`` (an index or a slice of dim 1), the shared ones whole."""
    op = OPS[op_name]
    return {name: (x[:, positions] if is_per_token(op, name, x) else x) for name, x in tensors.items()}


# ---- 1. every backend against the reference ---------------------------------------------------------


def covering_cases(op_name: str, regimes: tuple[str, ...]) -> list[Case]:
    """A covering subset (Triton in the CPU interpreter, PyTorch backends on CUDA): every regime at least once,
    every length of ``COVERING_LENGTHS``, the short ones with and without an initial state.

    The longest lengths go to the first regimes, which specs keep for the plainest (cheapest) inputs.
    """
    longest_first = sorted(COVERING_LENGTHS, reverse=True)
    combos = [(T, i % 2 == 0) for i, T in enumerate(longest_first)]
    combos += [(T, with_state) for T in COVERING_LENGTHS[:2] for with_state in (False, True)
               if (T, with_state) not in combos]
    return [Case(op_name, regimes[i % len(regimes)], *combos[i % len(combos)])
            for i in range(max(len(regimes), len(combos)))]


def reference_params() -> list:
    """``(op, backend, device, dtype, case)`` of check 1 for every backend, by its budget."""
    params = []
    for op_name, backend, device in entries():
        spec, chosen = _spec(op_name), OPS[op_name].backends[backend]
        regimes = taken_regimes(op_name, backend)
        kind = _budget(op_name, backend, device)
        if kind == FULL:
            dtypes = [d for d in compute_dtypes(chosen) if (backend, device, d) != (REFERENCE, "cpu", torch.float64)]
            runs = [(dtype, Case(op_name, r, T, s))
                    for r in regimes for T in spec.lengths for s in (False, True) for dtype in dtypes]
        elif kind == COVERING:
            runs = [(torch.float32, case) for case in covering_cases(op_name, regimes)]
        else:  # EXTERNAL: a handful of cases at the library's dims, each in float32 and bf16
            wide = tuple(spec.library_dims.items())
            chosen_regimes = spec.library_regimes or ends(regimes)
            runs = [(dtype, Case(op_name, r, spec.lengths[-1], dims=wide))
                    for r in chosen_regimes for dtype in (torch.float32, BF16)]
        if kind != EXTERNAL:  # the bf16 smoke case
            runs.append((BF16, Case(op_name, regimes[-1], spec.chunk + 1 if kind == FULL else COVERING_LENGTHS[1])))
        for dtype, case in runs:
            if dtype == BF16:  # the reference reads the same rounded inputs
                case = dataclasses.replace(case, rounded_to=BF16)
            params.append(param(op_name, backend, device, dtype, case, id=f"{dtype_name(dtype)}-{case.id}"))
    return params


@pytest.mark.parametrize("op_name, backend, device, dtype, case", reference_params())
def test_matches_reference(op_name, backend, device, dtype, case):
    """Outputs, final state and the gradients of every tensor and of the initial state equal the
    float64 ``naive`` result within the spec's tolerance for this backend and dtype; outputs and
    gradients come in the input dtype, states in float32 (float64 for float64 inputs)."""
    skip_unless_runnable(op_name, backend, device)
    out = run(case, backend, dtype, device)
    assert_result_dtypes(out, dtype)
    assert_all_close(reference(case), out, **tolerance(case.spec, backend, dtype))


# ---- 2. final state and initial state handling ---------------------------------------------------------


def state_params() -> list:
    params = []
    for op_name, backend, device in entries():
        kind, regimes = _budget(op_name, backend, device), taken_regimes(op_name, backend)
        chosen = ends(regimes) if kind == FULL else regimes[:1] if kind == COVERING else ()
        params += [param(op_name, backend, device, r, id=r) for r in chosen]
    return params


@pytest.mark.parametrize("op_name, backend, device, regime", state_params())
def test_final_state_contract(op_name, backend, device, regime):
    """``output_final_state=False`` gives None and the same output; outputs come in the input dtype and
    every floating state tensor in float64 for float64 inputs, float32 for float32 and bf16 ones
    (counters in int64)."""
    skip_unless_runnable(op_name, backend, device)
    op, case = OPS[op_name], Case(op_name, regime, 7)
    inputs = case_inputs(case)
    for dtype in (torch.float64, torch.float32, BF16):
        tensors, state = leaves_of(inputs, dtype, device)
        o, final_state = call(op, backend, tensors, inputs.settings, state, output_final_state=True)
        assert o.dtype == dtype
        assert state_items("final_state", final_state), "output_final_state=True returned no state"
        for name, part in state_items("final_state", final_state):
            expected = compute_dtype(dtype) if part.is_floating_point() else torch.int64
            assert part.dtype == expected, f"{name} is {part.dtype} for {dtype} inputs"
        o_alone, no_state = call(op, backend, tensors, inputs.settings, state)
        assert no_state is None
        assert torch.equal(o_alone, o)


# ---- 3. a sequence in two calls, the state carried ----------------------------------------------------


def split_params() -> list:
    params = []
    for op_name, backend, device in entries():
        kind, chunk = _budget(op_name, backend, device), _spec(op_name).chunk
        regimes = taken_regimes(op_name, backend)
        splits = {"mid_chunk": chunk // 2 + 3, "chunk_edge": chunk}
        chosen = regimes if kind == FULL else regimes[:1] if kind == COVERING else ()
        chosen = [(r, label) for r in chosen for label in splits]
        params += [param(op_name, backend, device, r, splits[label], id=f"{r}-{label}") for r, label in chosen]
    return params


@pytest.mark.parametrize("op_name, backend, device, regime, split", split_params())
def test_split_sequence_carries_the_state(op_name, backend, device, regime, split):
    """The first ``split`` positions, then 7 more from the first call's final state, give the whole
    call's outputs, final state and gradients (the per-token tensors cut, the shared ones reused)."""
    skip_unless_runnable(op_name, backend, device)
    op = OPS[op_name]
    case = Case(op_name, regime, split + 7)
    dtype = exact_dtype(op.backends[backend])
    tensors, initial_state = leaves_of(case_inputs(case), dtype, device)
    settings = case_inputs(case).settings
    o_first, carried = call(op, backend, _cut(op_name, tensors, slice(None, split)), settings, initial_state,
                            output_final_state=True)
    o_rest, final_state = call(op, backend, _cut(op_name, tensors, slice(split, None)), settings, carried,
                               output_final_state=True)
    in_two = results(case, tensors, initial_state, torch.cat([o_first, o_rest], dim=1), final_state)
    assert_all_close(run(case, backend, dtype, device), in_two, **tolerance(case.spec, backend, dtype))


# ---- 4. packed sequences ------------------------------------------------------------------------------


def packed_params() -> list:
    params = []
    for op_name, backend, device in entries():
        kind = _budget(op_name, backend, device)
        bounds = tuple(int(b) for b in torch.tensor((0, *PACKED_LENGTHS[kind])).cumsum(0))
        regimes = taken_regimes(op_name, backend)
        variants = [(torch.int32, True), (torch.int64, False)]
        last = (_spec(op_name).library_regimes or regimes)[-1] if kind == EXTERNAL else regimes[-1]
        chosen = [(r, *v) for r in regimes for v in variants] if kind == FULL else [(last, *variants[0])]
        dims = tuple(_spec(op_name).library_dims.items()) if kind == EXTERNAL else ()
        for regime, index_dtype, with_state in chosen:
            case = Case(op_name, regime, bounds[-1], with_state, bounds=bounds, dims=dims)
            params.append(param(op_name, backend, device, case, index_dtype, id=f"{dtype_name(index_dtype)}-{case.id}"))
    return params


@pytest.mark.parametrize("op_name, backend, device, case, index_dtype", packed_params())
def test_packed_sequences_match_each_run_alone(op_name, backend, device, case, index_dtype):
    """Sequences of lengths 1, 7, 63 and a long one packed with ``cu_seqlens`` (``B = 1``) give what
    each gives alone from its row of the initial state (float64 ``naive``): outputs, one final state
    per sequence, every gradient. An op whose packed final state cannot exist for these inputs must
    refuse ``output_final_state`` with a ValueError naming ``cu_seqlens``; its outputs are compared."""
    skip_unless_runnable(op_name, backend, device)
    dtype = exact_dtype(OPS[op_name].backends[backend])
    try:
        out = run(case, backend, dtype, device, index_dtype=index_dtype)
    except ValueError as error:
        assert "output_final_state" in str(error) and "cu_seqlens" in str(error), error
        case = dataclasses.replace(case, final_state=False)
        out = run(case, backend, dtype, device, index_dtype=index_dtype)
    for name, part in out.items():
        if name.startswith("final_state"):
            assert part.shape[0] == len(case.bounds) - 1, f"{name}: not one row per sequence"
    assert_all_close(reference(case), out, **tolerance(case.spec, backend, dtype))


# ---- 5. the one-token step ----------------------------------------------------------------------------


STEP_PARAMS = [pytest.param(op_name, device, regime, id=f"{op_name}-{device}-{regime}",
                            marks=cuda_marks() if device == "cuda" else [])
               for op_name, op in OPS.items() for device in DEVICES for regime in spec_of(op).regimes]


@pytest.mark.parametrize("op_name, device, regime", STEP_PARAMS)
def test_step_equals_the_parallel_form(op_name, device, regime):
    """``Op.step`` run position by position from the initial state (each per-token tensor at its
    position, the shared ones whole, the settings, ``state=``) gives the reference's outputs and
    final state, in float64."""
    op = OPS[op_name]
    case = Case(op_name, regime, _spec(op_name).chunk + 1)
    inputs = case_inputs(case)
    tensors = {name: x.to(device) for name, x in inputs.tensors.items()}
    state = map_state(lambda s: s.to(device), inputs.initial_state)
    outputs = []
    for t in range(case.T):
        o_t, state = op.step(**_cut(op_name, tensors, t), **inputs.settings, state=state)
        outputs.append(o_t)
    stepped = dict([("o", torch.stack(outputs, dim=1)), *state_items("final_state", state)])
    ref = reference(case)
    assert_all_close({name: ref[name] for name in stepped}, stepped, **tolerance(case.spec, REFERENCE, torch.float64))


# ---- 6. causality ---------------------------------------------------------------------------------------


def causal_params() -> list:
    params = []
    for op_name, backend, device in entries():
        kind, regimes = _budget(op_name, backend, device), taken_regimes(op_name, backend)
        chosen = regimes if kind == FULL else regimes[:1] if kind == COVERING else ()
        params += [param(op_name, backend, device, r, id=r) for r in chosen]
    return params


@pytest.mark.parametrize("op_name, backend, device, regime", causal_params())
def test_causal(op_name, backend, device, regime):
    """Replacing every per-token input after position ``t`` (by another draw of the regime) leaves the
    outputs up to ``t`` unchanged (bitwise in float64; to rounding for float32 kernels, which factor
    decays through later rows of a chunk), and changes the output at ``t + 1``."""
    skip_unless_runnable(op_name, backend, device)
    op, chunk = OPS[op_name], _spec(op_name).chunk
    t = chunk // 2
    case = Case(op_name, regime, chunk + 7)
    inputs, other = case_inputs(case), case_inputs(dataclasses.replace(case, salt=1))
    changed = {name: (torch.cat([x[:, : t + 1], other.tensors[name][:, t + 1:]], dim=1)
                      if is_per_token(op, name, x) else x) for name, x in inputs.tensors.items()}
    dtype = exact_dtype(op.backends[backend])
    state = state_to(inputs.initial_state, device, compute_dtype(dtype))
    before, after = (call(op, backend, {n: x.to(device, dtype) for n, x in tensors.items()}, inputs.settings, state)[0]
                     for tensors in (inputs.tensors, changed))
    if dtype == torch.float64:
        assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    else:  # float32 kernels factor decays through later rows of a chunk: equal up to rounding
        assert_close("o up to t", before[:, : t + 1], after[:, : t + 1], ratio=1e-6)
    assert not torch.equal(before[:, t + 1], after[:, t + 1])


# ---- 7. torch.compile ----------------------------------------------------------------------------------


def compile_params() -> list:
    """The first regime of every distinct settings the backend takes (the settings pick the code path)."""
    params = []
    for op_name, backend, device in entries():
        if _budget(op_name, backend, device) != EXTERNAL:
            by_settings = {}
            for regime in taken_regimes(op_name, backend):
                by_settings.setdefault(regime_settings(op_name, regime), regime)
            params += [param(op_name, backend, device, r, id=r) for r in by_settings.values()]
    return params


@pytest.mark.parametrize("op_name, backend, device, regime", compile_params())
def test_compiles_without_graph_breaks(op_name, backend, device, regime):
    """``torch.compile(fullgraph=True, backend="aot_eager")`` of a loss through the public function
    gives eager's loss and gradients (float32, from an initial state, with the final state)."""
    skip_unless_runnable(op_name, backend, device)
    op = OPS[op_name]
    inputs = case_inputs(Case(op_name, regime, COMPILE_LENGTH))
    tensors, state = leaves_of(inputs, torch.float32, device)

    def loss(tensors, state):
        o, final_state = call(op, backend, tensors, inputs.settings, state, output_final_state=True)
        return (o * o).sum() + sum(part.square().sum() for _, part in float_items("s", final_state))

    torch._dynamo.reset()  # a fresh cache: no case falls back to eager after too many recompiles
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [*tensors.values(), *(part for _, part in float_items("s", state))]
    expected, got = loss(tensors, state), compiled(tensors, state)
    assert_close("loss", expected, got, ratio=1e-6)
    grads = zip(*(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
                  for loss in (expected, got)), strict=True)
    for i, (ref, out) in enumerate(grads):
        assert_close(f"gradient {i}", ref, out, ratio=1e-6)


# ---- 8. bad inputs ---------------------------------------------------------------------------------------


def valid_call(op_name: str, regime: str | None = None, T: int = 5, **dims) -> dict:
    """Keyword arguments of a valid float32 CPU call (the spec's first regime unless given)."""
    case = Case(op_name, regime or _spec(op_name).regimes[0], T, dims=tuple(dims.items()))
    inputs = case_inputs(case)
    return {**{name: x.float() for name, x in inputs.tensors.items()}, **inputs.settings,
            "initial_state": state_to(inputs.initial_state, "cpu", torch.float32), "backend": "auto"}


BAD_INPUTS = [pytest.param(op_name, name, id=f"{op_name}-{name}") for op_name, op in OPS.items()
              for name in spec_of(op).bad_inputs]


@pytest.mark.parametrize("op_name, bad", BAD_INPUTS)
def test_bad_inputs_raise(op_name, bad):
    """Each invalid call of the spec raises its error type with a message naming the argument at fault."""
    entry = _spec(op_name).bad_inputs[bad]
    with pytest.raises(entry.error, match=entry.match):
        OPS[op_name].fn(**entry.change(valid_call(op_name)))


BAD_CU_SEQLENS = {  # name -> (cu_seqlens of a packed T = 12, error, message)
    "list": ([0, 2, 5, 12], TypeError, r"cu_seqlens must be a torch.Tensor, got list"),
    "float": (torch.tensor([0.0, 2.0, 5.0, 12.0]), TypeError, r"cu_seqlens must have dtype torch.int32 or torch.int64"),
    "bool": (torch.ones(4, dtype=torch.bool), TypeError, r"cu_seqlens must have dtype"),
    "2d": (torch.tensor([[0, 2, 5, 12]]), ValueError, r"cu_seqlens must be 1-D \[N \+ 1\] with N >= 1 sequences"),
    "one_entry": (torch.tensor([0]), ValueError, r"cu_seqlens must be 1-D .*got shape \[1\]"),
    "meta": (torch.empty(4, dtype=torch.int64, device="meta"), ValueError, r"cu_seqlens is on meta"),
    "first_not_zero": (torch.tensor([1, 2, 5, 12]), ValueError, r"cu_seqlens must start at 0, got 1"),
    "last_below_T": (torch.tensor([0, 2, 5, 11]), ValueError, r"cu_seqlens must end at T = 12 .*got 11"),
    "last_above_T": (torch.tensor([0, 2, 5, 13]), ValueError, r"cu_seqlens must end at T = 12"),
    "empty_sequence": (torch.tensor([0, 5, 5, 12]), ValueError, r"strictly increasing .*sequence 1 from 5 to 5"),
    "decreasing": (torch.tensor([0, 6, 5, 12]), ValueError, r"strictly increasing .*sequence 1 from 6 to 5"),
}


@pytest.mark.parametrize("bad", BAD_CU_SEQLENS.values(), ids=BAD_CU_SEQLENS.keys())
@pytest.mark.parametrize("op_name", list(OPS))
def test_bad_cu_seqlens_raise(op_name, bad):
    """``cu_seqlens`` must be int32/int64 ``[N + 1]`` boundaries from 0 to T, strictly increasing."""
    cu_seqlens, error, match = bad
    with pytest.raises(error, match=match):
        OPS[op_name].fn(**valid_call(op_name, T=12, B=1), cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("op_name", list(OPS))
def test_packed_initial_state_needs_a_row_per_sequence(op_name):
    """With ``cu_seqlens`` of three sequences, an initial state of one row is refused."""
    with pytest.raises(ValueError, match=r"initial_state must have shape"):
        OPS[op_name].fn(**valid_call(op_name, T=12, B=1), cu_seqlens=torch.tensor([0, 2, 5, 12]))


REFUSED = [pytest.param(op_name, backend, regime, id=f"{op_name}-{backend}-{regime}")
           for op_name, op in OPS.items() for backend in op.backends for regime in refused_regimes(op_name, backend)]


@pytest.mark.parametrize("op_name, backend, regime", REFUSED)
def test_refused_settings_raise(op_name, backend, regime):
    """A backend called with settings it does not take (``Backend.takes``; the suite's other checks
    leave such regimes out) raises ValueError saying which it takes."""
    op = OPS[op_name]
    reason = op.backends[backend].refuses(dict(regime_settings(op_name, regime)))
    kwargs = {**valid_call(op_name, regime), "backend": backend}
    with pytest.raises(ValueError, match=re.escape(f"backend {backend!r} of {op_name} {reason}")):
        op.fn(**kwargs)


# ---- 9. zero sizes ----------------------------------------------------------------------------------------

ZERO_SIZE_T = 7  # the length of the cases whose other dimension is 0


def zero_size_params() -> list:
    """``(op, backend, "cpu", dim, regime)``: every CPU backend, each dimension of the spec and T, every regime it takes."""
    params = []
    for op_name, backend, device in entries():
        if device == "cpu":
            params += [param(op_name, backend, device, dim, r, id=f"{dim}0-{r}")
                       for dim in ("T", *_spec(op_name).dims) for r in taken_regimes(op_name, backend)]
    return params


def _sized(op_name: str, regime: str, dim: str, size: int, with_state: bool) -> Case:
    """The case of ``regime`` with dimension ``dim`` (``"T"`` or one of the spec's) set to ``size``."""
    if dim == "T":
        return Case(op_name, regime, size, with_state)
    return Case(op_name, regime, ZERO_SIZE_T, with_state, dims=((dim, size),))


def _shapes_at_zero(op_name: str, regime: str, dim: str, with_state: bool) -> dict[str, tuple[int, ...]]:
    """The shape of every result (outputs, final states, gradients) at ``dim = 0``, extrapolated from the
    reference at sizes 1 and 2: every shape is affine in every dimension."""
    one, two = (reference(_sized(op_name, regime, dim, size, with_state)) for size in (1, 2))
    return {name: tuple(2 * a - b for a, b in zip(one[name].shape, two[name].shape, strict=True)) for name in one}


def _assert_names_an_argument(error: ValueError, names: list[str]) -> None:
    pattern = r"\b(" + "|".join(map(re.escape, names)) + r")\b"
    assert re.search(pattern, str(error)), f"the message names none of the arguments {names}: {error}"


def _assert_empty_call(out: dict, initial_state: dict, T: int) -> None:
    """The values of a call with empty outputs: with ``T = 0`` the final state is the initial state (zeros
    without one) and passes its gradient (ones, under a sum) to it; every other gradient is zero."""
    for name, x in out.items():
        if T == 0 and name.startswith("final_state"):
            start = initial_state.get(name.replace("final_state", "initial_state"))
            expected = torch.zeros_like(x) if start is None else start.detach()
        elif T == 0 and name.startswith("dinitial_state"):
            expected = torch.ones_like(x)
        elif name.startswith("d"):
            expected = torch.zeros_like(x)
        else:
            continue
        assert torch.equal(x, expected), f"{name} of an empty call: {x}"


@pytest.mark.parametrize("op_name, backend, device, dim, regime", zero_size_params())
def test_zero_sizes_give_empty_results_or_name_the_argument(op_name, backend, device, dim, regime):
    """With one dimension at 0, from an initial state and without: either a ValueError naming an
    argument of the op, or results of the shapes the other sizes imply and the contract's dtypes,
    through which a backward runs; a call with empty outputs gives zero gradients, and with ``T = 0``
    the initial state (zeros without one) as its final state. A regime whose inputs do not use the
    dimension (no tensor is empty) is a plain call, checked elsewhere."""
    skip_unless_runnable(op_name, backend, device)
    op = OPS[op_name]
    for with_state in (True, False):
        inputs = case_inputs(_sized(op_name, regime, dim, 0, with_state))
        tensors, state = leaves_of(inputs, torch.float32, device)
        leaves = {**tensors, **dict(state_items("initial_state", state))}
        if all(x.numel() for x in leaves.values()):
            continue
        try:
            o, final_state = call(op, backend, tensors, inputs.settings, state, output_final_state=True)
        except ValueError as error:
            _assert_names_an_argument(error, [*tensors, *inputs.settings, "initial_state"])
            continue
        outputs = {"o": o, **dict(state_items("final_state", final_state))}
        differentiable = {**tensors, **dict(float_items("initial_state", state))}
        loss = sum(x.sum() for x in outputs.values() if x.is_floating_point())
        grads = torch.autograd.grad(loss, list(differentiable.values()), allow_unused=True, materialize_grads=True)
        out = {**outputs, **{f"d{name}": grad for name, grad in zip(differentiable, grads, strict=True)}}
        assert {name: tuple(x.shape) for name, x in out.items()} == _shapes_at_zero(op_name, regime, dim, with_state)
        assert_result_dtypes(out, torch.float32)
        if o.numel() == 0:
            _assert_empty_call(out, dict(state_items("initial_state", state)), o.shape[1])


# ---- 10. the finite check ---------------------------------------------------------------------------------


def _arguments(op_name: str) -> list[str]:
    """The names of a call's tensors and initial-state tensors (``initial_state``, or ``initial_state[i]``)."""
    inputs = case_inputs(Case(op_name, _spec(op_name).regimes[0], ZERO_SIZE_T))
    return [*inputs.tensors, *(name for name, _ in state_items("initial_state", inputs.initial_state))]


FINITE_PARAMS = [pytest.param(op_name, argument, id=f"{op_name}-{argument}")
                 for op_name in OPS for argument in _arguments(op_name)]


@pytest.mark.parametrize("op_name, argument", FINITE_PARAMS)
def test_finite_check_names_the_first_bad_entry(op_name, argument):
    """With ``check_finite`` on, a call whose finite inputs pass gives the results it gives with the check
    off; one whose argument holds an infinity and then a NaN raises ValueError naming the argument,
    the infinity's index and value (and the op, unless the op's own validation reads that argument)."""
    op = OPS[op_name]
    inputs = case_inputs(Case(op_name, _spec(op_name).regimes[0], ZERO_SIZE_T))
    tensors, state = leaves_of(inputs, torch.float32, "cpu")
    unchecked = call(op, "auto", tensors, inputs.settings, state, output_final_state=True)
    with check_finite():
        checked = call(op, "auto", tensors, inputs.settings, state, output_final_state=True)
        def results(out):
            o, final_state = out
            return [o, *(part for _, part in state_items("s", final_state))]

        assert all(torch.equal(a, b) for a, b in zip(results(unchecked), results(checked), strict=True))
        target = {**tensors, **dict(state_items("initial_state", state))}[argument]
        first = target.numel() // 3
        with torch.no_grad():
            target.view(-1)[first : first + 2] = torch.tensor([torch.inf, torch.nan])[: target.numel() - first]
        index = [int(i) for i in torch.unravel_index(torch.tensor(first), target.shape)]
        message = rf"^({op_name}: argument )?{re.escape(argument)} holds inf at {re.escape(str(index))}"
        with pytest.raises(ValueError, match=message):
            call(op, "auto", tensors, inputs.settings, state)


# ---- 11. the dense-size limit ---------------------------------------------------------------------------

DENSE_T = 130  # long enough that the dense intermediate is the largest tensor of the forward


def dense_limit_params() -> list:
    """The first regime of every distinct settings of the CPU backends that declare a dense intermediate."""
    params = []
    for op_name, backend, device in entries():
        if device == "cpu" and OPS[op_name].backends[backend].materializes is not None:
            by_settings = {}
            for regime in taken_regimes(op_name, backend):
                by_settings.setdefault(regime_settings(op_name, regime), regime)
            params += [param(op_name, backend, device, r, id=r) for r in by_settings.values()]
    return params


def _largest_allocation(fn) -> int:
    """The bytes of the largest single CPU allocation while ``fn()`` runs (the profiler's count)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        fn()
    return max(event.cpu_memory_usage for event in profile.events())


@pytest.mark.parametrize("op_name, backend, device, regime", dense_limit_params())
def test_dense_limit_refuses_past_it_with_the_bytes_needed(op_name, backend, device, regime):
    """Past the limit the call raises ValueError naming the op, the backend, what it would build for
    which argument of which shape, the bytes and how to raise the limit; at the limit it runs, and
    the bytes are those of the largest tensor its forward allocates."""
    skip_unless_runnable(op_name, backend, device)
    op = OPS[op_name]
    inputs = case_inputs(Case(op_name, regime, DENSE_T))
    tensors, state = leaves_of(inputs, torch.float32, device)
    arguments = "|".join(map(re.escape, tensors))
    with limit_dense_bytes(0), pytest.raises(ValueError) as refused:
        call(op, backend, tensors, inputs.settings, state)
    needed = int(re.search(r"([\d,]+) bytes", str(refused.value)).group(1).replace(",", ""))
    assert re.match(rf"{op_name}: backend '{backend}' would build .* for ({arguments}) of shape \[[\d, ]+\].*: "
                    rf"{needed:,} bytes .*linmix\.ops\.limit_dense_bytes\(n\) or the environment variable "
                    r"LINMIX_MAX_DENSE_BYTES", str(refused.value)), refused.value
    with limit_dense_bytes(needed - 1), pytest.raises(ValueError, match=f"{needed:,} bytes"):
        call(op, backend, tensors, inputs.settings, state)
    with limit_dense_bytes(needed), torch.no_grad():
        assert _largest_allocation(lambda: call(op, backend, tensors, inputs.settings, state)) == needed


# ---- 12. the explicit operator ----------------------------------------------------------------------------

NO_MIXING_MATRIX: dict[str, str] = {}  # op -> why its spec gives no [T, T] operator (every op gives one now)


@pytest.mark.parametrize("op_name, backend, device, regime, T", matrix_params())
def test_output_is_the_mixing_matrix_times_the_values(op_name, backend, device, regime, T):
    """From a zero initial state, every head's output is the spec's mixing matrix times its values: the
    float64 operator of the inputs the backend reads (``matrix_reference``), within the op's float64
    tolerance on a backend that computes float64, its float32 tolerance for this backend otherwise."""
    skip_unless_runnable(op_name, backend, device)
    spec, op = _spec(op_name), OPS[op_name]
    dtype = exact_dtype(op.backends[backend])
    inputs = case_inputs(Case(op_name, regime, T, with_state=False))
    tensors = {name: x.to(device, dtype) for name, x in inputs.tensors.items()}
    with torch.no_grad():
        o, _ = call(op, backend, tensors, inputs.settings, None)
    expected = matrix_reference(spec, inputs, backend, dtype)
    ratio = spec.tolerance[dtype] if dtype == torch.float64 else spec.ratio(backend, dtype)
    per_head = (expected.unbind(2), o.unbind(2)) if o.dim() == 4 else ((expected,), (o,))
    for head, (ref, out) in enumerate(zip(*per_head, strict=True)):
        assert_close(f"o of head {head}", ref, out, **{**tolerance(spec, backend, dtype), "ratio": ratio})


def test_every_op_declares_its_mixing_matrix():
    """Every registered op's spec gives its mixing matrix, except the ops of ``NO_MIXING_MATRIX``, each
    registered and without one."""
    missing = [name for name in OPS if _spec(name).mixing_matrix is None and name not in NO_MIXING_MATRIX]
    assert not missing, f"ops whose test spec gives no mixing_matrix: {missing}"
    for name, reason in NO_MIXING_MATRIX.items():
        assert name in OPS, f"NO_MIXING_MATRIX names {name!r}, which is not a registered op"
        assert _spec(name).mixing_matrix is None, f"{name} gives a mixing_matrix but is listed: {reason}"
