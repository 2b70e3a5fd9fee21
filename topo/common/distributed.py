"""Where this process stands in a ``torch.distributed`` job (1 process when not distributed)."""
from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the job (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment; False when not launched by it.

    NCCL when CUDA is present, gloo otherwise; each process takes GPU ``LOCAL_RANK``.
    """
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def broadcast_buffers(module) -> None:
    """Give every process rank 0's buffers (e.g. BatchNorm running statistics); no-op without a group."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def same_on_all_ranks(value):
    """Rank 0's ``value`` (any picklable object) on every process; ``value`` itself without a group."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def every_rank(value) -> list:
    """Every process's ``value`` (picklable), indexed by rank; ``[value]`` without a group.

    A collective: every process must call it, which also makes it a barrier.
    """
    if not is_distributed():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def cleanup() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
