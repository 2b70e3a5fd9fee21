"""`TrainConfig`: the training recipe (every setting, its default, its valid values) and `TrainResult`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn

from topo.common import distributed as dist_info
from topo.common.devices import resolve_device
from topo.common.errors import SettingError, UserError

SCHEDULES = ("cosine", "paper", "constant")


#: Configuration fields that may change between a run and its resumption.
RESUMABLE_CHANGES = frozenset({"progress", "workers", "device", "compile"})


class DivergenceError(UserError):
    """Training produced a NaN or infinite loss; the message names the epoch, the checkpoint kept and the fix."""


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is global: under torchrun each of N processes takes ``batch_size / N``.

    Schedules (stepped every iteration, after ``warmup_epochs`` of linear warm-up):
    ``cosine`` decays to 0 over the run; ``paper`` multiplies the rate by
    ``decay_factor`` (0.96) every ``decay_every`` (8) epochs, as in "Going
    deeper with convolutions"; ``constant`` keeps it. ``amp`` is bf16 autocast
    on CUDA (ignored on CPU); ``amp_dtype="float16"`` uses a gradient scaler.
    ``ema_decay`` (e.g. 0.999) keeps an exponential moving average of the
    weights (the paper's Polyak averaging), evaluated each epoch beside the
    model; None disables it. ``compile`` trains through ``torch.compile``
    (evaluation stays eager), each call of :func:`train` from empty compiler
    caches. ``sync_bn``: under torchrun, BatchNorm statistics computed over the
    global batch (``nn.SyncBatchNorm``, CUDA only); on one process a no-op.
    ``deterministic``: ``torch.use_deterministic_algorithms(True)`` with cuDNN's
    deterministic kernels and ``CUBLAS_WORKSPACE_CONFIG`` set, as torchvision's
    reference scripts do (the data loaders' workers are always seeded from
    ``seed + epoch``, see `topo.data.loader`).
    """

    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    decay_every: int = 8
    decay_factor: float = 0.96
    label_smoothing: float = 0.0
    aux_weight: float = 0.3
    ema_decay: float | None = None
    grad_clip: float | None = None
    device: str = "auto"
    amp: bool = True
    amp_dtype: str = "bfloat16"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    deterministic: bool = False
    seed: int = 0
    workers: int | str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise SettingError("schedule", f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0:
            raise SettingError(
                "epochs" if self.epochs < 0 else "batch_size" if self.batch_size < 1 else "lr",
                f"epochs ({self.epochs}), batch size ({self.batch_size}) and learning rate ({self.lr}) "
                f"must be non-negative (batch size at least 1)"
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise SettingError("ema_decay",
                               f"ema_decay {self.ema_decay} must lie strictly between 0 and 1 (or be None)")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise SettingError("amp_dtype", f"amp_dtype {self.amp_dtype!r} must be 'bfloat16' or 'float16'")
        if self.workers != "auto" and not (isinstance(self.workers, int) and self.workers >= 0):
            raise SettingError("workers",
                               f"workers {self.workers!r} must be 'auto' or a number of processes (0 or more)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise SettingError("label_smoothing", f"label_smoothing {self.label_smoothing} must be in [0, 1)")
        if not 0.0 <= self.momentum < 1.0:
            raise SettingError("momentum", f"momentum {self.momentum} must be in [0, 1)")
        for name in ("weight_decay", "warmup_epochs", "aux_weight"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"{name} {getattr(self, name)} is negative: use 0 or more")
        if not 0.0 < self.decay_factor <= 1.0:
            raise SettingError("decay_factor", f"decay_factor {self.decay_factor} must be in (0, 1]: the 'paper' "
                                              "schedule lowers the rate")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise SettingError("grad_clip", f"grad_clip {self.grad_clip} must be positive (or None: no clipping)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown training settings {unknown}; known ones are {sorted(known)}")
        return cls(**data)


@dataclass
class TrainResult:
    """What :func:`train` returns. ``model`` is trained and in eval mode; ``ema_model`` too (or None).

    ``train_time_s``: seconds spent in the training passes (evaluation excluded),
    summed over epochs; ``throughput``: training images per second of those
    passes; ``wall_time_s``: seconds of the whole epochs, evaluation included.
    Epochs trained before a resume count too.
    """

    history: pd.DataFrame
    final: dict[str, float]
    train_time_s: float
    wall_time_s: float
    throughput: float
    model: nn.Module
    ema_model: nn.Module | None = field(default=None, repr=False)


def check_sync_bn(config: TrainConfig) -> None:
    """A one-line error where ``sync_bn`` cannot work: several processes on the CPU (SyncBatchNorm is CUDA-only)."""
    if config.sync_bn and dist_info.is_distributed() and resolve_device(config.device).type == "cpu":
        raise UserError("--sync-bn (sync_bn) needs CUDA devices: nn.SyncBatchNorm does not train on the CPU; "
                        "drop --sync-bn, or train on GPUs")
