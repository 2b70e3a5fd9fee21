"""The bad-input battery: every user mistake, in every subcommand, is one line and exit status 2.

Each case prepares its inputs (damaged files, odd folders, runs of another
version) and runs `topo-build` in the process. For each one: exit status 2,
exactly one line on stderr starting ``topo-build: error:`` and naming the thing
at fault, no traceback, and no file left behind (the tree under the test's
folder is the same before and after; ``--out`` is never created).
docs/errors.md lists what each kind of bad input gets.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from builders.spec import ConvSpec, HeadSpec, InceptionSpec, NetworkSpec
from topo.cli.main import main
from topo.construct.config import ConstructConfig
from topo.common.writing import atomic_torch_save, atomic_write_json, atomic_write_text
from topo.run.config import RunConfig
from topo.run.rundir import RunDir
from topo.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--skeleton", "1,pool,1", "--stats-batches", "2", "--epochs", "1", "--workers", "0", "--no-progress"]
SAVED = RunConfig(data="digits", controls=False, construct=ConstructConfig(skeleton="1,pool,1", stats_batches=2),
                  train=TrainConfig(epochs=1, workers=0, progress=False))


# --------------------------------------------------------------------------- inputs the cases prepare
def tiny_spec(folder: Path, in_channels: int = 1, name: str = "tiny.json") -> Path:
    spec = NetworkSpec(stem=(ConvSpec("conv1", 8, 3),), head=HeadSpec(num_classes=10), in_channels=in_channels,
                       input_size=8)
    path = folder / name
    atomic_write_text(path, spec.to_json() + "\n")  # as topo-build writes specs
    return path


def written(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def saved_run(folder: Path, **document: object) -> Path:
    """A run directory as `topo-build` leaves it after writing its configuration (``document`` overrides)."""
    run = RunDir(folder / "run")
    run.write_config(SAVED.to_dict())
    if document:
        data = json.loads(run.config_path.read_text())
        atomic_write_json(run.config_path, {**data, **document})
    return run.root


def constructed_run(folder: Path) -> RunDir:
    """A run whose construction is done (topology.json: a one-convolution network), training not started."""
    run = RunDir(saved_run(folder))
    spec = tiny_spec(folder)
    shutil.copy(spec, run.topology)
    run.mark_done("construct", {"modules": 0})
    return run


def checkpoint_run(folder: Path) -> Path:
    """A constructed run whose discovered network's checkpoint was cut short."""
    run = constructed_run(folder)
    run.training.root.mkdir()
    shutil.copy(run.topology, run.training.spec("discovered"))  # what the training stage writes first
    atomic_torch_save({"model": {"w": torch.zeros(64)}, "epoch": 0}, run.training.checkpoint("discovered"))
    truncated(run.training.checkpoint("discovered"))
    return run.root


def reported_run(folder: Path, damage: str) -> Path:
    """A run with one recorded module whose statistics, clusters or records file is damaged."""
    run = constructed_run(folder)
    atomic_write_json(run.construction.records, [{"name": "inception3a"}])
    written(run.construction.stats("inception3a"), b"\x80\x02 not a torch file")
    atomic_write_json(run.construction.clusters("inception3a"), {"method": "arora"})
    if damage == "records":
        truncated(run.construction.records)
    elif damage == "stats":  # the clusters are fine, the statistics are not
        atomic_write_json(run.construction.clusters("inception3a"), {
            "method": "arora", "window": 1, "n_clusters": 0, "kernel_counts": {}, "dead_units": [],
            "channel_order": [0], "channel_labels": [0], "clusters": []})
    return run.root


def truncated_config_run(folder: Path) -> Path:
    run = saved_run(folder)
    truncated(run / "config.json")
    return run


def damaged_progress_run(folder: Path) -> Path:
    run = saved_run(folder)
    written(run / "construction" / "progress.json", b'{"spec": {}, "rec')
    return run


def damaged_prefix_run(folder: Path) -> Path:
    """A run whose construction recorded one module (progress.json is whole) but whose weights file is not."""
    run = RunDir(saved_run(folder))
    module = InceptionSpec(8, 8, 8, 8, 8, 8, 8, name="inception3a")
    spec = NetworkSpec(stem=(ConvSpec("conv1", 8, 3),), stages=(module,), head=HeadSpec(num_classes=10),
                       in_channels=1, input_size=8)
    atomic_write_json(run.construction.progress, {"spec": spec.to_dict(), "records": [{"name": "inception3a"}]})
    written(run.construction.prefix(1), b"PK\x03\x04 cut short")
    return run.root


def saved(obj: object, folder: Path) -> Path:
    path = folder / "saved.pth"
    atomic_torch_save(obj, path)
    return path


def npz(folder: Path, **arrays: np.ndarray) -> Path:
    path = folder / "data.npz"
    np.savez(path, **arrays)
    return path


def one_class_tree(folder: Path, image_tree: Path) -> Path:
    tree = Path(shutil.copytree(image_tree, folder / "tree"))
    for split in ("train", "val"):
        shutil.rmtree(tree / split / "flower")
    return tree


def weights_of_another_network(folder: Path) -> Path:
    path = folder / "other.pth"
    atomic_torch_save({"conv.weight": torch.zeros(4, 3, 3, 3)}, path)
    return path


# --------------------------------------------------------------------------- the battery
@dataclass(frozen=True)
class Case:
    """A bad input: ``make(inputs, out, image_tree)`` prepares it and returns the argv and what the line names."""

    name: str
    make: Callable[[Path, Path, Path], tuple[list[str], str]]


def _cases() -> list[Case]:
    def out(o: Path) -> list[str]:
        return ["--out", str(o)]

    return [
        # flags (argparse): one line, exit 2
        Case("negative-epochs", lambda i, o, t: (["--epochs", "-1", *out(o)], "--epochs")),
        Case("unknown-method", lambda i, o, t: (["--method", "kmeans", *out(o)], "--method")),
        Case("zero-batch", lambda i, o, t: (["--batch-size", "0", *out(o)], "--batch-size")),
        Case("lr-not-a-number", lambda i, o, t: (["--lr", "fast", *out(o)], "--lr")),
        Case("budget-not-a-number", lambda i, o, t: (["--budget", "lots", *out(o)], "--budget")),
        Case("window-4", lambda i, o, t: (["construct", "--window", "4", *out(o)], "--window")),
        Case("positions-zero", lambda i, o, t: (["--positions", "0", *out(o)], "--positions")),
        Case("stats-cost-zero", lambda i, o, t: (["--stats-cost", "0", *out(o)], "--stats-cost")),
        Case("unknown-flag", lambda i, o, t: (["--colour", "red", *out(o)], "unrecognized arguments: --colour")),
        Case("train-without-spec", lambda i, o, t: (["train", *out(o)], "spec")),
        Case("analyze-unknown-variant", lambda i, o, t: (["analyze", "--variant", "tiny", *out(o)], "--variant")),
        Case("report-without-run", lambda i, o, t: (["report"], "run_dir")),
        # flags checked after parsing
        Case("workers-two", lambda i, o, t: (["--workers", "two", *FAST[:-3], *out(o)], "--workers")),
        Case("jobs-zero", lambda i, o, t: (["construct", "--jobs", "0", *FAST[:4], *out(o)], "--jobs")),
        Case("negative-momentum", lambda i, o, t: (["--momentum", "-1", *FAST, *out(o)], "--momentum")),
        Case("growing-decay", lambda i, o, t: (["train", str(tiny_spec(i)), "--decay-factor", "5", *FAST[4:],
                                                *out(o)], "--decay-factor")),
        Case("unknown-device", lambda i, o, t: (["train", str(tiny_spec(i)), "--device", "tpu", *FAST[4:], *out(o)],
                                                "device 'tpu' (--device) is not a device name")),
        Case("cuda-without-a-gpu", lambda i, o, t: (["analyze", "--device", "cuda", "--variant", "small", *out(o)],
                                                    "device 'cuda' (--device): this machine has 0 CUDA")),
        Case("skeleton-typo", lambda i, o, t: (["--skeleton", "2,poll,2", *out(o)], "skeleton '2,poll,2'")),
        Case("unknown-reference", lambda i, o, t: (["--reference", "resnet", *FAST, *out(o)], "reference 'resnet'")),
        # data
        Case("missing-data-dir", lambda i, o, t: (["--data", "imagenet", "--data-dir", str(i / "none"), *FAST,
                                                   *out(o)], str(i / "none"))),
        Case("data-dir-a-file", lambda i, o, t: (["--data", "folder", "--data-dir", str(written(i / "f", b"x")),
                                                  *FAST, *out(o)], "is a file, not a folder")),
        Case("tensors-missing", lambda i, o, t: (["--data", "tensors", "--data-dir", str(i / "no.npz"), *FAST,
                                                  *out(o)], "no.npz: no such file")),
        Case("tensors-garbage", lambda i, o, t: (["--data", "tensors", "--data-dir",
                                                  str(written(i / "g.npz", b"not a zip")), *FAST, *out(o)],
                                                 "g.npz: not an .npz archive")),
        Case("tensors-one-class", lambda i, o, t: (
            ["--data", "tensors", "--data-dir", str(npz(i, x=np.zeros((40, 1, 8, 8), np.float32),
                                                         y=np.zeros(40, np.int64))), *FAST, *out(o)],
            "single class")),
        Case("folder-one-class", lambda i, o, t: (["--data", "folder", "--data-dir", str(one_class_tree(i, t)),
                                                   "--image-size", "16", *FAST, *out(o)], "at least 2")),
        # numeric settings against the data, before any work
        Case("batch-larger-than-split", lambda i, o, t: (["--batch-size", "5000", *FAST, *out(o)],
                                                          "--batch-size 1437 or less")),
        Case("budget-below-stem", lambda i, o, t: (["--budget", "1000", *FAST, *out(o)], "--budget")),
        Case("poolings-leave-no-map", lambda i, o, t: (["--skeleton", "1,pool,1,pool,1,pool,1,pool,1", *FAST[2:],
                                                        *out(o)], "leaves no map for inception6a")),
        Case("window-larger-than-maps", lambda i, o, t: (["--window", "5", "--skeleton", "pool,1", *FAST[2:],
                                                          *out(o)], "--window 3")),
        Case("images-too-small-for-the-reference", lambda i, o, t: (["--image-size", "4", *FAST, *out(o)],
                                                                    "reference googlenet-small does not fit")),
        Case("train-batch-larger-than-split", lambda i, o, t: (["train", str(tiny_spec(i)), "--batch-size", "2000",
                                                                *FAST[4:], *out(o)], "--batch-size 1437")),
        # output folders
        Case("out-is-a-file", lambda i, o, t: ([*FAST, "--out", str(written(i / "file", b"x"))],
                                               "is an existing file")),
        Case("out-under-a-file", lambda i, o, t: ([*FAST, "--out", str(written(i / "file", b"x") / "run")],
                                                  "is a file, not a folder")),
        Case("out-read-only", lambda i, o, t: ([*FAST, "--out", "/sys/topo-build-run"], "cannot be written")),
        Case("out-holds-a-run", lambda i, o, t: ([*FAST, "--out", str(saved_run(i))], "already holds a run")),
        Case("construct-into-a-train-folder", lambda i, o, t: (
            ["construct", *FAST, "--out", str(saved_run(i, command="train"))], "output of topo-build train")),
        Case("construct-other-settings", lambda i, o, t: (
            ["construct", *FAST, "--round-to", "4", "--out", str(saved_run(i, command="construct"))],
            "--round-to 1, not 4")),
        Case("construct-other-control-kinds", lambda i, o, t: (
            ["construct", *FAST, "--control-kinds", "noise", "--out", str(saved_run(i, command="construct"))],
            "--control-kinds phase,other, not noise")),
        Case("control-kind-unknown", lambda i, o, t: (["construct", *FAST, "--control-kinds", "phase,pink", *out(o)],
                                                      "names no control kind or an unknown one")),
        Case("control-one-real-seed", lambda i, o, t: (["construct", *FAST, "--real-seeds", "1", *out(o)],
                                                       "at least 2 constructions on the data")),
        # resume
        Case("resume-missing", lambda i, o, t: (["--resume", str(i / "none")], "not a topo-build run directory")),
        Case("resume-truncated-config", lambda i, o, t: (["--resume", str(truncated_config_run(i))],
                                                         "config.json is truncated or not JSON")),
        Case("resume-config-not-a-run", lambda i, o, t: (["--resume", str(saved_run(i, config=[1, 2]))],
                                                         "config.json holds a list, not a configuration")),
        Case("resume-unknown-setting", lambda i, o, t: (
            ["--resume", str(saved_run(i, config={**SAVED.to_dict(), "colour": "red"}))], "colour")),
        Case("resume-other-version", lambda i, o, t: (["--resume", str(saved_run(i, topo_version="0.0.1"))],
                                                      "written by topo-build 0.0.1")),
        Case("resume-other-format", lambda i, o, t: (["--resume", str(saved_run(i, format=0))], "run format 0")),
        Case("resume-other-epochs", lambda i, o, t: (["--resume", str(saved_run(i)), "--epochs", "3"],
                                                     "--epochs 1, not 3")),
        Case("resume-other-out", lambda i, o, t: (["--resume", str(saved_run(i)), *out(o)], "--out")),
        Case("resume-truncated-state", lambda i, o, t: (
            ["--resume", str(truncated(constructed_run(i).state_path).parent)], "state.json is truncated")),
        Case("resume-truncated-checkpoint", lambda i, o, t: (["--resume", str(checkpoint_run(i))],
                                                             "discovered.ckpt is truncated or corrupt")),
        Case("resume-damaged-progress", lambda i, o, t: (["--resume", str(damaged_progress_run(i))],
                                                         "progress.json is truncated")),
        Case("resume-damaged-construction-weights", lambda i, o, t: (["--resume", str(damaged_prefix_run(i))],
                                                                     "construction weights")),
        # train
        Case("train-missing-spec", lambda i, o, t: (["train", str(i / "none.json"), *out(o)], "spec file")),
        Case("train-truncated-spec", lambda i, o, t: (["train", str(truncated(tiny_spec(i))), *out(o)],
                                                      "tiny.json: NetworkSpec JSON is malformed")),
        Case("train-invalid-spec", lambda i, o, t: (["train", str(written(i / "bad.json", json.dumps(
            {"stem": [{"type": "conv", "name": "c", "out_channels": -3, "kernel_size": 3}]}).encode())), *out(o)],
            "out_channels")),
        Case("train-other-settings", lambda i, o, t: (["train", str(tiny_spec(i)), *FAST[4:], "--lr", "0.1",
                                                       "--out", str(saved_run(i, command="train"))],
                                                      "--lr 0.05, not 0.1")),
        Case("train-spec-for-other-data", lambda i, o, t: (["train", str(tiny_spec(i, in_channels=3)), *FAST[4:],
                                                            *out(o)], "input channels")),
        # analyze
        Case("analyze-missing-weights", lambda i, o, t: (["analyze", "--weights", str(i / "no.pth"), *out(o)],
                                                         "weights file")),
        Case("analyze-weights-not-torch", lambda i, o, t: (
            ["analyze", "--weights", str(written(i / "w.pth", b"PK garbage")), *out(o)], "w.pth is truncated")),
        Case("analyze-weights-not-a-state-dict", lambda i, o, t: (["analyze", "--weights", str(saved([1, 2], i)),
                                                                   *out(o)], "is not a state dict")),
        Case("analyze-weights-of-another-network", lambda i, o, t: (
            ["analyze", "--weights", str(weights_of_another_network(i)), "--variant", "small", "--width-mult",
             "0.25", "--num-classes", "10", "--stats-batches", "1", "--workers", "0", "--no-progress", *out(o)],
            "other.pth does not fit the network")),
        Case("analyze-variant-too-big", lambda i, o, t: (["analyze", "--no-progress", *out(o)],
                                                         "--variant torchvision does not fit the 8x8 images")),
        Case("analyze-truncated-spec", lambda i, o, t: (["analyze", "--spec", str(truncated(tiny_spec(i))), *out(o)],
                                                        "spec file")),
        # report
        Case("report-missing", lambda i, o, t: (["report", str(i / "none")], "not a topo-build run directory")),
        Case("report-truncated-records", lambda i, o, t: (["report", str(reported_run(i, "records"))],
                                                          "records.json is truncated")),
        Case("report-damaged-clusters", lambda i, o, t: (["report", str(reported_run(i, "clusters"))],
                                                         "inception3a_clusters.json lacks")),
        Case("report-damaged-stats", lambda i, o, t: (["report", str(reported_run(i, "stats"))],
                                                      "inception3a_stats.pt")),
    ]


CASES = _cases()
COMMANDS = ("construct", "train", "analyze", "report")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _on_digits(argv: list[str]) -> list[str]:
    """The cases are written for the embedded digits: ``--data digits`` where a case names no data."""
    command = _command(argv)
    if command == "report" or "--data" in argv:
        return argv
    at = 1 if argv and argv[0] == command else 0
    return [*argv[:at], "--data", "digits", *argv[at:]]


def _status(argv: list[str]) -> int:
    argv = _on_digits(argv)
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return int(e.code)


def _command(argv: list[str]) -> str:
    return argv[0] if argv and argv[0] in COMMANDS else "run"


def test_the_battery_spans_every_subcommand(tmp_path: Path, image_tree: Path) -> None:
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
    per_command: dict[str, int] = {}
    for n, case in enumerate(CASES):
        (tmp_path / str(n)).mkdir()
        argv, _ = case.make(tmp_path / str(n), tmp_path / str(n) / "out", image_tree)
        per_command[_command(argv)] = per_command.get(_command(argv), 0) + 1
    assert set(per_command) == {"run", *COMMANDS} and min(per_command.values()) >= 3, per_command


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_is_one_line_and_exit_2(case: Case, tmp_path: Path, image_tree: Path, capsys) -> None:
    if case.name == "out-read-only" and not Path("/sys").is_dir():
        pytest.skip("needs a read-only /sys")
    if case.name == "cuda-without-a-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    argv, names = case.make(inputs, out, image_tree)
    before = _tree(tmp_path)
    capsys.readouterr()
    status = _status(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("topo-build: error: ") and names in lines[0], lines[0]
    assert not out.exists(), "the output folder was created"
    assert _tree(tmp_path) == before, "a file was written or changed"
