"""Property tests: every CPU backend of every registered op equals ``naive`` in float64 on random shapes.

Hypothesis draws the dimensions from the spec's ``dim_ranges``, a length from 1 to 200 (1 and the
lengths next to a chunk boundary drawn often), a regime and whether to start from the initial state;
every backend that runs natively on the CPU and takes the regime's settings must then give the
reference's outputs, final state and gradients. Triton's interpreter is too slow for many examples:
its backends are left to the contract suite. Examples are derandomized, so CI sees the same ones.
"""

import pytest
import torch
from helpers import assert_all_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_harness import FULL, REFERENCE, Case, budget, reference, run, taken_regimes, tolerance

from linmix.ops import OPS
from linmix.ops._testing import spec_of

MAX_T = 200


@st.composite
def cases(draw, op_name: str) -> Case:
    """A random case of the op: dimensions in the spec's ranges, T in 1..MAX_T, a regime, with or without a state."""
    spec = spec_of(OPS[op_name])
    dims = tuple((name, draw(st.integers(low, high), label=name)) for name, (low, high) in spec.dim_ranges.items())
    near_chunks = [1, spec.chunk - 1, spec.chunk, spec.chunk + 1, 2 * spec.chunk + 1]
    T = draw(st.one_of(st.sampled_from(near_chunks), st.integers(1, MAX_T)), label="T")
    regime = draw(st.sampled_from(spec.regimes), label="regime")
    return Case(op_name, regime, T, draw(st.booleans(), label="with_state"), dims=dims)


def native_backends(op_name: str, regime: str) -> list[str]:
    """The backends other than the reference that run natively on the CPU and take the regime's settings."""
    op = OPS[op_name]
    return [name for name, backend in op.backends.items()
            if name != REFERENCE and budget(backend, "cpu") == FULL
            and backend.unavailable(torch.device("cpu")) is None and regime in taken_regimes(op_name, name)]


@pytest.mark.parametrize("op_name", list(OPS))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_cpu_backend_matches_naive_on_random_shapes(op_name, data):
    """Outputs, final state and every gradient of each CPU backend equal ``naive`` in float64."""
    case = data.draw(cases(op_name), label="case")
    ref = reference(case)
    for backend in native_backends(op_name, case.regime):
        assert_all_close(ref, run(case, backend, torch.float64), **tolerance(case.spec, backend, torch.float64))
