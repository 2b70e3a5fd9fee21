"""`topo-build`: construct a topology from activation statistics, train it beside GoogLeNet, compare.

    topo-build                                   # the whole job on the embedded digits data set
    topo-build --data imagenet --data-dir PATH   # ... on an ImageNet-style folder tree
    topo-build construct ...                     # construction only: topology.json
    topo-build train SPEC.json ...               # train a spec file
    topo-build analyze --weights FILE ...        # what the data suggests for a trained GoogLeNet
    topo-build report RUN_DIR                    # re-render report.md from a run directory

Every flag that sets a configuration field takes its default (and its choices)
from the configuration dataclass that owns the field (`RunConfig`,
`ConstructConfig`, `TrainConfig`), so the command line and the library cannot
drift apart. Progress lines go through `logging` (``--quiet``, ``--verbose``),
written to stdout beside the progress bars; results are printed to stdout.
A mistake in the input (a path, a flag, a data set, a spec file) ends with one
line naming it and the fix on stderr, and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

import builders
from analysis.tables import COMPARISON_CAPTION, comparison_frame, to_markdown, write_comparison
from topo import distributed as dist_info
from topo.cluster import METHODS
from topo.construct import INIT_MODES, WINDOWS, ConstructConfig
from topo.data import DATASETS
from topo.errors import UserError
from topo.io import atomic_write_text
from topo.pipeline import (
    REFERENCES,
    RunConfig,
    analyze,
    comparison_row,
    construct_stage,
    load_data,
    read_spec,
    report_stage,
    run_all,
)
from topo.rundir import RunDir
from topo.train import SCHEDULES, TrainConfig, train

log = logging.getLogger("topo.cli")

COMMANDS = ("run", "construct", "train", "analyze", "report")
DESCRIPTIONS = {
    "run": "Construct a network layer by layer from activation statistics, train it and the hand-designed "
           "GoogLeNet with the same recipe, and write a comparison (tables, figures, report.md).",
    "construct": "Construct a topology only: writes topology.json and the per-layer statistics and clusters.",
    "train": "Train a NetworkSpec .json file on a data set.",
    "analyze": "Record and cluster the input of every Inception module of a (trained) GoogLeNet and report, "
               "per module, the widths the data suggests beside the hand-chosen ones.",
    "report": "Re-render the comparison tables, figures and report.md of a run directory.",
}


# --------------------------------------------------------------------------- value types
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


def _multiply_adds(text: str) -> int:
    return int(_positive_float(text))


def _count_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number nor 'auto'") from None


def _workers(text: str) -> int | str:
    """``--workers``: checked after parsing, so that a bad value is one line like every user error."""
    if text == "auto":
        return text
    try:
        return _non_negative_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise UserError(f"--workers {text!r} is neither a number of processes (0 or more) nor 'auto'") from None


def _positions(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number nor 'all'") from None


# --------------------------------------------------------------------------- flags from the dataclasses
def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class _Flags:
    """Adds options whose ``dest`` is a field of ``cls`` and whose default is that field's default."""

    def __init__(self, parser: argparse.ArgumentParser, title: str, cls: type) -> None:
        self.group, self.cls, self.fields = parser.add_argument_group(title), cls, []

    def add(self, flag: str, field: str, help: str, *, show: Any = None, **options: Any) -> None:
        default = field_default(self.cls, field)
        takes_value = options.get("action") in (None, "store")
        if takes_value and "choices" not in options:
            options.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        if options.get("action") not in ("store_true", "store_false"):
            help = f"{help} (default {default if show is None else show})"
        self.group.add_argument(flag, dest=field, default=default, help=help, **options)
        self.fields.append(field)


def _add_data(p: argparse.ArgumentParser) -> list[str]:
    flags = _Flags(p, "data", RunConfig)
    flags.add("--data", "data", "data set: an ImageNet-style tree (imagenet, folder), cifar10/100, the embedded "
                                "digits (no download) or fake images", choices=list(DATASETS))
    flags.add("--data-dir", "data_dir", "where the data set's files are (imagenet/folder: a folder with train/ "
                                        "and val/ class folders)", show="none")
    flags.add("--image-size", "image_size", "input size in pixels", type=_positive_int, show="the data set's own")
    flags.add("--strict", "strict", "fail on a corrupt image instead of skipping it", action="store_true")
    flags.add("--no-verify", "verify", "image folders (imagenet, folder): skip the header check of every image at "
                                       "start, slow on ImageNet-sized trees; unreadable images are then found, and "
                                       "skipped or failed with --strict, when first read", action="store_false")
    return flags.fields


def _add_reference(p: argparse.ArgumentParser) -> list[str]:
    flags = _Flags(p, "reference network", RunConfig)
    flags.add("--reference", "reference", f"hand-designed network to compare with: {', '.join(REFERENCES[1:])}, "
                                          "or a NetworkSpec .json file (auto: small-input GoogLeNet for images up "
                                          "to 64 px, torchvision's otherwise)")
    flags.add("--width-mult", "width_mult", "scale every width of the reference GoogLeNet", type=_positive_float,
              show="0.25 on digits, else 1")
    return flags.fields


def _add_construct(p: argparse.ArgumentParser) -> list[str]:
    flags = _Flags(p, "construction", ConstructConfig)
    flags.add("--skeleton", "skeleton", "modules per stage and the stride-2 poolings between stages")
    flags.add("--budget", "budget_macs", "multiply-adds per image of the discovered network",
              type=_multiply_adds, show="the reference's")
    flags.add("--init", "init", "initialise new modules at random or from their clusters (Hebbian)",
              choices=INIT_MODES)
    flags.add("--epochs-per-layer", "epochs_per_layer", "train each partial network this many epochs before "
                                                        "measuring", type=_non_negative_int)
    return flags.fields


def _add_clustering(p: argparse.ArgumentParser) -> list[str]:
    flags = _Flags(p, "statistics and clustering", ConstructConfig)
    flags.add("--method", "method", "clustering method", choices=METHODS)
    flags.add("--window", "window", "largest window a new unit looks at, hence the largest kernel", type=int,
              choices=WINDOWS)
    flags.add("--clusters", "n_clusters", "number of clusters per layer, or 'auto' for the documented criterion",
              type=_count_or_auto)
    flags.add("--max-clusters", "max_clusters", "cap on the number of clusters per layer", type=_positive_int,
              show="no cap")
    flags.add("--round-to", "round_to", "round branch widths to multiples of this", type=_positive_int)
    flags.add("--stats-batches", "stats_batches", "batches of training data the statistics are recorded over",
              type=_positive_int)
    flags.add("--positions", "positions", "anchor positions per map and image in the statistics, or 'all' "
                                          "(exact)", type=_positions)
    return flags.fields


def _add_train(p: argparse.ArgumentParser) -> list[str]:
    flags = _Flags(p, "training", TrainConfig)
    flags.add("--epochs", "epochs", "training epochs", type=_non_negative_int)
    flags.add("--batch-size", "batch_size", "global batch size", type=_positive_int)
    flags.add("--lr", "lr", "peak learning rate", type=_positive_float)
    flags.add("--momentum", "momentum", "SGD momentum", type=float)
    flags.add("--weight-decay", "weight_decay", "weight decay (not on biases and norm parameters)", type=float)
    flags.add("--schedule", "schedule", "learning-rate schedule: cosine, the paper's decay every few epochs, or "
                                        "constant", choices=SCHEDULES)
    flags.add("--warmup", "warmup_epochs", "linear warm-up epochs", type=float)
    flags.add("--decay-every", "decay_every", "'paper' schedule: epochs between decays", type=_positive_int)
    flags.add("--decay-factor", "decay_factor", "'paper' schedule: factor of each decay", type=_positive_float)
    flags.add("--label-smoothing", "label_smoothing", "label smoothing", type=float)
    flags.add("--aux-weight", "aux_weight", "weight of each auxiliary head's loss", type=float)
    flags.add("--ema", "ema_decay", "also evaluate an exponential moving average of the weights with this decay "
                                    "(e.g. 0.999)", type=float, metavar="DECAY", show="off")
    flags.add("--grad-clip", "grad_clip", "clip the gradients' global norm to NORM", type=_positive_float,
              metavar="NORM", show="no clipping")
    flags.add("--amp", "amp", "mixed precision on CUDA (no effect on CPU)", action=argparse.BooleanOptionalAction)
    flags.add("--amp-dtype", "amp_dtype", "mixed-precision type on CUDA", choices=("bfloat16", "float16"))
    flags.add("--channels-last", "channels_last", "channels-last memory format", action="store_true")
    flags.add("--compile", "compile", "torch.compile the networks", action="store_true")
    flags.add("--device", "device", "auto (CUDA if present), cpu, cuda or cuda:N")
    flags.add("--workers", "workers", "data-loading worker processes")
    return flags.fields


def _add_output(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--seed", type=int, default=field_default(RunConfig, "seed"),
                   help="seed for data order, initialisation and clustering")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--out", help=f"output directory (default runs/{command}-<data>-<time>)")


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    verbosity = p.add_argument_group("messages").add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", "-q", dest="verbosity", action="store_const", const=-1, default=0,
                           help="only warnings and errors")
    verbosity.add_argument("--verbose", "-v", dest="verbosity", action="store_const", const=1,
                           help="debugging messages too")


def _add_analyze(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--model", default="googlenet", choices=("googlenet",), help="network to analyse")
    g.add_argument("--variant", default="torchvision", choices=("paper", "torchvision", "small"),
                   help="GoogLeNet variant (torchvision's for its ImageNet weights)")
    g.add_argument("--width-mult", type=_positive_float, default=1.0, help="width multiplier (default 1)")
    g.add_argument("--spec", help="analyse this NetworkSpec .json file instead of --model")
    g.add_argument("--weights", help="state dict to load (e.g. torchvision's GoogLeNet ImageNet weights)")
    g.add_argument("--num-classes", type=_positive_int, default=1000, help="classes of the weights' head")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default 64)")
    g.add_argument("--workers", default="auto", help="data-loading worker processes (default auto)")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command (``run`` is the default one)."""
    prog = "topo-build" if command == "run" else f"topo-build {command}"
    epilog = ("other commands: topo-build construct | train SPEC | analyze | report RUN_DIR (each with --help)"
              if command == "run" else None)
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTIONS[command], epilog=epilog)
    groups: dict[str, list[str]] = {}
    if command == "report":
        p.add_argument("run_dir", help="the run directory (the --out of an earlier run)")
    elif command == "analyze":
        groups["data"] = _add_data(p)
        _add_analyze(p)
        groups["construct"] = _add_clustering(p)
    else:
        if command == "train":
            p.add_argument("spec", help="NetworkSpec .json file (e.g. a run's topology.json)")
        groups["data"] = _add_data(p)
        if command in ("run", "construct"):
            groups["data"] += _add_reference(p)
            groups["construct"] = _add_construct(p) + _add_clustering(p)
        groups["train"] = _add_train(p)
    if command != "report":
        _add_output(p, command)
    _add_verbosity(p)
    if command == "run":
        p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run in RUN_DIR with its saved "
                                                           "configuration")
    p.set_defaults(config_fields=groups)
    return p


# --------------------------------------------------------------------------- configurations
def _fields(args: argparse.Namespace, group: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in args.config_fields.get(group, [])}


def construct_config(args: argparse.Namespace) -> ConstructConfig:
    return ConstructConfig(**_fields(args, "construct"), seed=args.seed)


def train_config(args: argparse.Namespace) -> TrainConfig:
    fields = _fields(args, "train")
    return TrainConfig(**{**fields, "workers": _workers(fields["workers"])}, seed=args.seed, progress=args.progress)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of the parsed flags (the parts the command has; the rest at their defaults)."""
    parts: dict[str, Any] = {}
    if "construct" in args.config_fields:
        parts["construct"] = construct_config(args)
    if "train" in args.config_fields:
        parts["train"] = train_config(args)
    return RunConfig(**_fields(args, "data"), seed=args.seed, **parts)


def _out_dir(args: argparse.Namespace, command: str) -> Path:
    if args.out:
        return Path(args.out)
    # under torchrun every process must use rank 0's name, whatever its own clock says
    return Path(dist_info.same_on_all_ranks(f"runs/{command}-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"))


def _show_comparison(frame: pd.DataFrame | None) -> None:
    if frame is not None and dist_info.rank() == 0:
        print("\n" + to_markdown(frame) + "\n\n" + COMPARISON_CAPTION, flush=True)


# --------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        run = RunDir.existing(args.resume)
        config = RunConfig.from_dict(run.read_config())
        log.info("resuming %s with its saved configuration", run.root)
    else:
        config = run_config(args)
        out = _out_dir(args, "run")
        if (out / "config.json").exists():
            raise UserError(f"{out} already holds a run: resume it with --resume {out}, or choose another --out")
        run = RunDir(out)
    outcome = run_all(config, run)
    if outcome is not None:
        report, frame = outcome
        _show_comparison(frame)
        print(f"report: {report}", flush=True)
    return 0


def cmd_construct(args: argparse.Namespace) -> int:
    config = run_config(args)
    run = RunDir(_out_dir(args, "construct"))
    bundle = load_data(config)
    if not run.config_path.is_file() and dist_info.rank() == 0:
        run.write_config(config.to_dict())
    construct_stage(config, bundle, run)
    if dist_info.rank() == 0:
        print(f"topology: {run.topology}", flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    spec = read_spec(args.spec)
    config = run_config(args)
    bundle = load_data(config)
    if spec.in_channels != bundle.in_channels or spec.head.num_classes != bundle.num_classes:
        raise UserError(
            f"spec {args.spec} takes {spec.in_channels} input channels and {spec.head.num_classes} classes, but "
            f"{args.data} has {bundle.in_channels} and {bundle.num_classes}: use a spec built for this data"
        )
    run = RunDir(_out_dir(args, "train"))
    name = Path(args.spec).stem
    if dist_info.rank() == 0:
        atomic_write_text(run.training.spec(name), spec.to_json() + "\n")
    torch.manual_seed(args.seed)
    result = train(builders.build(spec), bundle.train, bundle.val, config.train, run_dir=run.training.root,
                   name=name)
    row = comparison_row(name, spec, result, tuple(bundle.image_size))
    if dist_info.rank() == 0:
        write_comparison([row], run.root)
        _show_comparison(comparison_frame([row]))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    config = run_config(args)
    bundle = load_data(config)
    if args.spec:
        spec = read_spec(args.spec)
    else:
        spec = builders.googlenet_spec(args.variant, num_classes=args.num_classes, aux_logits=False,
                                       width_mult=args.width_mult, in_channels=bundle.in_channels,
                                       input_size=min(bundle.image_size))
    frame = analyze(spec, args.weights, bundle, _out_dir(args, "analyze"), construct_config=config.construct,
                    batch_size=args.batch_size, device=args.device, workers=_workers(args.workers),
                    progress=args.progress)
    print("\n" + to_markdown(frame), flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report, frame = report_stage(RunDir.existing(args.run_dir))
    _show_comparison(frame)
    print(f"report: {report}", flush=True)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "construct": cmd_construct, "train": cmd_train, "analyze": cmd_analyze, "report": cmd_report,
}


# --------------------------------------------------------------------------- logging and errors
class _TqdmHandler(logging.StreamHandler):
    """Writes records with ``tqdm.write``, so that log lines and progress bars do not tangle."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - a logging handler must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_logging(verbosity: int) -> logging.Handler:
    """One handler on the root logger, at INFO (``-1``: WARNING, ``1``: DEBUG); other ranks log errors only.

    Python warnings (e.g. the clustering's) are routed through it too. Returns the handler, for removal.
    """
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity]
    if dist_info.rank() != 0:
        level = logging.ERROR
    handler = _TqdmHandler(sys.stdout)
    handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler


def one_line(error: Exception) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(error).strip()
    if "Original Traceback" in text:  # "Caught DataError in DataLoader worker process 0. ..."
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(error).__module__) else last
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of `topo-build`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    args = build_parser(command).parse_args(argv)
    handler = None
    try:
        dist_info.init_from_env()
        handler = configure_logging(getattr(args, "verbosity", 0))
        return HANDLERS[command](args)
    except UserError as e:
        print(f"topo-build: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("topo-build: interrupted; a run continues with --resume RUN_DIR", file=sys.stderr)
        return 130
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            logging.captureWarnings(False)
        dist_info.cleanup()


if __name__ == "__main__":
    sys.exit(main())
