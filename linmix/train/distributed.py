"""Training on several processes with torch.distributed: the process group torchrun describes,
the model's DistributedDataParallel or FSDP2 (`fully_shard`) wrapping, and the few collectives
the Trainer needs. Every collective is a torch.distributed call; a process without a process group
(no torchrun) gets the single-process answer from each function.

See docs/DISTRIBUTED.md for the commands, the batch semantics and what each rank writes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from linmix.errors import LinmixError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# NCCL runs with NVLink multicast (NVLS) off on the project's GPU machines, unless the user sets
# the variable (docs/DISTRIBUTED.md).
NVLS_VARIABLE = "NCCL_NVLS_ENABLE"
_FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class DistributedSetupError(LinmixError, RuntimeError):
    """Distributed training was asked for where it cannot run (e.g. `--fsdp` without torchrun)."""


class ProcessPlace(NamedTuple):
    """Where this process trains.

    Attributes:
        rank: this process's rank, 0 without torchrun.
        world_size: processes in the run, 1 without torchrun.
        device: the torch device string this process trains on.
    """

    rank: int
    world_size: int
    device: str


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@contextlib.contextmanager
def distributed_context(device: str = "cpu", fsdp: bool = False) -> Iterator[ProcessPlace]:
    """Join the process group torchrun describes for the block's duration, then leave it.

    Under torchrun a CUDA `device` becomes `cuda:LOCAL_RANK` and the backend is NCCL (with
    `NCCL_NVLS_ENABLE=0` unless set); a CPU device uses gloo. Without torchrun nothing is set up
    and the block runs as one process on `device`.

    Args:
        device: the requested device, "cpu", "cuda" or "cuda:N" (N is replaced by LOCAL_RANK).
        fsdp: FSDP2 will shard the model; it needs torchrun.

    Yields:
        `(rank, world_size, device)` of this process.

    Raises:
        DistributedSetupError: `fsdp` without torchrun, or a device type other than cpu and cuda
            under torchrun.
    """
    if not launched_by_torchrun():
        if fsdp:
            raise DistributedSetupError(
                "--fsdp shards the model over several processes: launch with "
                "`torchrun --nproc_per_node N -m linmix train ... --fsdp`"
            )
        yield ProcessPlace(0, 1, device)
        return
    rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    device_type = torch.device(device).type
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        os.environ.setdefault(NVLS_VARIABLE, "0")
        dist.init_process_group("nccl", device_id=torch.device(device))
    elif device_type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise DistributedSetupError(f"torchrun training runs on cpu or cuda, not {device}")
    try:
        yield ProcessPlace(rank, world_size, device)
    finally:
        dist.destroy_process_group()


def process_rank() -> int:
    """This process's rank in the process group; 0 without one."""
    return dist.get_rank() if dist.is_initialized() else 0


def process_world_size() -> int:
    """Processes in the process group; 1 without one."""
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks once it is done (e.g. a download
    into a shared cache); a plain block without a process group."""
    if process_world_size() > 1 and process_rank() != 0:
        dist.barrier()
    yield
    if process_world_size() > 1 and process_rank() == 0:
        dist.barrier()


def wait_for_ranks() -> None:
    """Return once every rank has called this (a barrier); at once without a process group."""
    if process_world_size() > 1:
        dist.barrier()


def replicate_model(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap a model for data-parallel training: its gradients are averaged over the ranks in
    backward, and rank 0's weights are copied to every rank now.

    The graph is declared static (`static_graph=True`): the parameters a step leaves without a
    gradient (such as the K-Operators' `eta_logit` without refinement steps) are found in the
    first step, not searched for in every one. Buffers are not synchronised in forward: linmix
    models hold no trained buffers.

    Args:
        model: the model, already on `device`.
        device: this rank's device.

    Returns:
        The DDP wrapper; `model` itself keeps the parameters.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, broadcast_buffers=False, static_graph=True
    )


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard a model with FSDP2 over all ranks: each block (every module of an nn.ModuleList),
    deepest first, then the root. The shards move to `device`, so the whole model need not fit
    there.

    Every rank must have built the same weights (seed the global RNG alike).

    Args:
        model: the model, on the CPU or on `device`.
        device: this rank's device.

    Returns:
        `model` itself, whose parameters are now DTensors sharded on dim 0.

    Raises:
        ValueError: the model has 0-dim parameters, which FSDP2 cannot shard (they are named).
    """
    scalars = [name for name, parameter in model.named_parameters() if parameter.ndim == 0]
    if scalars:
        raise ValueError(
            f"FSDP2 cannot shard 0-dim parameters, and the model has {len(scalars)}: "
            f"{', '.join(scalars[:4])}{', ...' if len(scalars) > 4 else ''}; train it with DDP "
            "(without --fsdp)"
        )
    mesh = init_device_mesh(device.type, (process_world_size(),))
    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    for block in reversed(blocks):  # a nested block comes after its parent in modules()
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value as a plain tensor (a collective for sharded ones); any other
    tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over the ranks (all_reduce), the same on every rank.

    Args:
        tensor: a tensor of the same shape on every rank; it is left unchanged.

    Returns:
        A new tensor; `tensor` itself without a process group.
    """
    if process_world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank.

    Args:
        value: this rank's value.

    Returns:
        `[value of rank 0, value of rank 1, ...]`; `[value]` without a process group.
    """
    if process_world_size() == 1:
        return [value]
    values: list[Any] = [None] * process_world_size()
    dist.all_gather_object(values, value)
    return values


def full_model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The model's whole state dict, loadable into the unwrapped model by one process.

    Args:
        model: the model (the unwrapped one under DDP).
        sharded: the model is sharded by `shard_model`; then every rank must call this
            (it gathers the shards) and only rank 0 gets the tensors, on the CPU.

    Returns:
        The state dict; `{}` on the other ranks when `sharded`.
    """
    if not sharded:
        return model.state_dict()
    return get_model_state_dict(model, options=_FULL_STATE)


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool
) -> dict[str, Any]:
    """The optimizer's whole state dict.

    Args:
        model: the model the optimizer trains.
        optimizer: its optimizer.
        sharded: as in `full_model_state`; the state is then keyed by parameter name (as
            `torch.distributed.checkpoint.state_dict` writes it), not by parameter index.

    Returns:
        `optimizer.state_dict()`, or the gathered full state on rank 0 (`{}` elsewhere).
    """
    if not sharded:
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=_FULL_STATE)


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    sharded: bool,
) -> None:
    """Load what `full_model_state` and `full_optimizer_state` returned, on every rank.

    Args:
        model: the model (the unwrapped one under DDP).
        optimizer: its optimizer.
        model_state: the whole model state dict (every rank holds it).
        optimizer_state: the whole optimizer state dict.
        sharded: the model is sharded; each rank keeps its shards of the states.
    """
    if not sharded:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
