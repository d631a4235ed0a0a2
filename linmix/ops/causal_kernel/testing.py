"""causal_kernel's test spec: both forms and every kernel layout as regimes, tolerances and refused calls.

Regimes: ``toeplitz_shared_3d`` (an ``[L]`` filter on ``[B, T, D]``), ``toeplitz_shared_4d`` (on
``[B, T, H, D]``), ``toeplitz_per_head`` (``[H, L]``), ``toeplitz_long`` (``[H, 32]``, longer than
the short sequences), ``toeplitz_one_tap`` (``[H, 1]``), ``dense_3d`` and ``dense_4d`` (a
``[W, W]`` kernel with a window just past the sequence and its state).
"""

import torch

from linmix.ops._testing import BadInput, OpInputs, OpTestSpec, randn, replaced
from linmix.ops.mixing_matrix import causal_kernel_matrix

REGIMES = ("toeplitz_shared_3d", "toeplitz_shared_4d", "toeplitz_per_head", "toeplitz_long", "toeplitz_one_tap",
           "dense_3d", "dense_4d")
DENSE_PAST = 3  # positions a dense form's initial state holds
TAPS = {"toeplitz_long": 32, "toeplitz_one_tap": 1}


def make_inputs(dims: dict, regime: str, generator: torch.Generator) -> OpInputs:
    """x, a kernel of the regime's form and layout, and an initial state of the inputs before x.

    ``dims``: ``B, T, H, D`` and ``L`` (the taps of the Toeplitz regimes that do not fix their own).
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown causal_kernel regime {regime!r}; regimes: {', '.join(REGIMES)}")
    B, T, H, D = (dims[key] for key in "BTHD")
    channels = (D,) if regime.endswith("_3d") else (H, D)
    x = randn(generator, B, T, *channels)
    if regime.startswith("dense"):
        window = DENSE_PAST + T + 2
        kernel, form, past = randn(generator, window, window), "dense", DENSE_PAST
    else:
        L = TAPS.get(regime, dims["L"])
        kernel = randn(generator, L) if "shared" in regime else randn(generator, H, L)
        form, past = "toeplitz", max(L - 1, 0)  # L = 0 is refused by the op, not here
    return OpInputs({"x": x, "kernel": kernel}, {"form": form}, randn(generator, B, past, *channels))


def mixing_matrix(tensors: dict, settings: dict, backend: str) -> torch.Tensor:
    """``M`` of a call without past inputs: ``[T, T]`` (dense, shared filter) or ``[H, T, T]`` (per head)."""
    return causal_kernel_matrix(tensors["kernel"], tensors["x"].shape[1], form=settings["form"])


def _bad_inputs() -> dict[str, BadInput]:
    """Calls the validation refuses; the valid call is x ``[2, 5, 5]`` with a shared ``[8]`` filter (float32)."""
    B, H, D = 2, 3, 5
    x = torch.zeros  # shapes and dtypes are what these calls get wrong
    return {
        "x_not_tensor": BadInput(replaced(x=[[1.0]]), TypeError, r"x must be a torch.Tensor"),
        "x_int_dtype": BadInput(replaced(x=torch.ones(B, 5, D, dtype=torch.int64)), TypeError,
                                r"x must have a floating dtype"),
        "x_2d": BadInput(replaced(x=x(5, D)), ValueError,
                         r"x must be \[B, T, D\] or \[B, T, H, D\], got shape \[5, 5\]"),
        "x_5d": BadInput(replaced(x=x(B, 5, H, D, 1)), ValueError, r"x must be \[B, T, D\] or \[B, T, H, D\]"),
        "T_zero_packed": BadInput(replaced(x=x(1, 0, D), initial_state=None, cu_seqlens=torch.tensor([0, 0])),
                                  ValueError, r"cu_seqlens must be strictly increasing .*sequence 0 from 0 to 0"),
        "kernel_0d": BadInput(replaced(kernel=x(())), ValueError,
                              r"kernel must be \[W, W\] \(dense\), \[L\] or \[H, L\]"),
        "kernel_3d": BadInput(replaced(kernel=x(H, 4, 4)), ValueError, r"kernel must be .*got shape \[3, 4, 4\]"),
        "kernel_dtype": BadInput(replaced(kernel=x(8, dtype=torch.float64)), TypeError,
                                 r"kernel has dtype torch.float64"),
        "kernel_device": BadInput(replaced(kernel=torch.empty(8, device="meta")), ValueError, r"kernel is on meta"),
        "kernel_no_taps": BadInput(replaced(kernel=x(0), initial_state=None), ValueError,
                                   r"kernel must have at least one tap"),
        "per_head_H_mismatch": BadInput(replaced(x=x(B, 5, H, D), kernel=x(H + 1, 6), initial_state=None), ValueError,
                                        r"per-head kernel .*H=4"),
        "per_head_on_3d_x": BadInput(replaced(kernel=x(H, 4), initial_state=None), ValueError,
                                     r"per-head kernel \[H, L\] = \[3, 4\] needs x"),
        "dense_not_square": BadInput(replaced(kernel=x(6, 7), form="dense", initial_state=None), ValueError,
                                     r"kernel .*square \[W, W\], got .*\[6, 7\]"),
        "dense_1d": BadInput(replaced(kernel=x(6), form="dense", initial_state=None), ValueError,
                             r"kernel .*square \[W, W\]"),
        "T_exceeds_W": BadInput(replaced(kernel=x(4, 4), form="auto", initial_state=None), ValueError,
                                r"sequence length T=5 .*exceeds the kernel window W=4"),
        "form_unknown": BadInput(replaced(form="fft"), ValueError,
                                 r"unknown form 'fft'; valid names are 'auto', 'dense', 'toeplitz'"),
        "backend_unknown": BadInput(replaced(backend="fft"), ValueError,
                                    r"unknown backend 'fft'; valid names are 'naive'"),
        "conv_for_dense": BadInput(replaced(kernel=x(6, 6), form="dense", initial_state=None, backend="conv"),
                                   ValueError,
                                   r"backend 'conv' of causal_kernel takes form='toeplitz' only, not form='dense'"),
        "initial_state_taps": BadInput(replaced(initial_state=x(B, 3, D)), ValueError,
                                       r"initial_state must have shape .*P = L - 1"),
        "initial_state_channels": BadInput(replaced(initial_state=x(B, 7, D + 1)), ValueError,
                                           r"initial_state must have shape"),
    }


SPEC = OpTestSpec(
    op="causal_kernel",
    make_inputs=make_inputs,
    dims={"B": 2, "H": 3, "D": 5, "L": 8},
    regimes=REGIMES,
    bad_inputs=_bad_inputs(),
    dim_ranges={"B": (1, 3), "H": (1, 3), "D": (1, 24), "L": (1, 20)},
    chunk=32,  # the Triton kernel's tile of positions
    mixing_matrix=mixing_matrix,
    values="x",
)
