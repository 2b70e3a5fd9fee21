"""Is the data loader or the model the bottleneck? ``imagenet`` pipeline images/s per worker count
against the training-step rate of GoogLeNet (torchvision variant), side by side in one run.

    python benchmarks/bench_data.py                     # CPU: 224x224, batch 16
    python benchmarks/bench_data.py --device cuda --batch-size 256 --workers 0 2 4 8 16

The JPEG tree (500x375 crops of scikit-learn's sample photographs, like
ImageNet's typical size) is generated in a temporary directory. The loader
is timed from its second batch on (worker start-up excluded); the model
step is forward + backward + SGD step, the trainer's loss with auxiliary
heads, bf16 autocast and channels_last on CUDA.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import builders
from topo.data import load, make_loader
from topo.common.devices import resolve_device
from topo.common.devices import available_cpus
from topo.data.sample_tree import write_sample_tree
from topo.train.trainer import split_output


def loader_rate(dataset, workers: int, batch_size: int, batches: int) -> float:
    """Steady-state images/s of a training loader with ``workers`` worker processes.

    The main process uses one intra-op thread, as DataLoader workers do, so
    that 0 workers measures one process decoding and augmenting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = make_loader(dataset, batch_size=batch_size, train=True, seed=0, workers=workers, device="cpu")
        loader.set_epoch(0)
        iterator = iter(loader)
        next(iterator)  # worker start-up and first batch are not steady state
        images, start = 0, time.perf_counter()
        for _ in range(batches):
            try:
                x, _ = next(iterator)
            except StopIteration:
                break
            images += len(x)
        return images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def model_rate(device: torch.device, batch_size: int, size: int, steps: int) -> float:
    """Training steps of GoogLeNet (torchvision variant, with auxiliary heads) in images/s."""
    model = builders.googlenet(variant="torchvision", num_classes=1000).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    x = torch.randn(batch_size, 3, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    model.train()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits, aux = split_output(model(x))
            loss = criterion(logits, y) + sum(0.3 * criterion(a, y) for a in aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2 if cuda else 1):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320, help="training images in the generated tree")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 0, 1, 2, ... cores)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 256 on CUDA")
    parser.add_argument("--size", type=int, default=224, help="crop size of the pipeline and the model input")
    parser.add_argument("--steps", type=int, default=None, help="timed model steps (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    cpus = available_cpus()
    batch_size = args.batch_size or (256 if cuda else 16)
    steps = args.steps or (20 if cuda else 3)
    workers = args.workers or sorted({0, 1, 2, *range(4, cpus + 1, 4)})
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        per_class = args.images // 2
        write_sample_tree(tmp, train_per_class=per_class, val_per_class=1, size=(500, 375), special=False,
                          suffixes=(".jpg",))
        print(f"generated {2 * per_class} 500x375 JPEG training images in {time.perf_counter() - start:.1f} s")
        dataset = load("imagenet", Path(tmp), image_size=args.size).train
        batches = max(1, len(dataset) // batch_size - 1)
        model = model_rate(device, batch_size, args.size, steps)
        rows = [(w, loader_rate(dataset, w, batch_size, batches)) for w in workers]

    name = f"{torch.cuda.get_device_name(device)}, " if cuda else ""
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}{cpu_name()}, {cpus} CPU cores "
          f"(load average {load_average:.1f}), torch {torch.__version__}, batch {batch_size}, {args.size}x{args.size}")
    print(f"model: googlenet(variant='torchvision') training step on {device}"
          f"{' (bf16 autocast, channels_last)' if cuda else ''}: {model:.1f} images/s\n")
    print("| workers | loader images/s | model images/s | loader / model | bottleneck |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for w, rate in rows:
        ratio = rate / model
        print(f"| {w} | {rate:.1f} | {model:.1f} | {ratio:.2f}x | {'model' if ratio >= 1 else 'loader'} |")


if __name__ == "__main__":
    main()
