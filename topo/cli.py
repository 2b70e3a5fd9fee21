"""`topo-build`: construct a topology from activation statistics, train it beside GoogLeNet, compare.

    topo-build                                   # the whole job on the embedded digits data set
    topo-build --data imagenet --data-dir PATH   # ... on an ImageNet-style folder tree
    topo-build construct ...                     # construction only: topology.json
    topo-build train SPEC.json ...               # train a spec file
    topo-build analyze --weights FILE ...        # what the data suggests for a trained GoogLeNet
    topo-build report RUN_DIR                    # re-render report.md from a run directory
    topo-build export RUN_DIR --format onnx      # a trained network as safetensors, ONNX, TorchScript, pt2
    topo-build eval RUN_DIR                      # top-1/top-5, loss and images/s of a trained network
    topo-build train SPEC.json --config RUN_DIR/config.json   # settings from a file; flags override it

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
from typing import Any, Callable, Iterator, NoReturn

import pandas as pd
import torch
from tqdm.auto import tqdm

import builders
from analysis.tables import COMPARISON_CAPTION, comparison_frame, to_markdown, write_comparison
from topo import distributed as dist_info
from topo.cluster import METHODS
from topo.construct import BUDGETS, FALLBACKS, INIT_MODES, NULLS, SPLITS, STEMS, WINDOWS, ConstructConfig
from topo.controls import verdict
from topo.data import DATASETS
from topo.decoding import DECODERS
from topo.errors import SpecError, UserError
from topo.export import FORMATS, export_run, load_safetensors
from topo.files import read_json, read_spec, read_text, read_weights
from topo.io import WriteError, atomic_write_json, atomic_write_text, remove_temporaries
from topo.pipeline import (
    AUX_POLICIES,
    REFERENCES,
    RunConfig,
    analyze,
    check_device,
    check_window,
    comparison_row,
    constructions_stage,
    load_data,
    preflight,
    read_controls,
    reference_spec,
    report_stage,
    run_all,
)
from topo.rundir import CONFIG_FILE, NEW_RUN, RunDir
from topo.runs import build_with_weights, load_run, run_spec, timed_evaluate
from topo.study import (
    ARMS,
    StudyConfig,
    load_study,
    parse_shard,
    run_study,
    summarize,
    summary_markdown,
)
from topo.train import (
    RESUMABLE_CHANGES,
    SCHEDULES,
    TrainConfig,
    check_sync_bn,
    deterministic_algorithms,
    train,
)

log = logging.getLogger("topo.cli")

COMMANDS = ("run", "construct", "train", "analyze", "report", "study", "export", "eval")
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
    "export": "Write a run's trained network as safetensors (weights and topology, no pickle), ONNX (checked with "
              "onnxruntime), TorchScript or torch.export, each file checked against the network's outputs "
              "(docs/results.md).",
    "eval": "Evaluate a trained network (a run directory, or a spec with --weights) on the validation split of a "
            "data set: loss, top-1, top-5 and images per second, like torchvision's --test-only.",
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


def _at_least_one_or_none(text: str) -> float | None:
    if text == "none":
        return None
    value = _float(text)
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is below 1 (or 'none')")
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
        switch = options.get("action") in ("store_true", "store_false")  # its help needs no default
        if options.get("action") == "store_true":  # --no-FLAG too: a --config file's "true" can be overridden
            options["action"] = argparse.BooleanOptionalAction
        takes_value = options.get("action") in (None, "store")
        if takes_value and "choices" not in options:
            options.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        if not switch:
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
    flags.add("--controls", "controls", "construct also on more seeds, on pixel-shuffled data and on "
                                        "matched-moment noise, and test whether the topology depends on the data "
                                        "(--no-controls: skip)", action=argparse.BooleanOptionalAction)
    flags.add("--jobs", "jobs", "run, construct: the run's construction and the control's side by side in this "
                                "many worker processes (the same results; 1: one after the other here); auto: one "
                                "per core on the CPU, 1 on a GPU, and each construction's clustering in worker "
                                "processes on the cores the constructions leave")
    flags.add("--fresh-init", "fresh_init", "train the discovered network from random weights even where the "
                                            "construction initialised it (the ablation of --init hebbian)",
              action="store_true")
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
    flags.add("--decoder", "decoder", "with --init hebbian --budget none, a decoded unit fires above its sum's "
                                      "mean, or (threshold) as often as its cluster's members fire together",
              choices=DECODERS)
    flags.add("--pool-branch", "pool_branch", "each module's pooling branch, its units the clusters of the "
                                              "max-pooled input (--no-pool-branch: none, as in the theory's layers)",
              action=argparse.BooleanOptionalAction)
    flags.add("--budget-split", "budget_split", "share of the budget per module: 'even' (an equal share of "
                                               "what is left), 'data' (each module as its clusters call for, one "
                                               "scale factor on the whole network) or 'reference' (GoogLeNet's "
                                               "split)", choices=SPLITS)
    flags.add("--max-units-per-cluster", "max_units_per_cluster", "a module's budget is a ceiling: its widths "
                                                                  "grow to at most this many channels per cluster "
                                                                  "('none': no cap)", type=_at_least_one_or_none)
    flags.add("--fallback", "fallback", "a layer without clusters: 'data' (1x1 units of its principal "
                                        "dimension) or 'reference' (the reference module's proportions)",
              choices=FALLBACKS)
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
    flags.add("--null", "null", "test each pair of units against the same prefix recorded on a null input "
                                "(shuffled pixels or matched-moment noise) instead of independence", choices=NULLS)
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
    flags.add("--channels-last", "channels_last", "channels-last memory format of weights and inputs (the default: "
                                                  "1.2-1.3x faster training on the CPU, docs/training.md)",
              action="store_true")
    flags.add("--compile", "compile", "torch.compile the networks", action="store_true")
    flags.add("--sync-bn", "sync_bn", "under torchrun, BatchNorm statistics over the global batch "
                                      "(nn.SyncBatchNorm, CUDA only); on one process no effect", action="store_true")
    flags.add("--deterministic", "deterministic", "deterministic algorithms only (torch.use_deterministic_algorithms,"
                                                  " cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG)",
              action="store_true")
    flags.add("--device", "device", "auto (CUDA if present), cpu, cuda or cuda:N")
    flags.add("--workers", "workers", "data-loading worker processes")
    return flags.fields


def _add_seed(g: argparse._ArgumentGroup, help: str = "seed for data order, initialisation and clustering") -> None:
    g.add_argument("--seed", type=_int, default=field_default(RunConfig, "seed"), help=f"{help} (default %(default)s)")


def _add_output(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("output")
    _add_seed(g)
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
    _add_execution(p)


def _add_execution(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default 64)")
    g.add_argument("--workers", default="auto", help="data-loading worker processes (default auto)")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run directory (the --out of an earlier run)")
    g = p.add_argument_group("export")
    g.add_argument("--network", default="discovered", help="the run's network: discovered, reference, or a "
                                                           "trained spec's name (default discovered)")
    g.add_argument("--format", choices=FORMATS, help="file format (default: from the suffix of --out)")
    g.add_argument("--out", metavar="FILE", help="file to write (default RUN_DIR/export/NETWORK.<suffix>)")
    g.add_argument("--ema", action="store_true", help="the exponential moving average of the weights (runs "
                                                      "trained with --ema)")


def _add_eval(p: argparse.ArgumentParser) -> dict[str, str]:
    p.add_argument("source", metavar="RUN_DIR_OR_SPEC", help="a run directory, a NetworkSpec .json file (with "
                                                             "--weights) or a .safetensors file from topo-build export")
    g = p.add_argument_group("network")
    g.add_argument("--network", default="discovered", help="a run directory's network (default discovered)")
    g.add_argument("--weights", help="state dict or topo checkpoint to evaluate (default: the run's checkpoint)")
    g.add_argument("--ema", action="store_true", help="a run's exponential moving average of the weights")
    fields = _add_data(p)
    g = p.add_argument_group("output")
    _add_seed(g, "seed of generated data (planted, fake); a run directory's by default")
    g.add_argument("--out", metavar="FILE", help="also write the results to this JSON file")
    _add_execution(p)
    return fields


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command (``run`` is the default one)."""
    prog = "topo-build" if command == "run" else f"topo-build {command}"
    epilog = ("other commands: topo-build construct | train SPEC | analyze | report RUN_DIR | study | "
              "export RUN_DIR | eval RUN_DIR (each with --help)"
              if command == "run" else None)
    p = _Parser(prog=prog, description=DESCRIPTIONS[command], epilog=epilog)
    groups: dict[str, dict[str, str]] = {}
    if command == "report":
        p.add_argument("run_dir", help="the run directory (the --out of an earlier run)")
    elif command == "export":
        _add_export(p)
    elif command == "eval":
        groups["data"] = _add_eval(p)
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
    if command not in ("report", "export", "eval"):
        _add_output(p, command)
    _add_verbosity(p)
    p.add_argument("--config", metavar="FILE", help="settings from a JSON (or YAML) file, e.g. a run's config.json "
                                                    "(reproduces it); flags given here override the file")
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
    config = TrainConfig(**{**fields, "workers": _workers(fields["workers"])}, seed=args.seed, progress=args.progress)
    check_sync_bn(config)
    return config


def run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of the parsed flags (the parts the command has; the rest at their defaults)."""
    parts: dict[str, Any] = {}
    if "construct" in args.config_fields:
        parts["construct"] = construct_config(args)
    if "train" in args.config_fields:
        parts["train"] = train_config(args)
    config = RunConfig(**_fields(args, "data"), seed=args.seed, **parts)
    settings = getattr(args, "config_file", None)
    return _with_kept(config, settings.kept, args.config) if settings is not None else config


def _with_kept(config: RunConfig, kept: dict[str, Any], path: str) -> RunConfig:
    """``config`` with the settings of the ``--config`` file ``path`` that the command has no option for: a run's
    config.json given back is reproduced in full, its sections included."""
    if not kept:
        return config
    data = config.to_dict()
    for key, value in kept.items():
        data[key] = {**data[key], **value} if key in RUN_SECTIONS else value
    try:
        return RunConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise UserError(f"configuration file {path}: {e}") from None


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


#: Run settings outside its sections that a continued run may change: how it computes, not what.
RUN_RESUMABLE_CHANGES = frozenset({"jobs"})


def differences(args: argparse.Namespace, saved: RunConfig, given: RunConfig,
                only: set[str] | None = None) -> list[str]:
    """``"--epochs 15, not 3"`` for every setting (of ``only``, if given) where ``given`` differs from ``saved``.

    The settings a run may change when continued (`topo.train.RESUMABLE_CHANGES`, `RUN_RESUMABLE_CHANGES`) are
    left out.
    """
    flags = {field: flag for fields in args.config_fields.values() for field, flag in fields.items()}
    flags["seed"] = "--seed"
    groups = {field: group for group, fields in args.config_fields.items() for field in fields}
    out = []
    for field, flag in flags.items():
        if field in RESUMABLE_CHANGES | RUN_RESUMABLE_CHANGES or (only is not None and field not in only):
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
    top = {field: getattr(given, field) for field in RUN_RESUMABLE_CHANGES & args.explicit}
    if dist_info.rank() == 0:
        remove_temporaries(run.root)
    log.info("resuming %s with its saved configuration", run.root)
    return run, dataclasses.replace(saved, **top, train=dataclasses.replace(saved.train, **allowed))


# --------------------------------------------------------------------------- --config FILE
#: The dataclass behind each group of flags (``config_fields`` of `build_parser`).
GROUP_CLASSES: dict[str, type] = {"data": RunConfig, "construct": ConstructConfig, "train": TrainConfig,
                                  "study": StudyConfig}
#: The sections of a RunConfig (its dataclass fields: construct, train, ...) and the dataclass of each.
RUN_SECTIONS: dict[str, type] = {f.name: type(field_default(RunConfig, f.name)) for f in dataclasses.fields(RunConfig)
                                 if dataclasses.is_dataclass(field_default(RunConfig, f.name))}
#: The dataclasses whose fields the keys of each section of a saved configuration are ("": the top level).
SECTIONS: dict[str, tuple[type, ...]] = {"": (RunConfig, StudyConfig), "run": (RunConfig,),
                                         **{name: (cls,) for name, cls in RUN_SECTIONS.items()}}
SUBSECTIONS = {"": ("run", *RUN_SECTIONS), "run": tuple(RUN_SECTIONS)}
DOCUMENT_KEYS = frozenset({"format", "topo_version", "command", "environment"})  # around config.json's "config"
NOT_SETTINGS = frozenset({"help", "config", "config_fields", "verbosity"})
CONFIG_FIX = "give a JSON (or YAML) file of settings laid out like a run's config.json"


def _read_yaml(path: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise UserError(f"configuration file {path} is YAML but PyYAML is not installed: give the settings as JSON "
                        "(e.g. a run's config.json), or pip install pyyaml") from None
    text = read_text(path, what="configuration file", fix=CONFIG_FIX)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"configuration file {path} is not valid YAML ({getattr(e, 'problem', None) or e}{where}); "
                        f"{CONFIG_FIX}") from None


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a ``--config`` file: JSON, or YAML (``.yaml``/``.yml``) where PyYAML is installed.

    Either a configuration as a run's ``config.json`` holds it under ``"config"``
    (sections ``construct``, ``train``, ...; a study's ``run``), that whole file, or
    settings in that layout written by hand, where top-level keys may also name
    options (``epochs``, ``batch-size``; see :func:`config_defaults`).
    """
    yaml_file = Path(path).suffix.lower() in (".yaml", ".yml")
    data = _read_yaml(path) if yaml_file else read_json(path, what="configuration file", fix=CONFIG_FIX)
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and set(data) - {"config"} <= DOCUMENT_KEYS:
        data = data["config"]
    if not isinstance(data, dict):
        raise UserError(f"configuration file {path} holds {type(data).__name__}, not a mapping of settings; "
                        f"{CONFIG_FIX}")
    return data


def _settings(data: dict[str, Any], path: str, section: str = "") -> Iterator[tuple[str, str, str, Any]]:
    """(key as written, section, field, value) of every setting in ``data``, sections flattened."""
    prefix = f"{section}." if section else ""
    for field, value in data.items():
        if field in SUBSECTIONS.get(section, ()):
            if not isinstance(value, dict):
                raise UserError(f"configuration file {path}: {prefix}{field} is {value!r}, not a mapping of settings")
            yield from ((f"{prefix}{key}", sub, name, v) for key, sub, name, v in _settings(value, path, field))
        else:
            yield f"{prefix}{field}", section, field, value


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _option_names(actions: dict[str, argparse.Action]) -> dict[str, str]:
    """Each option's ``dest`` by the names a file may give it: the ``dest`` and the long flag without its dashes
    (``batch_size``, ``batch-size``; ``--no-...`` flags left out)."""
    names = {dest: dest for dest in actions}
    for dest, action in actions.items():
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-"):
                names.update({flag[2:]: dest, flag[2:].replace("-", "_"): dest})
    return names


def _dest_of(section: str, field: str, groups: dict[str, dict[str, str]], names: dict[str, str]) -> str | None:
    """The option a setting gives its value to, None where this command has none. A field of a configuration
    dataclass goes only to the flag made from it; other top-level keys name options (see `_option_names`)."""
    # one flag sets the seed of every section (--seed) and the training's progress bars (--no-progress)
    if (field == "seed" and (section in ("", "run") or section in groups)) or (
            (field, section) == ("progress", "train") and section in groups):
        return field if field in names else None
    if section in RUN_SECTIONS:
        return field if field in groups.get(section, {}) else None
    owners = (("data", RunConfig),) if section == "run" else (("data", RunConfig), ("study", StudyConfig))
    for group, cls in owners:
        if field in _field_names(cls):
            return field if field in groups.get(group, {}) else None
    return names.get(field) if section == "" else None


def _known(section: str, field: str) -> bool:
    return any(field in _field_names(cls) for cls in SECTIONS[section])


def _allows_none(action: argparse.Action, groups: dict[str, dict[str, str]]) -> bool:
    """Whether an option may be None: its dataclass field's type says so, or (no such field) its default is."""
    for group, fields in groups.items():
        if action.dest in fields:
            field = next(f for f in dataclasses.fields(GROUP_CLASSES[group]) if f.name == action.dest)
            return "None" in str(field.type)
    return action.default is None


def _config_value(action: argparse.Action, key: str, value: Any, path: str, none_ok: bool) -> Any:
    """``value`` checked and converted as the option's command-line text would be."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    where = f"configuration file {path}: {key} {value!r} ({flag})"
    if action.nargs == 0:  # on/off flags
        if not isinstance(value, bool):
            raise UserError(f"{where} is not true or false")
        return value
    if value is None and none_ok:
        return value
    if value is None or isinstance(value, (bool, dict)):
        raise UserError(f"{where} is not a value this setting takes; see topo-build --help")
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if action.type is not None:
        try:
            value = action.type(text)
        except (argparse.ArgumentTypeError, ValueError, UserError) as e:
            raise UserError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} is not one of {', '.join(map(str, action.choices))}")
    return value


@dataclasses.dataclass
class FileSettings:
    """What a ``--config`` file gives a command: option values by ``dest``; the RunConfig settings the command has
    no option for (``kept``, by section), which its configuration takes as they are; and the other settings
    (a study's, given to another command) away from their defaults (``unused``, ``key=value``, for a log line)."""

    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    kept: dict[str, Any] = dataclasses.field(default_factory=dict)
    unused: list[str] = dataclasses.field(default_factory=list)

    def keep(self, key: str, section: str, field: str, value: Any) -> None:
        if section in RUN_SECTIONS:
            self.kept.setdefault(section, {})[field] = value
        elif field in _field_names(RunConfig):
            self.kept[field] = value
        elif value != _field_default(section, field):
            self.unused.append(f"{key}={value!r}")


def config_defaults(path: str, parser: argparse.ArgumentParser) -> FileSettings:
    """What the ``--config`` file ``path`` sets for ``parser``'s command (see :class:`FileSettings`).

    An unknown key, a value the option would refuse, or two keys giving one option different values are
    one-line errors naming the key.
    """
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_SETTINGS}
    groups, names = parser.get_default("config_fields"), _option_names(actions)
    values: dict[str, tuple[str, Any]] = {}
    settings = FileSettings()
    for key, section, field, value in _settings(read_config_file(path), path):
        dest = _dest_of(section, field, groups, names)
        if dest is None:
            if not _known(section, field):
                raise UserError(f"configuration file {path}: unknown setting {key!r}; use the keys of a run's "
                                f"config.json or the options of {parser.prog} --help")
            settings.keep(key, section, field, value)
            continue
        value = _config_value(actions[dest], key, value, path, _allows_none(actions[dest], groups))
        if dest in values and values[dest][1] != value:
            other, was = values[dest]
            raise UserError(f"configuration file {path}: {other} {was!r} and {key} {value!r} set the same option "
                            f"({actions[dest].option_strings[0]}) to different values; keep one")
        values[dest] = (key, value)
    settings.values = {dest: value for dest, (_, value) in values.items()}
    return settings


def _field_default(section: str, field: str) -> Any:
    cls = next(cls for cls in SECTIONS[section] if field in _field_names(cls))
    return field_default(cls, field)


def _run_data_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """``eval`` of a run directory: the run's data settings and seed (which draws planted and fake data), so
    that the network is evaluated on the validation images it was evaluated on in training."""
    source = Path(parser.parse_known_args(argv)[0].source)
    if not (source / CONFIG_FILE).is_file():
        return {}
    saved = RunConfig.of_run(RunDir.existing(source))
    return {name: getattr(saved, name) for name in [*parser.get_default("config_fields")["data"], "seed"]}


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    """The arguments of ``command``: the command line over the ``--config`` file over the defaults (``eval`` of
    a run directory: the run's data settings). ``explicit``: the options the command line or the file set away
    from their defaults; ``config_file``: the file's :class:`FileSettings`."""
    parser = build_parser(command)
    config_option = _Parser(prog=parser.prog, add_help=False)
    config_option.add_argument("--config")
    path = config_option.parse_known_args(argv)[0].config
    settings = config_defaults(path, parser) if path else FileSettings()
    before = {dest: parser.get_default(dest) for dest in settings.values}
    if command == "eval":
        parser.set_defaults(**_run_data_defaults(parser, argv))
    parser.set_defaults(**settings.values)
    args = parser.parse_args(argv)
    args.explicit = explicit_options(command, argv, args) | {
        dest for dest, value in settings.values.items() if value != before[dest]}
    args.config_file = settings
    return args


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
        summary = read_controls(run)
        if summary is not None:
            print(verdict(summary), flush=True)
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
    _, summary = constructions_stage(config, bundle, run)
    if dist_info.rank() == 0:
        print(f"topology: {run.topology}", flush=True)
        if summary is not None:
            print(verdict(summary), flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    spec = read_spec(args.spec)
    config = run_config(args)
    run = RunDir(_out_dir(args, "train"))
    _reuse(args, run, config, "train")
    bundle = load_data(config)
    _check_fits(spec, bundle, args.spec, args.data)
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
    changed = sorted(set(args.explicit) - RESUMABLE_CHANGES - RUN_RESUMABLE_CHANGES - {"out", "resume", "shard",
                                                                                      "verbosity"})
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


def cmd_export(args: argparse.Namespace) -> int:
    if args.format is None and args.out is None:
        raise UserError(f"give --format ({', '.join(FORMATS)}), or --out FILE with a suffix that names one")
    result = export_run(args.run_dir, args.format, network=args.network, path=args.out, ema=args.ema)
    if dist_info.rank() == 0:
        print(result.path, flush=True)
    return 0


def _check_fits(spec: builders.NetworkSpec, bundle: Any, source: str, data: str) -> None:
    """A one-line error where the network's input channels or classes are not the data's."""
    if spec.in_channels != bundle.in_channels or spec.head.num_classes != bundle.num_classes:
        raise UserError(
            f"spec {source} takes {spec.in_channels} input channels and {spec.head.num_classes} classes, but "
            f"{data} has {bundle.in_channels} and {bundle.num_classes}: use a spec built for this data"
        )


def _evaluated(args: argparse.Namespace) -> tuple[torch.nn.Module, builders.NetworkSpec, TrainConfig]:
    """The network ``eval`` evaluates, its spec, and the training settings its evaluation follows (autocast,
    channels-last: a run's own; else the defaults)."""
    source = Path(args.source)
    if args.ema and (args.weights or not source.is_dir()):
        raise UserError("--ema loads a run directory's averaged weights: drop --weights, or drop --ema")
    if source.is_dir():
        run = RunDir.existing(source)
        settings = RunConfig.of_run(run).train
        if not args.weights:
            model, spec = load_run(run.root, args.network, ema=args.ema, with_spec=True)
            return model, spec, settings
        spec, spec_source = run_spec(run, args.network), f"the {args.network} spec of run {run.root}"
    elif source.suffix == ".safetensors" and not args.weights:
        model, spec = load_safetensors(source)
        return model, spec, TrainConfig()
    elif not args.weights:
        raise UserError(f"{source} is not a run directory: give a spec's weights with --weights FILE, or a run "
                        "directory (the --out of an earlier run)")
    else:
        spec, spec_source, settings = read_spec(source), f"spec {source}", TrainConfig()
    model = build_with_weights(spec, read_weights(args.weights), source=args.weights, spec_source=spec_source)
    return model.eval(), spec, settings


def _check_out_file(out: str | None) -> None:
    if out is None:
        return
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder: give the JSON file to write, e.g. {Path(out) / 'eval.json'}")
    RunDir(Path(out).parent).check_writable()


def cmd_eval(args: argparse.Namespace) -> int:
    _check_out_file(args.out)
    device = check_device(args.device)
    model, spec, settings = _evaluated(args)
    config = run_config(args)
    bundle = load_data(config)
    _check_fits(spec, bundle, args.source, args.data)
    settings = dataclasses.replace(settings, device=str(device), workers=_workers(args.workers), progress=False)
    metrics = timed_evaluate(model.to(device), bundle.val, device=device, batch_size=args.batch_size,
                             config=settings)
    network = args.network if Path(args.source).is_dir() else None  # a spec or an exported file: one network
    result = {"source": str(args.source), "network": network, "weights": args.weights, "data": config.data,
              "data_dir": config.data_dir, "seed": config.seed, "split": "val", "device": str(device),
              "batch_size": args.batch_size, **metrics}
    if dist_info.rank() == 0:
        name = Path(args.source).name + (f"/{network}" if network else "")
        frame = pd.DataFrame([{"Network": name, "Data": config.data, "Images": metrics["count"],
                               "Loss": metrics["loss"], "Top-1 (%)": 100 * metrics["top1"],
                               "Top-5 (%)": 100 * metrics["top5"], "Throughput (img/s)": metrics["images_per_s"]}])
        print("\n" + to_markdown(frame), flush=True)
        if args.out:
            atomic_write_json(args.out, result)
            print(f"results: {args.out}", flush=True)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "construct": cmd_construct, "train": cmd_train, "analyze": cmd_analyze, "report": cmd_report,
    "study": cmd_study, "export": cmd_export, "eval": cmd_eval,
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
    handler = None
    try:
        args = parse(command, argv)
        dist_info.init_from_env()
        handler = configure_logging(getattr(args, "verbosity", 0))
        if args.config_file.unused:
            log.info("%s does not use these settings of %s: %s", build_parser(command).prog, args.config,
                     ", ".join(args.config_file.unused))
        with deterministic_algorithms(getattr(args, "deterministic", False)):
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
