"""The trainer: SGD with momentum, schedules, label smoothing, auxiliary heads, EMA,
mixed precision, checkpoints that resume exactly, and DistributedDataParallel.

    result = train(model, bundle.train, bundle.val, TrainConfig(epochs=30), run_dir="runs/a")
    result.history            # one row of metrics per epoch (also runs/a/model_metrics.csv)

Under ``torchrun --nproc_per_node=N`` (with the process group initialised by
the caller) the same call trains with DistributedDataParallel: the batch size
is global and split over the processes, each process sees its own shard of
the data, metrics are summed over all processes without padding, and only
rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from topo.common import distributed as dist_info
from topo.common.devices import resolve_device
from topo.common.errors import UserError
from topo.common.progress import progress_bar
from topo.common.seeding import capture_rng_state, restore_rng_state, seed_everything
from topo.common.writing import atomic_path, atomic_torch_save
from topo.data import take_skipped
from topo.data.loader import EpochLoader, SeededSampler, ShardSampler, make_loader
from topo.train.config import (
    RESUMABLE_CHANGES,
    DivergenceError,
    TrainConfig,
    TrainResult,
    check_sync_bn,
)
from topo.train.files import TrainingFiles, read_checkpoint

log = logging.getLogger(__name__)


HISTORY_COLUMNS = [
    "epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
    "ema_val_top1", "ema_val_top5", "epoch_time_s", "train_time_s", "train_images",
]


@dataclass
class LRSchedule:
    """The learning-rate factor at optimiser step ``step`` (a picklable ``LambdaLR`` lambda)."""

    schedule: str
    steps_per_epoch: int
    epochs: int
    warmup_epochs: float = 0.0
    decay_every: int = 8
    decay_factor: float = 0.96

    def __call__(self, step: int) -> float:
        warmup = round(self.warmup_epochs * self.steps_per_epoch)
        if step < warmup:
            return (step + 1) / warmup
        if self.schedule == "paper":
            return self.decay_factor ** (step // self.steps_per_epoch // self.decay_every)
        if self.schedule == "cosine":
            total = max(1, self.epochs * self.steps_per_epoch - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))
        return 1.0


def split_output(output: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Main logits and auxiliary logits of a network's output.

    Accepts a tensor, ``builders.NetworkOutput(logits, aux_logits)`` and
    torchvision's ``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)``.
    """
    if isinstance(output, torch.Tensor):
        return output, ()
    if hasattr(output, "logits"):
        if hasattr(output, "aux_logits"):
            aux = output.aux_logits
            aux = (aux,) if isinstance(aux, torch.Tensor) else tuple(aux or ())
        else:
            aux = tuple(v for k, v in output._asdict().items() if k != "logits")
        return output.logits, tuple(a for a in aux if a is not None)
    raise TypeError(f"a network returned {type(output).__name__}; expected a tensor or NetworkOutput")


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Iterable[int]) -> list[torch.Tensor]:
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return [hits[:, :k].any(dim=1).sum() for k in ks]


def _autocast(device: torch.device, config: TrainConfig | None) -> contextlib.AbstractContextManager:
    if config is not None and config.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, config.amp_dtype))
    return contextlib.nullcontext()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 256,
    config: TrainConfig | None = None,
) -> dict[str, float]:
    """Loss (plain cross-entropy), top-1 and top-5 accuracy (fractions) and sample count of ``model``.

    Top-5 becomes top-k with k = number of classes when there are fewer than 5.
    A data set is wrapped in an evaluation loader, sharded without padding
    under torchrun; sums are then reduced over all processes, so every process
    gets the metrics of the whole data set. ``config`` supplies autocast and
    channels_last.
    """
    device = resolve_device(device)
    loader = data if isinstance(data, DataLoader) else make_loader(
        data, batch_size=batch_size, train=False, device=device,
        workers=config.workers if config else "auto",
    )
    channels_last = bool(config and config.channels_last)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-k, count
    try:
        for x, y in loader:
            x, y = _to_device(x, device, channels_last), y.to(device, non_blocking=True)
            with _autocast(device, config):
                logits, _ = split_output(model(x))
            logits = logits.float()
            k = min(5, logits.shape[1])
            top1, topk = _topk_correct(logits, y, (1, k))
            loss = F.cross_entropy(logits, y, reduction="sum")
            readable = (y >= 0).sum().double()  # an unreadable image's slot has target -100 (ImageTree), ignored
            sums += torch.stack([loss.double(), top1.double(), topk.double(), readable])
    finally:
        model.train(was_training)
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, SeededSampler):  # an image data set's: the shard is the sampler it seeds
        sampler = sampler.sampler
    if isinstance(sampler, ShardSampler) and sampler.num_replicas > 1 and dist_info.is_distributed():
        dist.all_reduce(sums)
    loss, top1, topk, count = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": top1 / count, "top5": topk / count, "count": int(count)}


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    for key, value in config.to_dict().items():
        if key in RESUMABLE_CHANGES or saved.get(key, value) == value:
            continue
        raise UserError(
            f"checkpoint {path} was written with {key}={saved[key]!r}, not {value!r}; "
            f"train into a new run directory or pass resume=False to start over"
        )


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(history, columns=HISTORY_COLUMNS).to_csv(tmp, index=False)


def _tensorboard(directory: Path) -> Any:
    """A TensorBoard writer into ``directory``, or None where tensorboard is not installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every process's RNG state (collective under torchrun), indexed by rank."""
    return dist_info.every_rank(capture_rng_state())


def _skipped_images(datasets: Iterable[Dataset], device: torch.device) -> list[int]:
    """Reads of unreadable images each data set skipped since the last call, summed over all
    processes (collective under torchrun)."""
    counts = torch.tensor([take_skipped(data) for data in datasets], dtype=torch.int64, device=device)
    if dist_info.is_distributed():
        dist.all_reduce(counts)
    return counts.tolist()


@dataclass
class _TrainingState:
    """The objects a checkpoint holds, besides RNG states and history."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    #: called on the model after each backward pass, on unscaled gradients, before the step (`train`'s argument)
    after_backward: Callable[[nn.Module], None] | None = None

    @classmethod
    def create(cls, model: nn.Module, config: TrainConfig, device: torch.device, steps_per_epoch: int,
               after_backward: Callable[[nn.Module], None] | None = None) -> _TrainingState:
        decay, no_decay = [], []  # no weight decay on biases and normalisation parameters
        for param in model.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, momentum=config.momentum,
        )
        schedule = LRSchedule(config.schedule, steps_per_epoch, config.epochs, config.warmup_epochs,
                              config.decay_every, config.decay_factor)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        fp16 = config.amp and device.type == "cuda" and config.amp_dtype == "float16"
        scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        ema = None
        if config.ema_decay is not None:
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        return cls(model, optimizer, scheduler, scaler, ema, after_backward)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved disabled (CPU, bf16): an enabled scaler then starts afresh
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def _train_epoch(
    net: nn.Module, training: _TrainingState, batches: tqdm, config: TrainConfig, device: torch.device
) -> tuple[float, float, float]:
    """One pass over the training data; returns the summed loss, correct count and sample count
    over all processes. ``net`` is the model as called (DDP- or compile-wrapped)."""
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    optimizer, scaler = training.optimizer, training.scaler
    training.model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # kept on the device: no sync per step
    for step, (x, y) in enumerate(batches):
        x, y = _to_device(x, device, config.channels_last), y.to(device, non_blocking=True)
        with _autocast(device, config):
            logits, aux = split_output(net(x))
            loss = criterion(logits, y)
            for aux_logits in aux:
                loss = loss + config.aux_weight * criterion(aux_logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip is not None or training.after_backward is not None:
            scaler.unscale_(optimizer)
        if training.after_backward is not None:
            training.after_backward(training.model)
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(training.model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        training.scheduler.step()
        if training.ema is not None:
            training.ema.update_parameters(training.model)
        correct = logits.detach().argmax(dim=1).eq(y).sum()
        sums += torch.stack([loss.detach().double() * len(y), correct.double(), sums.new_tensor(len(y))])
        if step % 20 == 0 and not batches.disable:
            batches.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
    if dist_info.is_distributed():
        dist.all_reduce(sums)
    loss_sum, correct, count = sums.tolist()
    return loss_sum, correct, count


def _check_processes(config: TrainConfig) -> tuple[int, int]:
    """(rank, world size), with one-line errors for a half-initialised launch or an indivisible batch."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and not dist_info.is_distributed():
        raise UserError(
            f"launched as one of {launched} processes (WORLD_SIZE) but torch.distributed is not initialised; "
            f"initialise the process group before calling train"
        )
    check_sync_bn(config)
    world = dist_info.world_size()
    if config.batch_size % world:
        raise UserError(f"batch size {config.batch_size} is not divisible by the {world} processes; choose a multiple")
    return dist_info.rank(), world


def _resume(training: _TrainingState, path: Path, config: TrainConfig, name: str) -> tuple[int, list[dict]]:
    """Load the checkpoint at ``path`` into ``training``; returns (epochs done, history so far)."""
    # RNG states must stay on the CPU; load_state_dict moves the rest to the model's device
    state = read_checkpoint(path, resumable=True)
    _check_resumable(state["config"], config, path)
    try:
        training.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), type(e).__name__)
        raise UserError(f"checkpoint {path} holds another network or optimiser than this training ({detail}); "
                        "train into a new run directory, or move the checkpoint away to start over") from None
    rank, world = dist_info.rank(), dist_info.world_size()
    if len(state["rng"]) == world:
        restore_rng_state(state["rng"][rank])
    else:
        log.warning("checkpoint %s has RNG states for %d processes, not %d: random streams restart",
                    path, len(state["rng"]), world)
    log.info("resuming %s from %s after epoch %d of %d", name, path, state["epoch"], config.epochs)
    return state["epoch"], list(state["history"])


def _sync_batchnorm(model: nn.Module, config: TrainConfig) -> nn.Module:
    """``model`` with SyncBatchNorm layers under torchrun when ``config.sync_bn`` (the same parameters and
    buffers, so the optimiser, the EMA and checkpoints are unchanged); on one process ``model`` as it is."""
    if not config.sync_bn:
        return model
    if not dist_info.is_distributed():
        log.info("--sync-bn: one process, nothing to synchronise; BatchNorm layers left as they are")
        return model
    log.info("--sync-bn: BatchNorm statistics over the global batch of %d processes", dist_info.world_size())
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Inside the block (when ``enabled``): ``torch.use_deterministic_algorithms(True)``, cuDNN's deterministic
    kernels without benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set; the previous
    settings are restored after (the environment variable stays: cuBLAS reads it once)."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    except RuntimeError as e:
        if "does not have a deterministic implementation" not in str(e):
            raise
        op = str(e).split(" does not have", 1)[0].strip().split()[-1]
        raise UserError(f"--deterministic: {op} has no deterministic implementation on this device; drop "
                        "--deterministic (or train on the CPU, where every operation here is deterministic)") from None
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def _wrap(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """The model as the training step calls it: DDP-wrapped under torchrun (with SyncBatchNorm layers with
    ``config.sync_bn``), compiled with ``config.compile``."""
    net = _sync_batchnorm(model, config)
    if dist_info.is_distributed():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        # fresh caches: networks trained one after another in a process (the construction's prefixes) would
        # otherwise reach dynamo's recompile limit (8 per function) and silently run uncompiled from then on
        torch.compiler.reset()
        net = torch.compile(net)
    return net


def _epoch_row(epoch: int, lr: float, train_sums: tuple[float, float, float], metrics: dict[str, float],
               ema_metrics: dict[str, float] | None, epoch_time: float, train_time: float) -> dict[str, float]:
    """One row of the history (see HISTORY_COLUMNS)."""
    loss_sum, correct, count = train_sums
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": loss_sum / count,
        "train_top1": correct / count,
        "val_loss": metrics["loss"],
        "val_top1": metrics["top1"],
        "val_top5": metrics["top5"],
        "ema_val_top1": ema_metrics["top1"] if ema_metrics else math.nan,
        "ema_val_top5": ema_metrics["top5"] if ema_metrics else math.nan,
        "epoch_time_s": epoch_time,
        "train_time_s": train_time,
        "train_images": int(count),
    }


def _run_epoch(net: nn.Module, training: _TrainingState, loaders: tuple[EpochLoader, EpochLoader],
               datasets: tuple[Dataset, Dataset], config: TrainConfig, device: torch.device, epoch: int,
               name: str) -> dict[str, float]:
    """Train one epoch, evaluate the model (and its EMA), and return the epoch's history row."""
    train_loader, val_loader = loaders
    start = time.perf_counter()
    train_loader.set_epoch(epoch)
    lr = training.optimizer.param_groups[0]["lr"]
    bar = progress_bar(train_loader, desc=f"{name} {epoch + 1}/{config.epochs}", leave=False,
                       disable=not (config.progress and dist_info.rank() == 0))
    sums = _train_epoch(net, training, bar, config, device)
    train_time = time.perf_counter() - start

    # DDP syncs BatchNorm statistics only before each forward: evaluate rank 0's model everywhere
    model, ema = training.model, training.ema
    dist_info.broadcast_buffers(model)
    if ema is not None:
        dist_info.broadcast_buffers(ema)
    metrics = evaluate(model, val_loader, device=device, config=config)
    skipped = _skipped_images(datasets, device)  # collective: every rank
    ema_metrics = None
    if ema is not None:
        ema_metrics = evaluate(ema.module, val_loader, device=device, config=config)
        take_skipped(datasets[1])  # the same validation images again: counted once
    row = _epoch_row(epoch, lr, sums, metrics, ema_metrics, time.perf_counter() - start, train_time)
    log.info("%s epoch %d/%d: train loss %.4f top-1 %.4f, val loss %.4f top-1 %.4f top-5 %.4f",
             name, epoch + 1, config.epochs, row["train_loss"], row["train_top1"],
             row["val_loss"], row["val_top1"], row["val_top5"])
    if any(skipped) and dist_info.rank() == 0:
        log.warning("%s epoch %d: skipped unreadable images, %d in training and %d in validation",
                    name, epoch + 1, *skipped)
    return row


def _check_finite(row: dict[str, float], name: str, config: TrainConfig, files: TrainingFiles | None) -> None:
    """A :class:`DivergenceError` if the epoch's training or validation loss is NaN or infinite."""
    losses = {"training": row["train_loss"], "validation": row["val_loss"]}
    bad = [f"the {kind} loss is {value}" for kind, value in losses.items() if not math.isfinite(value)]
    if not bad:
        return
    epoch = int(row["epoch"])
    kept = (f"the checkpoint of epoch {epoch - 1} is kept in {files.checkpoint(name)}"
            if files is not None and epoch > 1 else "no checkpoint was written")
    raise DivergenceError(
        f"{name} diverged in epoch {epoch} of {config.epochs}: {' and '.join(bad)}; {kept}. Lower the learning "
        f"rate (now {config.lr:g}) or clip the gradients (grad_clip / --grad-clip, e.g. 1), and train into a new "
        "run directory"
    )


def _save_epoch(files: TrainingFiles | None, name: str, training: _TrainingState, config: TrainConfig,
                history: list[dict[str, float]], writer: Any) -> None:
    """Checkpoint and metrics after an epoch (rank 0 writes; every rank joins the RNG gather)."""
    if files is None:
        return
    rng_states = _gather_rng_states()  # collective: every rank
    if dist_info.rank() != 0:
        return
    checkpoint = {"format": 1, "epoch": len(history), **training.state_dict(), "rng": rng_states,
                  "config": config.to_dict(), "history": history}
    atomic_torch_save(checkpoint, files.checkpoint(name))
    _write_history(files.metrics(name), history)
    if writer is not None:
        for key, value in history[-1].items():
            if key != "epoch" and not (isinstance(value, float) and math.isnan(value)):
                writer.add_scalar(f"{name}/{key}", value, len(history))
        writer.flush()


def _result(training: _TrainingState, history: list[dict[str, float]]) -> TrainResult:
    frame = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    train_time = float(frame["train_time_s"].sum())
    images = float(frame["train_images"].sum())
    training.model.eval()
    if training.ema is not None:
        training.ema.eval()
    return TrainResult(
        history=frame,
        final=dict(history[-1]) if history else {},
        train_time_s=train_time,
        wall_time_s=float(frame["epoch_time_s"].sum()),
        throughput=images / train_time if train_time > 0 else 0.0,
        model=training.model,
        ema_model=training.ema.module if training.ema is not None else None,
    )


def _loaders(train_data: Dataset, val_data: Dataset, config: TrainConfig, device: torch.device,
             world: int) -> tuple[EpochLoader, EpochLoader]:
    """The training and validation loaders of this process; a one-line error where no batch can be filled."""
    per_process_batch = config.batch_size // world
    loaders = (
        make_loader(train_data, batch_size=per_process_batch, train=True, seed=config.seed, workers=config.workers,
                    device=device),
        make_loader(val_data, batch_size=per_process_batch, train=False, workers=config.workers, device=device),
    )
    if len(loaders[0]) == 0:
        raise UserError(
            f"batch size {config.batch_size} exceeds the {len(train_data)} training samples; use a smaller batch"
        )
    return loaders


def train(model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig, *,
          run_dir: str | Path | None = None, name: str = "model", resume: bool = True,
          after_backward: Callable[[nn.Module], None] | None = None) -> TrainResult:
    """Train ``model`` on ``train_data``, evaluating on ``val_data`` after every epoch.

    With ``run_dir``, rank 0 writes ``{name}.ckpt`` (model, optimiser, scheduler,
    scaler, EMA, RNG states of every process, epoch, config, history) and
    ``{name}_metrics.csv`` atomically after every epoch (`topo.train.files.TrainingFiles`),
    and ``resume=True`` continues from an existing checkpoint. On CPU a resumed
    run ends with exactly the weights and metrics of an uninterrupted one. An
    epoch whose training or validation loss is NaN or infinite stops training
    with a :class:`DivergenceError` before it is saved (the last good checkpoint stays). With
    ``config.channels_last`` the model trains in that layout and comes back in the default one.
    ``after_backward(model)`` runs on the unscaled gradients before each step (`topo.construct.slimming`).
    """
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = _check_processes(config)
    files = TrainingFiles(Path(run_dir)) if run_dir is not None else None

    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    seed_everything(config.seed + rank)
    loaders = _loaders(train_data, val_data, config, device, world)

    training = _TrainingState.create(model, config, device, len(loaders[0]), after_backward)
    start_epoch, history = 0, []
    if files is not None and resume and files.checkpoint(name).exists():
        start_epoch, history = _resume(training, files.checkpoint(name), config, name)
    net = _wrap(model, config, device)
    writer = _tensorboard(files.tensorboard(name)) if (files is not None and rank == 0) else None
    for data in (train_data, val_data):
        take_skipped(data)  # unreadable images met before training (statistics, another run) are not this run's

    try:
        with deterministic_algorithms(config.deterministic):
            for epoch in range(start_epoch, config.epochs):
                row = _run_epoch(net, training, loaders, (train_data, val_data), config, device, epoch, name)
                _check_finite(row, name, config, files)  # a diverged epoch is never saved
                history.append(row)
                _save_epoch(files, name, training, config, history, writer)
    finally:
        if writer is not None:
            writer.close()
    if files is not None and rank == 0 and not history:
        _write_history(files.metrics(name), history)
    if config.channels_last:  # trained channels-last, handed back in the default layout (as a file rebuilds it)
        for trained in (training.model, training.ema):
            if trained is not None:
                trained.to(memory_format=torch.contiguous_format)
    return _result(training, history)
