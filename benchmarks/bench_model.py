"""Model throughput: builders.googlenet("torchvision") against torchvision.models.googlenet.

Both models run side by side in one process, under the same settings, in
alternating rounds (so a noisy, shared machine slows both alike). For each
setting it prints training-step throughput (forward + backward + SGD step,
images/s) and inference throughput for both models and their ratio. Each
figure is the best of ``--rounds`` timed rounds: on a shared machine other
jobs only ever slow a round down.

    python benchmarks/bench_model.py                          # CPU, 64x64, batch 8
    python benchmarks/bench_model.py --threads 1 --clock cpu  # CPU time: steady on a busy machine
    python benchmarks/bench_model.py --compile                # adds torch.compile settings
    python benchmarks/bench_model.py --device cuda --size 224 --batch 256 --compile

On CUDA it also reports achieved TFLOP/s (multiply-adds x 2 from FlopCounterMode,
x 3 for a training step) against a measured bf16 matrix-multiply peak.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import builders
from analysis import count_macs


@dataclass(frozen=True)
class Setting:
    name: str
    fused: bool = True
    channels_last: bool = False
    autocast: bool = False
    compile: bool = False


def settings(device: str, with_compile: bool) -> list[Setting]:
    out = [
        Setting("fp32"),
        Setting("unfused", fused=False),
        Setting("channels_last", channels_last=True),
        Setting("bf16", autocast=True),
        Setting("bf16+channels_last", autocast=True, channels_last=True),
    ]
    if with_compile:
        out += [
            Setting("compile", compile=True),
            Setting("compile+bf16+channels_last", autocast=True, channels_last=True, compile=True),
        ]
    return out


def make_models(setting: Setting, args) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    theirs = torchvision.models.googlenet(weights=None, aux_logits=args.aux, init_weights=True, num_classes=1000)
    ours = builders.googlenet("torchvision", aux_logits=args.aux, fused=setting.fused)
    models = {"torchvision": theirs, "topo": ours}
    for name, model in models.items():
        model = model.to(args.device)
        if setting.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[name] = model
    return models


def loss_of(output, target: torch.Tensor) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return F.cross_entropy(output, target)
    logits, *aux = output  # torchvision: (logits, aux2, aux1); topo: (logits, (aux1, aux2))
    aux = list(aux[0]) if len(aux) == 1 else aux
    return F.cross_entropy(logits, target) + 0.3 * sum(F.cross_entropy(a, target) for a in aux)


class Runner:
    """One model under one setting: a compiled (or eager) train step and inference step."""

    def __init__(self, model: nn.Module, setting: Setting, args) -> None:
        self.model, self.setting, self.args = model, setting, args
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device, memory_format=fmt)
        self.y = torch.randint(0, 1000, (args.batch,), generator=g).to(args.device)
        self.forward = torch.compile(model) if setting.compile else model

    def autocast(self):
        if not self.setting.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.args.device, dtype=torch.bfloat16)

    def train_step(self) -> None:
        self.model.train()
        with self.autocast():
            loss = loss_of(self.forward(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def infer_step(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            self.forward(self.x)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_steps(step, n: int, device: str, clock: str = "wall") -> float:
    """Seconds per step over ``n`` steps, by wall clock or by this process's CPU time."""
    now = CLOCKS[clock]
    sync(device)
    start = now()
    for _ in range(n):
        step()
    sync(device)
    return (now() - start) / n


def bf16_matmul_peak(device: str, n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matrix-multiply TFLOP/s on ``device``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = time_steps(lambda: a @ b, reps, device)
    return 2 * n**3 / seconds / 1e12


def measure(setting: Setting, args) -> dict[str, dict[str, float]]:
    runners = {name: Runner(m, setting, args) for name, m in make_models(setting, args).items()}
    results: dict[str, dict[str, float]] = {}
    for mode in ("train", "infer"):
        per_round: dict[str, list[float]] = {name: [] for name in runners}
        for r in runners.values():
            step = r.train_step if mode == "train" else r.infer_step
            for _ in range(args.warmup):
                step()
        for _ in range(args.rounds):  # alternate the models so noise hits both alike
            for name, r in runners.items():
                step = r.train_step if mode == "train" else r.infer_step
                per_round[name].append(time_steps(step, args.steps, args.device, args.clock))
        for name, times in per_round.items():
            # best round: on a shared machine other jobs only ever slow a round down
            results.setdefault(name, {})[mode] = args.batch / min(times)
    return results


def machine() -> str:
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    else:
        gpu = "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per model (the best is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--aux", action="store_true", help="keep the auxiliary heads in training")
    parser.add_argument("--compile", action="store_true", help="add torch.compile settings (slow to compile on CPU)")
    parser.add_argument("--only", default=None, help="comma-separated setting names to run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="'cpu' times by process CPU time: with --threads 1, a fair comparison on a busy shared machine",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures CPU work only: use the wall clock with --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True

    print(f"# bench_model: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# torch {torch.__version__}, torchvision {torchvision.__version__}; {machine()}")
    print(
        f"# device {args.device}, input {args.size}x{args.size}, batch {args.batch}, aux heads {args.aux}, "
        f"{args.clock} clock, best of {args.rounds} rounds of {args.steps} steps"
    )
    macs = count_macs(builders.googlenet("torchvision", aux_logits=False).eval(), (3, args.size, args.size))
    print(f"# forward multiply-adds per image: {macs / 1e9:.3f} G")
    peak = bf16_matmul_peak(args.device) if args.device == "cuda" else None
    if peak:
        print(f"# measured bf16 matmul peak: {peak:.1f} TFLOP/s")

    chosen = settings(args.device, args.compile)
    if args.only:
        names = {s.strip() for s in args.only.split(",")}
        chosen = [s for s in chosen if s.name in names]
    header = "| setting | train tv img/s | train topo img/s | train ratio | infer tv img/s | infer topo img/s | infer ratio |"
    if peak:
        header += " topo train TFLOP/s | % of peak |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for setting in chosen:
        r = measure(setting, args)
        tv, ours = r["torchvision"], r["topo"]
        line = (
            f"| {setting.name} | {tv['train']:.1f} | {ours['train']:.1f} | {ours['train'] / tv['train']:.2f}x "
            f"| {tv['infer']:.1f} | {ours['infer']:.1f} | {ours['infer'] / tv['infer']:.2f}x |"
        )
        if peak:
            tflops = 3 * 2 * macs * ours["train"] / 1e12  # backward ~ 2x forward
            line += f" {tflops:.1f} | {100 * tflops / peak:.0f}% |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
