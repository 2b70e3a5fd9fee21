"""`topo-build`: construct a topology from activation statistics, train it beside GoogLeNet, compare.

    topo-build                                   # the whole job on the embedded digits data set
    topo-build --data imagenet --data-dir PATH   # ... on an ImageNet-style folder tree
    topo-build construct ...                     # construction only: topology.json
    topo-build train SPEC.json ...               # train a spec file
    topo-build analyze --weights FILE ...        # what the data suggests for a trained GoogLeNet
    topo-build report RUN_DIR                    # re-render report.md from a run directory

A mistake in the input (a path, a flag, a data set, a spec file) ends with one
line naming it and the fix, and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from topo import distributed as dist_info
from topo.errors import UserError

COMMANDS = ("run", "construct", "train", "analyze", "report")
METHODS = ("arora", "spectral", "agglomerative", "louvain")


# --------------------------------------------------------------------------- arguments
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _add_data(p: argparse.ArgumentParser) -> None:
    from topo.data import DATASETS

    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", choices=list(DATASETS),
                   help="data set: an ImageNet-style tree (imagenet, folder), cifar10/100, the embedded "
                        "digits (default, no download) or fake images")
    g.add_argument("--data-dir", help="where the data set's files are (imagenet/folder: a folder with train/ "
                                      "and val/ class folders)")
    g.add_argument("--image-size", type=_positive_int, help="input size in pixels (default: the data set's own)")
    g.add_argument("--strict", action="store_true", help="fail on a corrupt image instead of skipping it")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="image folders (imagenet, folder): skip the header check of every image at start, slow "
                        "on ImageNet-sized trees; unreadable images are then found, and skipped or failed with "
                        "--strict, when first read")


def _add_reference(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reference network")
    g.add_argument("--reference", default="auto",
                   help="hand-designed network to compare with: googlenet-small, googlenet-paper, "
                        "googlenet-torchvision, or a NetworkSpec .json file (default auto: small-input "
                        "GoogLeNet for images up to 64 px, torchvision's otherwise)")
    g.add_argument("--width-mult", type=_positive_float,
                   help="scale every width of the reference GoogLeNet (default 0.25 on digits, else 1)")


def _add_construct(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("construction")
    g.add_argument("--skeleton", default="2,pool,5,pool,2",
                   help="modules per stage and the stride-2 poolings between stages (default GoogLeNet's "
                        "'2,pool,5,pool,2')")
    g.add_argument("--budget", type=_positive_float,
                   help="multiply-adds per image of the discovered network (default: the reference's)")
    g.add_argument("--init", default="random", choices=("random", "hebbian"),
                   help="initialise new modules at random or from their clusters (Hebbian)")
    g.add_argument("--epochs-per-layer", type=_non_negative_int, default=0,
                   help="train each partial network this many epochs before measuring (default 0)")


def _add_clustering(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("statistics and clustering")
    g.add_argument("--method", default="arora", choices=METHODS, help="clustering method (default arora)")
    g.add_argument("--window", type=int, default=5, choices=(1, 3, 5),
                   help="largest window a new unit looks at, hence the largest kernel (default 5)")
    g.add_argument("--clusters", default="auto",
                   help="number of clusters per layer, or 'auto' (default) for the documented criterion")
    g.add_argument("--max-clusters", type=_positive_int, help="cap on the number of clusters per layer")
    g.add_argument("--round-to", type=_positive_int, default=8,
                   help="round branch widths to multiples of this (default 8)")
    g.add_argument("--stats-batches", type=_positive_int, default=16,
                   help="batches of training data the statistics are recorded over (default 16)")


def _add_train(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_non_negative_int, default=15, help="training epochs (default 15)")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="global batch size (default 64)")
    g.add_argument("--lr", type=_positive_float, default=0.05, help="peak learning rate (default 0.05)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (default 1e-4)")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "paper", "constant"),
                   help="learning-rate schedule: cosine with warm-up, or the paper's 4%% every 8 epochs")
    g.add_argument("--warmup", type=float, default=0.0, help="warm-up epochs (default 0)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default 0)")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="also evaluate an exponential moving average of the weights (e.g. 0.999)")
    g.add_argument("--grad-clip", type=_positive_float, default=None, metavar="NORM",
                   help="clip the gradients' global norm to NORM (default: no clipping)")


def _add_execution(p: argparse.ArgumentParser, *, training: bool) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    if training:
        g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="bf16 mixed precision on CUDA (default on; no effect on CPU)")
        g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
        g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    else:
        g.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default 64)")
    g.add_argument("--workers", default="auto", help="data-loading worker processes (default auto)")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, initialisation and clustering")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command (``run`` is the default one)."""
    prog = "topo-build" if command == "run" else f"topo-build {command}"
    descriptions = {
        "run": "Construct a network layer by layer from activation statistics, train it and the hand-designed "
               "GoogLeNet with the same recipe, and write a comparison (tables, figures, report.md).",
        "construct": "Construct a topology only: writes topology.json and the per-layer statistics and clusters.",
        "train": "Train a NetworkSpec .json file on a data set.",
        "analyze": "Record and cluster the input of every Inception module of a (trained) GoogLeNet and report, "
                   "per module, the widths the data suggests beside the hand-chosen ones.",
        "report": "Re-render the comparison tables, figures and report.md of a run directory.",
    }
    epilog = None
    if command == "run":
        epilog = ("other commands: topo-build construct | train SPEC | analyze | report RUN_DIR "
                  "(each with --help)")
    p = argparse.ArgumentParser(prog=prog, description=descriptions[command], epilog=epilog)
    if command == "report":
        p.add_argument("run_dir", help="the run directory (the --out of an earlier run)")
        return p
    if command == "train":
        p.add_argument("spec", help="NetworkSpec .json file (e.g. a run's topology.json)")
    _add_data(p)
    if command in ("run", "construct"):
        _add_reference(p)
        _add_construct(p)
        _add_clustering(p)
    if command == "analyze":
        g = p.add_argument_group("network")
        g.add_argument("--model", default="googlenet", choices=("googlenet",), help="network to analyse")
        g.add_argument("--variant", default="torchvision", choices=("paper", "torchvision", "small"),
                       help="GoogLeNet variant (torchvision's for its ImageNet weights)")
        g.add_argument("--width-mult", type=_positive_float, default=1.0, help="width multiplier (default 1)")
        g.add_argument("--spec", help="analyse this NetworkSpec .json file instead of --model")
        g.add_argument("--weights", help="state dict to load (e.g. torchvision's GoogLeNet ImageNet weights)")
        g.add_argument("--num-classes", type=_positive_int, default=1000, help="classes of the weights' head")
        _add_clustering(p)
    else:
        _add_train(p)
    _add_execution(p, training=command != "analyze")
    p.add_argument("--out", help="output directory (default runs/<command>-<data>-<time>)")
    if command == "run":
        p.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a killed run in RUN_DIR with its saved configuration")
    return p


def _construct_config(args: argparse.Namespace):
    """The ConstructConfig of the parsed flags (construction flags only where the command has them)."""
    from topo.construct import ConstructConfig

    clusters = args.clusters
    if clusters != "auto":
        try:
            clusters = int(clusters)
        except ValueError:
            raise UserError(f"--clusters {clusters!r} is neither a number nor 'auto'") from None
    fields = dict(method=args.method, window=args.window, n_clusters=clusters, max_clusters=args.max_clusters,
                  round_to=args.round_to, stats_batches=args.stats_batches, seed=args.seed)
    if hasattr(args, "skeleton"):
        fields.update(skeleton=args.skeleton, budget_macs=int(args.budget) if args.budget else None,
                      init=args.init, epochs_per_layer=args.epochs_per_layer)
    return ConstructConfig(**fields)


def _configs(args: argparse.Namespace):
    return _construct_config(args), _train_config(args)


def _data_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields of the data flags."""
    return {"data": args.data, "data_dir": args.data_dir, "image_size": args.image_size, "strict": args.strict,
            "verify": args.verify}


def _workers(args: argparse.Namespace) -> int | str:
    try:
        return args.workers if args.workers == "auto" else int(args.workers)
    except ValueError:
        raise UserError(f"--workers {args.workers!r} is neither a number nor 'auto'") from None


def _train_config(args: argparse.Namespace):
    from topo.train import TrainConfig

    workers = _workers(args)
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        schedule=args.schedule, warmup_epochs=args.warmup, label_smoothing=args.label_smoothing,
        ema_decay=args.ema, grad_clip=args.grad_clip, device=args.device, amp=args.amp, channels_last=args.channels_last,
        compile=args.compile, seed=args.seed, workers=workers, progress=not args.no_progress,
    )


def _out_dir(args: argparse.Namespace, command: str) -> Path:
    if args.out:
        return Path(args.out)
    # under torchrun every process must use rank 0's name, whatever its own clock says
    return Path(dist_info.same_on_all_ranks(f"runs/{command}-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"))


# --------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from topo.pipeline import RunConfig, run_all
    from topo.rundir import RunDir

    if args.resume:
        run = RunDir.existing(args.resume)
        config = RunConfig.from_dict(run.read_config())
        log(f"resuming {run.root} with its saved configuration")
    else:
        construct, train = _configs(args)
        config = RunConfig(**_data_fields(args), reference=args.reference, width_mult=args.width_mult,
                           seed=args.seed, construct=construct, train=train)
        out = _out_dir(args, "run")
        if (out / "config.json").exists():
            raise UserError(f"{out} already holds a run: resume it with --resume {out}, or choose another --out")
        run = RunDir(out)
    run_all(config, run, log=log)
    return 0


def cmd_construct(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from topo.pipeline import RunConfig, construct_stage, load_data
    from topo.rundir import RunDir

    construct, train = _configs(args)
    config = RunConfig(**_data_fields(args), reference=args.reference, width_mult=args.width_mult,
                       seed=args.seed, construct=construct, train=train)
    run = RunDir(_out_dir(args, "construct"))
    bundle = load_data(config)
    if not run.config_path.is_file() and dist_info.rank() == 0:
        run.write_config(config.to_dict())
    construct_stage(config, bundle, run, log=log)
    log(f"topology: {run.topology}")
    return 0


def cmd_train(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    import torch

    import builders
    from analysis.report import comparison_frame, to_markdown, write_comparison
    from topo.pipeline import RunConfig, load_data, network_costs, read_spec
    from topo.train import train

    spec = read_spec(args.spec)
    config = RunConfig(**_data_fields(args), seed=args.seed, train=_train_config(args))
    bundle = load_data(config)
    if spec.in_channels != bundle.in_channels or spec.head.num_classes != bundle.num_classes:
        raise UserError(
            f"spec {args.spec} takes {spec.in_channels} input channels and {spec.head.num_classes} classes, but "
            f"{args.data} has {bundle.in_channels} and {bundle.num_classes}: use a spec built for this data"
        )
    out = _out_dir(args, "train")
    torch.manual_seed(args.seed)
    model = builders.build(spec)
    name = Path(args.spec).stem
    result = train(model, bundle.train, bundle.val, config.train, run_dir=out, name=name)
    params, macs = network_costs(spec, tuple(bundle.image_size))
    row = {"network": name, "params": params, "macs": macs, "top1": result.final.get("val_top1"),
           "top5": result.final.get("val_top5"), "ema_top1": result.final.get("ema_val_top1"),
           "train_time_s": result.train_time_s, "throughput": result.throughput}
    if dist_info.rank() == 0:
        write_comparison([row], out)
        log("\n" + to_markdown(comparison_frame([row])))
    return 0


def cmd_analyze(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    import builders
    from topo.pipeline import RunConfig, analyze, load_data, read_spec

    construct = _construct_config(args)
    config = RunConfig(**_data_fields(args), seed=args.seed)
    bundle = load_data(config)
    if args.spec:
        spec = read_spec(args.spec)
    else:
        spec = builders.googlenet_spec(args.variant, num_classes=args.num_classes, aux_logits=False,
                                       width_mult=args.width_mult, in_channels=bundle.in_channels,
                                       input_size=min(bundle.image_size))
    analyze(spec, args.weights, bundle, _out_dir(args, "analyze"), construct_config=construct,
            batch_size=args.batch_size, device=args.device, workers=_workers(args), progress=not args.no_progress,
            log=log)
    return 0


def cmd_report(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from topo.pipeline import report_stage
    from topo.rundir import RunDir

    report_stage(RunDir.existing(args.run_dir), log=log)
    return 0


def one_line(error: Exception) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(error).strip()
    if "Original Traceback" in text:  # "Caught DataError in DataLoader worker process 0. ..."
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(error).__module__) else last
    return text


HANDLERS = {"run": cmd_run, "construct": cmd_construct, "train": cmd_train, "analyze": cmd_analyze,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `topo-build`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    args = build_parser(command).parse_args(argv)
    log = lambda message: print(message, flush=True)  # noqa: E731
    try:
        dist_info.init_from_env()
        return HANDLERS[command](args, log)
    except UserError as e:
        print(f"topo-build: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("topo-build: interrupted; a run continues with --resume RUN_DIR", file=sys.stderr)
        return 130
    finally:
        dist_info.cleanup()


if __name__ == "__main__":
    sys.exit(main())
