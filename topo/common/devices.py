"""The machine: which device a name means, how many CPUs this process may use, and one device check."""
from __future__ import annotations

import os

import torch

from topo.common.errors import UserError

#: Activations held in memory at once, at most: a recording's replayed batches (`topo.stats.record`), the
#: construction's carried outputs (`topo.construct.prefix.CarriedOutputs`).
ACTIVATION_BYTES = 2 << 30


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) is CUDA when available, else CPU; under torchrun, CUDA is ``cuda:$LOCAL_RANK``."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def available_cpus() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_device(device: str) -> torch.device:
    """The device ``device`` (``--device``) names, or a one-line error where this machine has no such device."""
    try:
        resolved = resolve_device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} (--device) is not a device name: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {device!r} (--device): this machine has {torch.cuda.device_count()} CUDA "
                        "device(s); use --device auto or cpu")
    return resolved
