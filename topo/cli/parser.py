"""The flags of every `topo-build` command, made from the configuration dataclasses that own them (their
defaults and choices), and the value types that check each flag's text.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NoReturn

from topo.cluster import METHODS
from topo.common.errors import UserError
from topo.construct.config import (
    BUDGETS,
    FALLBACKS,
    INIT_MODES,
    NULLS,
    SPLITS,
    STEMS,
    WINDOWS,
    ConstructConfig,
)
from topo.construct.decoding import DECODERS
from topo.controls.control import KINDS as CONTROL_KINDS
from topo.controls.control import ControlConfig
from topo.data import DATASETS
from topo.run.config import AUX_POLICIES, REFERENCES, RunConfig
from topo.run.export import FORMATS
from topo.run.study import ARMS, StudyConfig
from topo.train.config import SCHEDULES, TrainConfig

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


def workers_value(text: str) -> int | str:
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


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class Parser(argparse.ArgumentParser):
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
    flags.add("--data", "data", "data set: an ImageNet-style tree (imagenet, folder), cifar10/100, patches (grey "
                                "patches of eleven photographs shipped with scikit-image, labelled by photograph; "
                                "embedded, no download), digits (scikit-learn's embedded 8x8 handwritten digits), "
                                "fake (random images), tensors (arrays in an .npz file, see --data-dir) or planted "
                                "(data generated by a planted deep network)", choices=list(DATASETS))
    flags.add("--data-dir", "data_dir", "where the data set's files are (imagenet/folder: a folder with train/ "
                                        "and val/ class folders; tensors: the .npz file of x and y arrays)",
              show="none")
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
    flags.add("--controls", "controls", "construct also on more seeds and on each --control-kinds, and test "
                                        "which properties of the topology (units, kernel mix, widths) depend on "
                                        "the data (--no-controls: skip)", action=argparse.BooleanOptionalAction)
    flags.add("--jobs", "jobs", "run, construct: the run's construction and the control's side by side in this "
                                "many worker processes (the same results; 1: one after the other here), and the "
                                "run's two trainings, each with its share of the threads; auto: one per core on the "
                                "CPU, 1 on a GPU, and each construction's clustering in worker processes on the "
                                "cores the constructions leave")
    flags.add("--fresh-init", "fresh_init", "train the discovered network from random weights even where the "
                                            "construction initialised it (the ablation of --init hebbian)",
              action="store_true")
    return flags.fields


def _control_kinds(text: str) -> tuple[str, ...]:
    """``all`` or a comma-separated list of control kinds."""
    kinds = CONTROL_KINDS if text.strip() == "all" else tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in CONTROL_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r} names no control kind or an unknown one; use all or some of "
                                         f"{','.join(CONTROL_KINDS)}")
    return kinds


def _add_control(p: argparse.ArgumentParser) -> dict[str, str]:
    flags = _Flags(p, "control", ControlConfig)
    flags.add("--control-kinds", "kinds", "what the topology is tested against: all, or some of phase "
                                         "(phase-randomised images), other (another real data set), shuffled "
                                         "(pixel-shuffled images), noise (matched-moment noise), comma-separated",
              type=_control_kinds, show=",".join(ControlConfig().kinds))
    flags.add("--real-seeds", "real_seeds", "constructions on the data, the run's own included (at least 2)",
              type=_positive_int)
    flags.add("--control-seeds", "control_seeds", "constructions per control kind (4, with --real-seeds 5, "
                                                  "let the control reach p < 0.01)", type=_positive_int)
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
    flags.add("--direct-only", "direct_only", "drop a pair's co-firing at an offset that its stronger co-firing at "
                                              "another offset explains through the map's smoothness (a unit seen "
                                              "beside a partner's translate; --no-direct-only: the graph before "
                                              "2026-12-07)",
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
    flags.add("--slim-epochs", "slim_epochs", "choose the widths by training signal: train the discovered network "
                                              "--slim-over times as wide this many epochs with a cost-weighted L1 "
                                              "penalty on its BatchNorm scales, keep the strongest channels within "
                                              "the budget (network slimming; 0: the clusters' widths)",
              type=_non_negative_int)
    flags.add("--slim-over", "slim_over", "width factor of the over-complete network slimming starts from",
              type=_positive_float)
    flags.add("--slim-penalty", "slim_penalty", "strength of slimming's L1 penalty on the BatchNorm scales",
              type=_positive_float)
    return flags.fields


def _add_clustering(p: argparse.ArgumentParser) -> dict[str, str]:
    flags = _Flags(p, "statistics and clustering", ConstructConfig)
    flags.add("--method", "method", "clustering method", choices=METHODS)
    flags.add("--window", "window", "largest window a new unit looks at, hence the largest kernel", type=_int,
              choices=WINDOWS, show="the largest that fits each map, up to 5")
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
    flags.add("--stats-cost", "stats_cost", "with --positions auto: the statistics of a layer cost at most this many "
                                            "forward passes of its prefix (fewer positions, and a warning where "
                                            "that leaves fewer observations than planned)", type=_positive_float)
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
    flags.add("--detect", "detect", "a difference in top-1 points to detect with 80%% power (alpha 0.05): the "
                                    "--seeds run as a pilot, then seeds are added as its SDs call for "
                                    "(docs/study.md, Power)", type=_positive_float, show="off",
              metavar="POINTS")
    flags.add("--max-seeds", "max_seeds", "with --detect, the most seeds per arm", type=_positive_int)
    flags.group.add_argument("--shard", metavar="I/N", help="run every N-th unit from unit I (0 <= I < N) into "
                                                            "the same --out; gather with --summarize")
    flags.group.add_argument("--side-by-side", default="auto", metavar="N",
                             help="run the study as N shards side by side in worker processes, each with its share "
                                  "of the threads (auto: one per core on the CPU, 1 on a GPU; 1: one unit after the "
                                  "other here); default: auto")
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
    p = Parser(prog=prog, description=DESCRIPTIONS[command], epilog=epilog)
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
            groups["control"] = _add_control(p)
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
