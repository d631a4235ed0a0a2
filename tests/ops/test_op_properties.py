"""Property tests: every backend of every registered op equals ``naive`` in float64 on random shapes and dtypes.

For every regime of the spec (extreme gates, decays from 0.01 to 0.9999, every layout), Hypothesis
draws the dimensions from the spec's ``dim_ranges``, a length from 1 to 200 (1 and the lengths next
to a chunk boundary drawn often), whether to start from the initial state and the input dtype
(float64, float32 or bfloat16); every backend that runs natively on the CPU and takes the regime's
settings must then give the float64 reference's outputs, final state and gradients within the
spec's tolerance for that backend and dtype (bfloat16 cases round the inputs first, so the
reference reads what the backend reads). The Triton backends join under the CPU interpreter with a
few small examples in float32 and bfloat16: a single-tile width, lengths of one position, inside a
chunk and past one. Examples are derandomized, so CI sees the same ones.
"""

import pytest
import torch
from helpers import assert_all_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_harness import (
    FULL,
    REFERENCE,
    Case,
    budget,
    devices,
    reference,
    run,
    skip_unless_runnable,
    taken_regimes,
    tolerance,
)

from linmix.ops import OPS
from linmix.ops._testing import spec_of

MAX_T = 200
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
INTERPRETED_WIDTH = 8  # the largest dimension of the interpreted examples: within one tile
CPU = torch.device("cpu")
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw, op_name: str, regime: str, lengths, dtypes, widest: int | None = None) -> tuple[Case, torch.dtype]:
    """A random case of the op in ``regime``, and an input dtype.

    Args:
        draw: Hypothesis's draw.
        op_name: the op.
        regime: one of its spec's regimes.
        lengths: the strategy of T.
        dtypes: the input dtypes to draw from.
        widest: a cap on every dimension of the spec's ``dim_ranges`` (None: the ranges themselves).
    """
    spec = spec_of(OPS[op_name])
    dims = []
    for name, (low, high) in spec.dim_ranges.items():
        top = high if widest is None else max(low, min(high, widest))
        dims.append((name, draw(st.integers(low, top), label=name)))
    T = draw(lengths, label="T")
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    rounded_to = dtype if dtype.itemsize < 4 else None  # the reference reads the rounded inputs
    with_state = draw(st.booleans(), label="with_state")
    return Case(op_name, regime, T, with_state, dims=tuple(dims), rounded_to=rounded_to), dtype


def any_length(op_name: str) -> st.SearchStrategy[int]:
    """T from 1 to ``MAX_T``, with 1 and the lengths next to chunk boundaries drawn often."""
    chunk = spec_of(OPS[op_name]).chunk
    return st.one_of(st.sampled_from([1, chunk - 1, chunk, chunk + 1, 2 * chunk + 1]), st.integers(1, MAX_T))


def short_length(op_name: str) -> st.SearchStrategy[int]:
    """One position, a length inside the first chunk and one just past it (not a multiple of the chunk)."""
    chunk = spec_of(OPS[op_name]).chunk
    return st.sampled_from([1, chunk // 2 + 3, chunk + 1])


def native_backends(op_name: str, regime: str, dtype: torch.dtype) -> list[str]:
    """The backends that run natively on the CPU and take the regime's settings (the reference too,
    unless the inputs are float64: then it is the reference)."""
    op = OPS[op_name]
    return [name for name, backend in op.backends.items()
            if (name != REFERENCE or dtype != torch.float64) and budget(backend, "cpu") == FULL
            and backend.unavailable(CPU) is None and regime in taken_regimes(op_name, name)]


def _matches_reference(case: Case, backend: str, dtype: torch.dtype) -> None:
    assert_all_close(reference(case), run(case, backend, dtype), **tolerance(case.spec, backend, dtype))


REGIME_PARAMS = [pytest.param(op_name, regime, id=f"{op_name}-{regime}")
                 for op_name, op in OPS.items() for regime in spec_of(op).regimes]


@pytest.mark.parametrize("op_name, regime", REGIME_PARAMS)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_every_cpu_backend_matches_naive_on_random_shapes(op_name, regime, data):
    """Outputs, final state and every gradient of each CPU backend equal ``naive`` in float64."""
    case, dtype = data.draw(cases(op_name, regime, any_length(op_name), DTYPES), label="case")
    for backend in native_backends(op_name, regime, dtype):
        _matches_reference(case, backend, dtype)


INTERPRETED = [pytest.param(op_name, name, id=f"{op_name}-{name}") for op_name, op in OPS.items()
               for name, backend in op.backends.items()
               if backend.interpretable and "cpu" in devices(backend) and budget(backend, "cpu") != FULL]


@pytest.mark.parametrize("op_name, backend", INTERPRETED)
@settings(max_examples=4, **SETTINGS)
@given(data=st.data())
def test_interpreted_backends_match_naive_on_small_random_shapes(op_name, backend, data):
    """The Triton backends in the CPU interpreter (seconds a call): a few small cases of any regime they take."""
    skip_unless_runnable(op_name, backend, "cpu")
    regime = data.draw(st.sampled_from(taken_regimes(op_name, backend)), label="regime")
    case, dtype = data.draw(cases(op_name, regime, short_length(op_name), (torch.float32, torch.bfloat16),
                                  widest=INTERPRETED_WIDTH), label="case")
    _matches_reference(case, backend, dtype)
