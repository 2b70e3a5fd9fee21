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


def available_devices() -> list[str]:
    """The devices this machine has: ``cpu``, each CUDA device (``cuda:N``), ``mps`` where present."""
    found = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    return [*found, "mps"] if _has_mps() else found


def _has_mps() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _is_available(device: torch.device) -> bool:
    """Whether this machine has ``device`` (an accelerator type other than CUDA and MPS: where torch's module
    of that name says it is available and has the index)."""
    index = device.index or 0
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return index < torch.cuda.device_count()
    if device.type == "mps":
        return index == 0 and _has_mps()
    backend = getattr(torch, device.type, None)  # torch.xpu, torch.mtia, ...; none for meta
    try:
        return bool(backend.is_available()) and index < backend.device_count()
    except (AttributeError, RuntimeError):
        return False


def check_device(device: str | torch.device | None) -> torch.device:
    """The device ``device`` (``--device``) names, or a one-line error where this machine has no such device:
    an unknown name, or a device that is not here (``mps`` without Apple's GPU, ``cuda:7`` with fewer GPUs),
    naming what is available."""
    try:
        resolved = resolve_device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} (--device) is not a device name: use auto, cpu, cuda, cuda:N or mps "
                        f"(available: {', '.join(available_devices())})") from None
    if not _is_available(resolved):
        what = (f": this machine has {torch.cuda.device_count()} CUDA device(s)" if resolved.type == "cuda"
                else " is not on this machine")
        raise UserError(f"device {str(device)!r} (--device){what} (available: {', '.join(available_devices())}); "
                        "use --device auto or one of those")
    return resolved
