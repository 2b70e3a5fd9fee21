"""Seed-to-seed and floating-point spread of the default recipe's top-1 (issue 33).

Trains the default run's reference network (GoogLeNet-small on the embedded ``patches`` data, the
`topo.run.config.RunConfig` defaults: 15 epochs, SGD lr 0.05 cosine, batch 64, momentum 0.9, wd 1e-4; float32
on the CPU) as `topo.run.stages.train_stage` does (``torch.manual_seed(seed)`` before building, the trainer
seeded with the same seed, so the same seed means the same initial weights and the same data order), under:

* each seed with the default layout (channels_last) and the default threads;
* each seed with channels_last off: same weights, same data order, only the floating-point rounding differs;
* optionally one thread (``--one-thread-seeds``) and a repeat of the first default training (``--repeat``),
  which checks that a training is bit-for-bit reproducible, so any difference between the others is rounding
  amplified by training, not a random stream.

For every trained model: the final validation top-1, that of the last three epochs (the fluctuation at the end
of the schedule), the training top-1 of the last epoch (train mode, as the history records it), and the
validation top-1 after "precise BN": every BatchNorm layer's running statistics recomputed as a cumulative
average (``momentum=None``) over one pass of the training loader in train mode, without gradients.

    python benchmarks/training_noise.py                                   # seeds 0 1 2, both layouts
    python benchmarks/training_noise.py --seeds 0 1 2 3 4 --one-thread-seeds 0 --repeat
    python benchmarks/training_noise.py --threads 1 --jobs 2               # two 1-thread trainings side by side
    python benchmarks/training_noise.py --epochs 1 --seeds 0              # smoke test
    python benchmarks/training_noise.py --spec RUN/training/discovered.spec.json   # a run's discovered network

``--spec`` trains another NetworkSpec instead of the reference (from random weights, as the default run trains
its discovered network: `topo.run.stages.initial_model` with the default random init and no prefix training).

A training's numbers depend on its thread count, not on what runs beside it: ``--jobs`` only saves wall time
(use it with ``--threads 1`` on a busy machine, where two-thread OpenMP training slows down far more than two
one-thread processes do).

Prints the machine, one markdown row per trained model, and a summary: the SD over seeds within a layout, the
difference between layouts at the same seed, the end-of-schedule spread, and how often two models disagree on
a validation image; each with and without precise BN.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import multiprocessing
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import builders
from builders.spec import read_spec
from topo.data.loader import make_loader
from topo.run.config import RunConfig, load_data, reference_spec
from topo.train.config import TrainConfig
from topo.train.trainer import _to_device, evaluate, split_output, train

VAL_IMAGES = 1100


@dataclass
class Trained:
    """One trained model's numbers (accuracies in percent) and its validation predictions."""

    seed: int
    layout: str
    threads: int
    final: float
    last3: list[float]
    precise_bn: float
    train_top1: float
    seconds: float
    precise_bn_s: float
    per_epoch: list[float] = field(repr=False)
    predictions: torch.Tensor = field(repr=False)
    precise_predictions: torch.Tensor = field(repr=False)

    @property
    def label(self) -> str:
        return f"seed {self.seed}, {self.layout}, {self.threads} thr"


def machine() -> tuple[str, bool]:
    """The CPU's model name from ``lscpu`` and whether its flags include avx512f."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)", False
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    return name, "avx512f" in fields.get("Flags", "").split()


def recipe(seed: int, channels_last: bool, epochs: int | None) -> TrainConfig:
    """The default run's training recipe with ``seed`` and the layout; no progress bars."""
    base = RunConfig().train
    return dataclasses.replace(base, seed=seed, channels_last=channels_last, progress=False,
                               epochs=base.epochs if epochs is None else epochs)


@torch.no_grad()
def predictions(model: nn.Module, data, config: TrainConfig) -> torch.Tensor:
    """The model's top-1 class for every image of ``data`` (evaluation mode, the recipe's layout)."""
    model.eval()
    loader = make_loader(data, batch_size=256, train=False, workers=config.workers, device="cpu")
    out = [split_output(model(_to_device(x, torch.device("cpu"), config.channels_last)))[0].argmax(1)
           for x, _ in loader]
    return torch.cat(out)


@torch.no_grad()
def precise_bn(model: nn.Module, train_data, config: TrainConfig) -> float:
    """Recompute every BatchNorm layer's running mean and variance as the cumulative average over one pass of the
    training loader (train mode, the recipe's batches and layout); returns the seconds it took."""
    start = time.perf_counter()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    loader = make_loader(train_data, batch_size=config.batch_size, train=True, seed=config.seed,
                         workers=config.workers, device="cpu")
    loader.set_epoch(0)
    for x, _ in loader:
        model(_to_device(x, torch.device("cpu"), config.channels_last))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return time.perf_counter() - start


def train_one(seed: int, channels_last: bool, threads: int, bundle, spec, epochs: int | None) -> Trained:
    """Train the reference once (as the run does) and measure it, with and without precise BN."""
    config = recipe(seed, channels_last, epochs)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        torch.manual_seed(seed)  # as topo.run.stages.initial_model
        model = builders.build(spec)
        result = train(model, bundle.train, bundle.val, config)
        seconds = time.perf_counter() - start
        history = result.history
        model = result.model
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        plain = predictions(model, bundle.val, config)
        check = evaluate(model, bundle.val, device="cpu", config=config)["top1"]
        if abs(check - float(history["val_top1"].iloc[-1])) > 1e-9:
            print(f"  note: re-evaluated top-1 {check:.4f} differs from the history's "
                  f"{float(history['val_top1'].iloc[-1]):.4f}")
        bn_seconds = precise_bn(model, bundle.train, config)
        precise = evaluate(model, bundle.val, device="cpu", config=config)["top1"]
        precise_pred = predictions(model, bundle.val, config)
    finally:
        torch.set_num_threads(before)
    val = [100 * float(v) for v in history["val_top1"]]
    return Trained(seed=seed, layout="channels_last" if channels_last else "NCHW", threads=threads,
                   final=val[-1], last3=val[-3:], precise_bn=100 * precise,
                   train_top1=100 * float(history["train_top1"].iloc[-1]), seconds=seconds,
                   precise_bn_s=bn_seconds, per_epoch=val, predictions=plain, precise_predictions=precise_pred)


_DATA: dict[str, object] = {}


def _job(task: tuple[int, bool, int, int | None, str | None]) -> Trained:
    """`train_one` in a worker process (data and network spec loaded once per process)."""
    if not _DATA:
        config = RunConfig()
        _DATA["bundle"] = load_data(config)
        _DATA["spec"] = network_spec(config, _DATA["bundle"], task[-1])
    seed, channels_last, threads, epochs, _ = task
    return train_one(seed, channels_last, threads, _DATA["bundle"], _DATA["spec"], epochs)


def network_spec(config: RunConfig, bundle, spec_path: str | None):
    """The network to train: the run's reference, or the NetworkSpec file ``spec_path``."""
    return read_spec(spec_path) if spec_path else reference_spec(config, bundle)


def run_all(todo: list[tuple[int, bool, int]], epochs: int | None, jobs: int,
            spec_path: str | None = None) -> list[Trained]:
    """Every planned training, ``jobs`` at a time in fresh processes (in this one with ``jobs`` 1), in plan
    order; prints each as it ends."""
    start = time.perf_counter()
    tasks = [(seed, cl, threads, epochs, spec_path) for seed, cl, threads in todo]

    def report(i: int, run: Trained) -> None:
        print(f"[{i}/{len(tasks)}, {time.perf_counter() - start:.0f} s] {run.label}: val {run.final:.1f} "
              f"(last 3 {', '.join(f'{v:.1f}' for v in run.last3)}), precise BN {run.precise_bn:.1f}, "
              f"train {run.train_top1:.1f}, {run.seconds:.0f} s", flush=True)

    if jobs <= 1:
        runs = []
        for i, task in enumerate(tasks, 1):
            runs.append(_job(task))
            report(i, runs[-1])
        return runs
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_job, task): k for k, task in enumerate(tasks)}
        done: dict[int, Trained] = {}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            done[futures[future]] = future.result()
            report(i, done[futures[future]])
    return [done[k] for k in range(len(tasks))]


def sd(values: list[float]) -> float:
    """Sample standard deviation (nan for fewer than two values)."""
    return statistics.stdev(values) if len(values) > 1 else math.nan


def disagreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percent of validation images on which two models predict different classes."""
    return 100 * float((a != b).float().mean())


def rows_table(runs: list[Trained]) -> str:
    """One markdown row per trained model."""
    lines = [("| seed | layout | threads | val top-1 | last 3 epochs | last-3 range | precise-BN top-1 | "
              "train top-1 (last epoch) | train s | precise-BN s |"),
             "| ---: | :--- | ---: | ---: | :--- | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        last3 = " / ".join(f"{v:.1f}" for v in r.last3)
        lines.append(f"| {r.seed} | {r.layout} | {r.threads} | {r.final:.1f} | {last3} | "
                     f"{max(r.last3) - min(r.last3):.1f} | {r.precise_bn:.1f} | {r.train_top1:.1f} | "
                     f"{r.seconds:.0f} | {r.precise_bn_s:.1f} |")
    return "\n".join(lines)


def pairs_by_seed(runs: list[Trained], a: str, b: str, threads: int) -> list[tuple[Trained, Trained]]:
    """(layout a, layout b) models of the same seed and thread count (first of each, repeats left out)."""
    first: dict[tuple[int, str], Trained] = {}
    for r in runs:
        if r.threads == threads:
            first.setdefault((r.seed, r.layout), r)
    return [(first[(s, a)], first[(s, b)]) for s in sorted({s for s, _ in first})
            if (s, a) in first and (s, b) in first]


def summary_table(runs: list[Trained], threads: int) -> str:
    """Spread over seeds, between layouts, at the end of the schedule, and prediction disagreement."""
    lines = ["| measure | plain BN statistics | precise BN |", "| :--- | ---: | ---: |"]
    seeds_of: dict[str, dict[int, Trained]] = {}
    for r in runs:
        if r.threads == threads:
            seeds_of.setdefault(r.layout, {}).setdefault(r.seed, r)
    for layout, by_seed in seeds_of.items():
        plain = [r.final for r in by_seed.values()]
        precise = [r.precise_bn for r in by_seed.values()]
        lines.append(f"| {layout}: mean over {len(plain)} seeds | {statistics.mean(plain):.1f} | "
                     f"{statistics.mean(precise):.1f} |")
        lines.append(f"| {layout}: SD over seeds | {sd(plain):.1f} | {sd(precise):.1f} |")
        lines.append(f"| {layout}: range over seeds | {max(plain) - min(plain):.1f} | "
                     f"{max(precise) - min(precise):.1f} |")
    pairs = pairs_by_seed(runs, "channels_last", "NCHW", threads)
    if pairs:
        plain = [abs(a.final - b.final) for a, b in pairs]
        precise = [abs(a.precise_bn - b.precise_bn) for a, b in pairs]
        lines.append(f"| \\|channels_last - NCHW\\| at the same seed, per seed | "
                     f"{', '.join(f'{v:.1f}' for v in plain)} | {', '.join(f'{v:.1f}' for v in precise)} |")
        lines.append(f"| \\|channels_last - NCHW\\|, mean | {statistics.mean(plain):.1f} | "
                     f"{statistics.mean(precise):.1f} |")
        apart = statistics.mean(disagreement(a.predictions, b.predictions) for a, b in pairs)
        apart_p = statistics.mean(disagreement(a.precise_predictions, b.precise_predictions) for a, b in pairs)
        lines.append(f"| disagreement between layouts, same seed (% of val images), mean | {apart:.1f} | "
                     f"{apart_p:.1f} |")
    cl = sorted(seeds_of.get("channels_last", {}).values(), key=lambda r: r.seed)
    if len(cl) > 1:
        between = [disagreement(x.predictions, y.predictions) for i, x in enumerate(cl) for y in cl[i + 1:]]
        between_p = [disagreement(x.precise_predictions, y.precise_predictions)
                     for i, x in enumerate(cl) for y in cl[i + 1:]]
        lines.append(f"| disagreement between seeds, channels_last (% of val images), mean | "
                     f"{statistics.mean(between):.1f} | {statistics.mean(between_p):.1f} |")
    chosen = [r for r in runs if r.threads == threads]
    ranges = [max(r.last3) - min(r.last3) for r in chosen]
    lines.append(f"| last-3-epoch range of val top-1, mean (max) over models | "
                 f"{statistics.mean(ranges):.1f} ({max(ranges):.1f}) | - |")
    shift = [abs(r.precise_bn - r.final) for r in chosen]
    lines.append(f"| \\|precise BN - plain\\| per model, mean (max) | - | "
                 f"{statistics.mean(shift):.1f} ({max(shift):.1f}) |")
    p = statistics.mean(r.final for r in chosen) / 100
    lines.append(f"| binomial SE of one top-1 at p = {100 * p:.0f}% on {VAL_IMAGES} images | "
                 f"{100 * math.sqrt(p * (1 - p) / VAL_IMAGES):.1f} | |")
    return "\n".join(lines)


def divergence_table(pairs: list[tuple[Trained, Trained]]) -> str:
    """Per epoch, |val top-1 (channels_last) - val top-1 (NCHW)| at each seed: when the layouts part."""
    if not pairs:
        return ""
    epochs = len(pairs[0][0].per_epoch)
    head = "| epoch | " + " | ".join(f"seed {a.seed}" for a, _ in pairs) + " |"
    lines = [head, "| ---: |" + " ---: |" * len(pairs)]
    for e in range(epochs):
        lines.append(f"| {e + 1} | " + " | ".join(f"{abs(a.per_epoch[e] - b.per_epoch[e]):.1f}"
                                                   for a, b in pairs) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the main trainings (default: torch's default here)")
    parser.add_argument("--one-thread-seeds", type=int, nargs="*", default=[],
                        help="seeds to train once more with one thread, channels_last (default none)")
    parser.add_argument("--repeat", action="store_true",
                        help="train the first seed's default once more: is a training bit-for-bit reproducible?")
    parser.add_argument("--no-nchw", action="store_true", help="skip the channels_last-off trainings")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (smoke tests)")
    parser.add_argument("--spec", default=None,
                        help="a NetworkSpec .json to train instead of the reference (e.g. a run's discovered network)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings side by side in processes (default 1)")
    parser.add_argument("--json", default=None, help="also write every model's numbers to this file")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[int, bool, int]]:
    """(seed, channels_last, threads) of every training, in order: the default and NCHW interleaved per seed,
    so that a drift in the machine's speed touches both layouts alike."""
    todo = []
    for seed in args.seeds:
        todo.append((seed, True, args.threads))
        if not args.no_nchw:
            todo.append((seed, False, args.threads))
    if args.repeat:
        todo.append((args.seeds[0], True, args.threads))
    todo += [(seed, True, 1) for seed in args.one_thread_seeds]
    return todo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name, avx512 = machine()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {name}; avx512f: "
          f"{'yes' if avx512 else 'no'}; torch {torch.__version__}, {torch.get_num_threads()} threads by default")
    config = RunConfig()
    bundle = load_data(config)
    print(f"data {bundle.name}: {len(bundle.train)} train / {len(bundle.val)} val, {bundle.num_classes} classes; "
          f"network: {args.spec or 'the reference (googlenet-small at this size)'}", flush=True)
    todo = plan(args)
    start = time.perf_counter()
    runs = run_all(todo, args.epochs, args.jobs, args.spec)
    print("\n## Every model\n")
    print(rows_table(runs))
    print(f"\n## Summary ({args.threads} threads)\n")
    print(summary_table(runs, args.threads))
    pairs = pairs_by_seed(runs, "channels_last", "NCHW", args.threads)
    if pairs:
        print("\n## |channels_last - NCHW| val top-1 per epoch, same seed\n")
        print(divergence_table(pairs))
    if args.repeat:
        a = next(r for r in runs if (r.seed, r.layout, r.threads) == (args.seeds[0], "channels_last", args.threads))
        b = [r for r in runs if (r.seed, r.layout, r.threads) == (a.seed, a.layout, a.threads)][-1]
        same = a.per_epoch == b.per_epoch and bool((a.predictions == b.predictions).all())
        print(f"\nrepeat of {a.label}: {'identical' if same else 'DIFFERENT'} history and predictions "
              f"({a.final:.1f} and {b.final:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in dataclasses.asdict(r).items()
                        if k not in ("predictions", "precise_predictions")} for r in runs], f, indent=1)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
