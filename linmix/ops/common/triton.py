"""Python-side helpers of the Triton backends: launch device, tiles, matrix-product options, chunk layout.

Nothing here imports triton at module load: the kernels' modules are imported at the first launch,
so that a test can switch Triton's interpreter on (``TRITON_INTERPRET=1``) after ``import linmix``.
"""

import contextlib
import dataclasses
import importlib
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current one while launching (Triton launches on the current device).

    CPU tensors are accepted only under Triton's interpreter (``TRITON_INTERPRET=1``).

    Raises:
        ValueError: ``x`` is not on a CUDA device and the interpreter is off.
    """
    if x.is_cuda:
        return torch.cuda.device(x.device)
    if not interpreting():
        raise ValueError(f"backend 'triton' needs CUDA tensors, got {x.device} (TRITON_INTERPRET=1 runs it on the CPU)")
    return contextlib.nullcontext()


def cdiv(n: int, d: int) -> int:
    """``ceil(n / d)`` for positive integers."""
    return -(-n // d)


def tile_size(n: int, block: int | None, largest: int) -> int:
    """``block`` if given, else the power of two covering ``n``, clamped to ``[16, largest]``."""
    return block or max(16, min(largest, 1 << (n - 1).bit_length()))


def dot_options(dtype: torch.dtype) -> dict:
    """How kernels multiply matrices of ``dtype`` inputs: ``PRECISION`` and the operand dtype ``DOT_DTYPE``.

    float32 inputs multiply exactly in float32; 16-bit ones in their own dtype with float32 sums.
    Triton's interpreter has no 16-bit matrix product, so there every product runs in float32.
    """
    tl = importlib.import_module("triton.language")
    if dtype == torch.float32 or interpreting():
        return dict(PRECISION="ieee", DOT_DTYPE=tl.float32)
    return dict(PRECISION="tf32", DOT_DTYPE=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16)


def sequential_block_v(x: torch.Tensor, programs_per_tile: int, V: int, BV: int, block_v: int | None) -> int:
    """The ``BV`` tile of a pass that runs sequentially over the chunks (a state recurrence).

    Such a pass has one program per ``BV`` tile times ``programs_per_tile`` (key tiles, sequences
    and heads). While those are fewer than the device's multiprocessors (long sequences in small
    batches), halve ``BV`` (down to 16) so that every multiprocessor runs one; an explicit
    ``block_v`` is kept.
    """
    processors = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    while block_v is None and BV > 16 and programs_per_tile * cdiv(V, BV) < processors:
        BV //= 2
    return BV


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How the rows of ``[B, T, ...]`` split into sequences and chunks of ``chunk`` positions.

    ``NT`` is the chunk count of every sequence without ``cu_seqlens``; ``n_chunks`` counts the
    chunks of the whole batch and ``n_seqs`` the sequences. With ``cu_seqlens``, ``chunk_indices``
    ``[n_chunks, 2]`` holds every chunk's sequence and position in it and ``chunk_offsets``
    ``[n_seqs]`` every sequence's first chunk (both int32). Buffers of one row per chunk get
    ``state_rows(B, T, cu_seqlens, chunk)`` rows, a bound on ``n_chunks`` known from the shapes alone.
    """

    T: int
    NT: int
    n_chunks: int
    n_seqs: int
    cu_seqlens: torch.Tensor | None
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None


def sequence_count(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """The number of sequences of ``x [B, T, ...]``: B, or one fewer than the entries of ``cu_seqlens``."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def state_rows(B: int, T: int, cu_seqlens: torch.Tensor | None, chunk: int) -> int:
    """Rows of per-chunk buffers: the chunk count, or with ``cu_seqlens`` its bound ``T // chunk + N``.

    Every one of ``N`` packed sequences adds at most one partial chunk, so the bound holds whatever
    the boundaries; it depends on shapes only, as ``torch.compile``'s fake tensors need.
    """
    return B * cdiv(T, chunk) if cu_seqlens is None else T // chunk + cu_seqlens.shape[0] - 1


def chunk_layout(B: int, T: int, cu_seqlens: torch.Tensor | None, chunk: int) -> ChunkLayout:
    """The chunk layout of a batch of ``B`` sequences of ``T`` positions, or of the packed ``cu_seqlens``."""
    if cu_seqlens is None:
        NT = cdiv(T, chunk)
        return ChunkLayout(T, NT, B * NT, B, None, None, None)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = (lengths + chunk - 1) // chunk  # [N], chunks of every sequence
    offsets = torch.cumsum(counts, 0) - counts  # [N], index of every sequence's first chunk
    n_chunks = int(counts.sum())
    seq = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    position = torch.arange(n_chunks, device=counts.device) - offsets[seq]
    chunk_indices = torch.stack([seq, position], dim=1).to(torch.int32).contiguous()
    return ChunkLayout(T, 0, n_chunks, len(counts), cu_seqlens.to(torch.int32).contiguous(), chunk_indices,
                       offsets.to(torch.int32).contiguous())
