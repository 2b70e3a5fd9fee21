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
A mistake in the input (a path, a flag, a data set, a file, a setting the data
cannot support) ends with one line naming it and the fix on stderr
(``topo-build: error: ...``), and exit status 2, before any work where it can
be known then; a file that cannot be written during a run (a full disk) ends
with one line and exit status 1, the files written before intact
(docs/errors.md lists every case).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import pandas as pd
import torch
from tqdm.auto import tqdm

import builders
from analysis.tables import COMPARISON_CAPTION, comparison_frame, to_markdown, write_comparison
from topo import distributed as dist_info
from topo.cluster import METHODS
from topo.construct import BUDGETS, INIT_MODES, STEMS, WINDOWS, ConstructConfig
from topo.data import DATASETS
from topo.errors import SpecError, UserError
from topo.files import read_spec, read_weights
from topo.io import WriteError, atomic_write_text, remove_temporaries
from topo.pipeline import (
    AUX_POLICIES,
    REFERENCES,
    RunConfig,
    analyze,
    check_device,
    check_window,
    comparison_row,
    construct_stage,
    load_data,
    preflight,
    reference_spec,
    report_stage,
    run_all,
)
from topo.rundir import NEW_RUN, RunDir
from topo.study import (
    ARMS,
    StudyConfig,
    load_study,
    parse_shard,
    run_study,
    summarize,
    summary_markdown,
)
from topo.train import RESUMABLE_CHANGES, SCHEDULES, TrainConfig, train

log = logging.getLogger("topo.cli")

COMMANDS = ("run", "construct", "train", "analyze", "report", "study")
DESCRIPTIONS = {
    "run": "Construct a network layer by layer from activation statistics, train it and the hand-designed "
           "GoogLeNet with the same recipe, and write a comparison (tables, figures, report.md).",
    "construct": "Construct a topology only: writes topology.json and the per-layer statistics and clusters.",
    "train": "Train a NetworkSpec .json file on a data set.",
    "analyze": "Record and cluster the input of every Inception module of a (trained) GoogLeNet and report, "
               "per module, the widths the data suggests beside the hand-chosen ones.",
    "report": "Re-render the comparison tables, figures and report.md of a run directory.",
    "study": "Compare the discovered network with the reference, random topologies at the same cost and a uniform "
             "one over several seeds: per-arm means and intervals, tests, a figure and report.md "
             "(docs/study.md).",
}


# --------------------------------------------------------------------------- value types
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _multiply_adds(text: str) -> int | str:
    if text in BUDGETS:
        return text
    try:
        value = _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number of multiply-adds nor one of "
                                         f"{', '.join(BUDGETS)}") from None
    return int(value)


def _quantile_or_none(text: str) -> float | None:
    if text == "none":
        return None
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not strictly between 0 and 1 (or 'none')")
    return value


def _count_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number nor 'auto'") from None


def _workers(text: str) -> int | str:
    """``--workers``: checked after parsing, so that a bad value is one line like every user error."""
    if text == "auto":
        return text
    try:
        return _non_negative_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise UserError(f"--workers {text!r} is neither a number of processes (0 or more) nor 'auto'") from None


def _positions(text: str) -> int | str | None:
    if text == "all":
        return None
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number nor 'all'") from None


# --------------------------------------------------------------------------- flags from the dataclasses
def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class _Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line on stderr (``topo-build: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"topo-build: error: {message} (see {self.prog} --help)\n")


class _Flags:
    """Adds options whose ``dest`` is a field of ``cls`` and whose default is that field's default.

    ``fields`` maps each field to its flag (what messages about the setting name).
    """

    def __init__(self, parser: argparse.ArgumentParser, title: str, cls: type) -> None:
        self.group, self.cls, self.fields = parser.add_argument_group(title), cls, {}

    def add(self, flag: str, field: str, help: str, *, show: Any = None, **options: Any) -> None:
        default = field_default(self.cls, field)
        takes_value = options.get("action") in (None, "store")
        if takes_value and "choices" not in options:
            options.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        if options.get("action") not in ("store_true", "store_false"):
            help = f"{help} (default {default if show is None else show})"
        self.group.add_argument(flag, dest=field, default=default, help=help, **options)
        self.fields[field] = flag


def _add_data(p: argparse.ArgumentParser) -> dict[str, str]:
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


def _add_reference(p: argparse.ArgumentParser) -> dict[str, str]:
    flags = _Flags(p, "reference network", RunConfig)
    flags.add("--reference", "reference", f"hand-designed network to compare with: {', '.join(REFERENCES[1:])}, "
                                          "or a NetworkSpec .json file (auto: small-input GoogLeNet for images up "
                                          "to 64 px, torchvision's otherwise)")
    flags.add("--width-mult", "width_mult", "scale every width of the reference GoogLeNet", type=_positive_float,
              show="0.25 on digits, else 1")
    flags.add("--aux-heads", "aux_heads", "auxiliary heads of every trained network (both, or every arm of a "
                                          "study): none, or the reference's", choices=AUX_POLICIES)
    return flags.fields


def _add_construct(p: argparse.ArgumentParser) -> dict[str, str]:
    flags = _Flags(p, "construction", ConstructConfig)
    flags.add("--skeleton", "skeleton", "modules per stage and the stride-2 poolings between stages")
    flags.add("--stem", "stem", "the reference's stem, or none: the first module reads the data's channels",
              choices=STEMS)
    flags.add("--budget", "budget_macs", "multiply-adds per image of the discovered network, 'reference' (the "
                                         "reference's) or 'none' (one unit per cluster)", type=_multiply_adds)
    flags.add("--init", "init", "initialise new modules at random or from their clusters (Hebbian)",
              choices=INIT_MODES)
    flags.add("--epochs-per-layer", "epochs_per_layer", "train each partial network this many epochs before "
                                                        "measuring", type=_non_negative_int)
    return flags.fields


def _add_clustering(p: argparse.ArgumentParser) -> dict[str, str]:
    flags = _Flags(p, "statistics and clustering", ConstructConfig)
    flags.add("--method", "method", "clustering method", choices=METHODS)
    flags.add("--window", "window", "largest window a new unit looks at, hence the largest kernel", type=_int,
              choices=WINDOWS)
    flags.add("--clusters", "n_clusters", "number of clusters per layer, or 'auto' for the documented criterion",
              type=_count_or_auto)
    flags.add("--max-clusters", "max_clusters", "cap on the number of clusters per layer", type=_positive_int,
              show="no cap")
    flags.add("--round-to", "round_to", "round branch widths to multiples of this", type=_positive_int)
    flags.add("--stats-batches", "stats_batches", "batches of training data the statistics are recorded over",
              type=_positive_int)
    flags.add("--positions", "positions", "anchor positions per map and image in the statistics, 'all' "
                                          "(exact) or 'auto' (exact where it costs no more than the forward pass, "
                                          "else enough positions for the documented observations per offset)",
              type=_positions)
    flags.add("--fire-quantile", "fire_quantile", "a unit fires above its own q-quantile (estimated in a "
                                                  "calibration pass), or 'none': when positive",
              type=_quantile_or_none)
    return flags.fields


def _add_train(p: argparse.ArgumentParser) -> dict[str, str]:
    flags = _Flags(p, "training", TrainConfig)
    flags.add("--epochs", "epochs", "training epochs", type=_non_negative_int)
    flags.add("--batch-size", "batch_size", "global batch size", type=_positive_int)
    flags.add("--lr", "lr", "peak learning rate", type=_positive_float)
    flags.add("--momentum", "momentum", "SGD momentum", type=_float)
    flags.add("--weight-decay", "weight_decay", "weight decay (not on biases and norm parameters)", type=_float)
    flags.add("--schedule", "schedule", "learning-rate schedule: cosine, the paper's decay every few epochs, or "
                                        "constant", choices=SCHEDULES)
    flags.add("--warmup", "warmup_epochs", "linear warm-up epochs", type=_float)
    flags.add("--decay-every", "decay_every", "'paper' schedule: epochs between decays", type=_positive_int)
    flags.add("--decay-factor", "decay_factor", "'paper' schedule: factor of each decay", type=_positive_float)
    flags.add("--label-smoothing", "label_smoothing", "label smoothing", type=_float)
    flags.add("--aux-weight", "aux_weight", "weight of each auxiliary head's loss", type=_float)
    flags.add("--ema", "ema_decay", "also evaluate an exponential moving average of the weights with this decay "
                                    "(e.g. 0.999)", type=_float, metavar="DECAY", show="off")
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
    g.add_argument("--seed", type=_int, default=field_default(RunConfig, "seed"),
                   help="seed for data order, initialisation and clustering")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--out", help=f"output directory (default runs/{command}-<data>-<time>)")


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    verbosity = p.add_argument_group("messages").add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", "-q", dest="verbosity", action="store_const", const=-1, default=0,
                           help="only warnings and errors")
    verbosity.add_argument("--verbose", "-v", dest="verbosity", action="store_const", const=1,
                           help="debugging messages too")


def _arms(text: str) -> tuple[str, ...]:
    arms = tuple(arm.strip() for arm in text.split(",") if arm.strip())
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of {', '.join(ARMS)}")
    return arms


def _add_study(p: argparse.ArgumentParser) -> dict[str, str]:
    flags = _Flags(p, "study", StudyConfig)
    flags.add("--seeds", "seeds", "training seeds per arm (--seed, --seed + 1, ...)", type=_positive_int)
    flags.add("--random", "random", "random topologies at the discovered network's cost; topology k trains with "
                                    "seed k mod --seeds", type=_positive_int)
    flags.add("--arms", "arms", f"comma-separated arms, among {', '.join(ARMS)}", type=_arms,
              show=",".join(field_default(StudyConfig, "arms")))
    flags.add("--margin", "margin", "equivalence margin in top-1 points (two one-sided tests)",
              type=_positive_float)
    flags.add("--tolerance", "tolerance", "largest relative difference of an arm's multiply-adds from the "
                                          "discovered network's (0.02 = 2%%)", type=_positive_float)
    flags.group.add_argument("--shard", metavar="I/N", help="run every N-th unit from unit I (0 <= I < N) into "
                                                            "the same --out; gather with --summarize")
    flags.group.add_argument("--summarize", action="store_true", help="gather the finished units of --out into "
                                                                      "the tables, figure and report.md")
    flags.group.add_argument("--resume", action="store_true", help="continue the study in --out with its saved "
                                                                   "settings")
    return flags.fields


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
    p = _Parser(prog=prog, description=DESCRIPTIONS[command], epilog=epilog)
    groups: dict[str, dict[str, str]] = {}
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
        if command in ("run", "construct", "study"):
            groups["data"].update(_add_reference(p))
            groups["construct"] = {**_add_construct(p), **_add_clustering(p)}
        groups["train"] = _add_train(p)
        if command == "study":
            groups["study"] = _add_study(p)
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


# --------------------------------------------------------------------------- saved configurations
def explicit_options(command: str, argv: list[str], args: argparse.Namespace) -> set[str]:
    """The ``dest`` of every option given on the command line (not left at its default)."""
    unset = object()  # not a string: argparse passes it through untouched
    probe = build_parser(command)
    probe.set_defaults(**{dest: unset for dest in vars(args)})
    return {dest for dest, value in vars(probe.parse_args(argv)).items() if value is not unset}


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "none"}[value]
    return str(value)


def _setting(config: RunConfig, group: str, field: str) -> Any:
    return getattr({"construct": config.construct, "train": config.train}.get(group, config), field)


def differences(args: argparse.Namespace, saved: RunConfig, given: RunConfig,
                only: set[str] | None = None) -> list[str]:
    """``"--epochs 15, not 3"`` for every setting (of ``only``, if given) where ``given`` differs from ``saved``.

    The settings a run may change when continued (`topo.train.RESUMABLE_CHANGES`) are left out.
    """
    flags = {field: flag for fields in args.config_fields.values() for field, flag in fields.items()}
    flags["seed"] = "--seed"
    groups = {field: group for group, fields in args.config_fields.items() for field in fields}
    out = []
    for field, flag in flags.items():
        if field in RESUMABLE_CHANGES or (only is not None and field not in only):
            continue
        was, now = _setting(saved, groups.get(field, "data"), field), _setting(given, groups.get(field, "data"), field)
        if was != now:
            out.append(f"{flag} {_shown(was)}, not {_shown(now)}")
    return out


def _refuse_other_settings(run: RunDir, changed: list[str], how: str) -> None:
    if changed:
        raise UserError(f"{run.root} was made with {'; '.join(changed)}: going on with other settings would mix "
                        f"two experiments; {how}, or {NEW_RUN}")


def _reuse(args: argparse.Namespace, run: RunDir, config: RunConfig, command: str) -> None:
    """Check ``--out`` before any work: writable, and an earlier output there is of this command and settings."""
    run.check_writable()
    if not run.config_path.exists():
        return
    run.check_compatible(command)
    _refuse_other_settings(run, differences(args, RunConfig.of_run(run), config), "give the same flags to continue it")
    if dist_info.rank() == 0:
        remove_temporaries(run.root)


def _resumed(args: argparse.Namespace) -> tuple[RunDir, RunConfig]:
    """The run directory of ``--resume`` and its saved configuration, with the changes a resume allows."""
    run = RunDir.existing(args.resume)
    if args.out and Path(args.out).resolve() != run.root.resolve():
        raise UserError(f"--out {args.out} and --resume {args.resume} are different folders: a resumed run goes on "
                        "in its own folder; drop --out")
    run.check_writable()
    run.check_compatible("run", "construct")
    saved, given = RunConfig.of_run(run), run_config(args)
    _refuse_other_settings(run, differences(args, saved, given, only=args.explicit),
                           "drop those flags to continue it as saved")
    allowed = {field: getattr(given.train, field) for field in RESUMABLE_CHANGES & args.explicit}
    if dist_info.rank() == 0:
        remove_temporaries(run.root)
    log.info("resuming %s with its saved configuration", run.root)
    return run, dataclasses.replace(saved, train=dataclasses.replace(saved.train, **allowed))


# --------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        run, config = _resumed(args)
    else:
        config = run_config(args)
        run = RunDir(_out_dir(args, "run"))
        if run.config_path.exists():
            raise UserError(f"{run.root} already holds a run: resume it with --resume {run.root}, or choose another "
                            "--out")
        run.check_writable()
    outcome = run_all(config, run, window_given="window" in args.explicit)
    if outcome is not None:
        report, frame = outcome
        _show_comparison(frame)
        print(f"report: {report}", flush=True)
    return 0


def _start(run: RunDir, config: RunConfig, command: str) -> None:
    """Write ``config.json`` of a new output folder (rank 0), once every check has passed."""
    if not run.config_path.is_file() and dist_info.rank() == 0:
        run.write_config(config.to_dict(), command=command)


def cmd_construct(args: argparse.Namespace) -> int:
    config = run_config(args)
    run = RunDir(_out_dir(args, "construct"))
    _reuse(args, run, config, "construct")
    bundle = load_data(config)
    preflight(config, bundle, reference_spec(config, bundle), window_given="window" in args.explicit)
    _start(run, config, "construct")
    construct_stage(config, bundle, run)
    if dist_info.rank() == 0:
        print(f"topology: {run.topology}", flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    spec = read_spec(args.spec)
    config = run_config(args)
    run = RunDir(_out_dir(args, "train"))
    _reuse(args, run, config, "train")
    bundle = load_data(config)
    if spec.in_channels != bundle.in_channels or spec.head.num_classes != bundle.num_classes:
        raise UserError(
            f"spec {args.spec} takes {spec.in_channels} input channels and {spec.head.num_classes} classes, but "
            f"{args.data} has {bundle.in_channels} and {bundle.num_classes}: use a spec built for this data"
        )
    preflight(config, bundle, None)
    _start(run, config, "train")
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


def _analysed_spec(args: argparse.Namespace, bundle: Any) -> builders.NetworkSpec:
    if args.spec:
        return read_spec(args.spec)
    try:
        return builders.googlenet_spec(args.variant, num_classes=args.num_classes, aux_logits=False,
                                       width_mult=args.width_mult, in_channels=bundle.in_channels,
                                       input_size=min(bundle.image_size))
    except SpecError as e:
        h, w = bundle.image_size
        raise SpecError(f"GoogLeNet --variant {args.variant} does not fit the {h}x{w} images of {args.data} ({e}); "
                        "use --variant small for images up to 64 px, or larger images (--image-size)") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.weights:
        read_weights(args.weights)  # a file that is no state dict is named before anything else is done
    if args.spec:
        read_spec(args.spec)
    config = run_config(args)
    out = _out_dir(args, "analyze")
    RunDir(out).check_writable()
    check_device(args.device)
    bundle = load_data(config)
    spec = _analysed_spec(args, bundle)
    if "window" in args.explicit:
        shapes = spec.input_shapes(tuple(bundle.image_size))
        check_window(config.construct.window, [(m.name, tuple(shapes[m.name][1:])) for m in spec.inception_modules()])
    frame = analyze(spec, args.weights, bundle, out, construct_config=config.construct,
                    batch_size=args.batch_size, device=args.device, workers=_workers(args.workers),
                    progress=args.progress)
    print("\n" + to_markdown(frame), flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    run = RunDir.existing(args.run_dir)
    run.check_writable()
    report, frame = report_stage(run)
    _show_comparison(frame)
    print(f"report: {report}", flush=True)
    return 0


def _study_config(args: argparse.Namespace, out: Path) -> StudyConfig:
    """The flags' study, or with ``--resume`` the one saved in ``out`` (devices, workers, progress as given)."""
    given = StudyConfig(run=run_config(args), **_fields(args, "study"))
    if not args.resume:
        return given
    saved = load_study(out)
    changed = sorted(set(args.explicit) - RESUMABLE_CHANGES - {"out", "resume", "shard", "verbosity"})
    if changed:
        raise UserError(f"--resume continues {out} with its saved settings; drop the other flags "
                        f"({', '.join(changed)}) or give the same ones without --resume")
    allowed = {field: getattr(given.run.train, field) for field in RESUMABLE_CHANGES & args.explicit}
    train_settings = dataclasses.replace(saved.run.train, **allowed)
    return dataclasses.replace(saved, run=dataclasses.replace(saved.run, train=train_settings))


def cmd_study(args: argparse.Namespace) -> int:
    if (args.summarize or args.resume) and not args.out:
        raise UserError("--summarize and --resume need --out STUDY, the folder of the study")
    out = _out_dir(args, "study")
    if args.summarize:
        result = summarize(out)
    else:
        RunDir(out).check_writable()
        shard = parse_shard(args.shard) if args.shard else (0, 1)
        result = run_study(_study_config(args, out), out, shard=shard, progress=args.progress,
                           window_given="window" in args.explicit)
    if result is not None and dist_info.rank() == 0:
        print("\n" + summary_markdown(result) + f"\n\nreport: {result.report}", flush=True)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "construct": cmd_construct, "train": cmd_train, "analyze": cmd_analyze, "report": cmd_report,
    "study": cmd_study,
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
    args.explicit = explicit_options(command, argv, args)
    handler = None
    try:
        dist_info.init_from_env()
        handler = configure_logging(getattr(args, "verbosity", 0))
        return HANDLERS[command](args)
    except UserError as e:
        print(f"topo-build: error: {one_line(e)}", file=sys.stderr)
        return 2
    except WriteError as e:  # a full disk or a read-only folder during the work: not a mistake in the input
        print(f"topo-build: error: {e.strerror}", file=sys.stderr)
        return 1
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
