"""`topo-build` end to end: digits and an ImageFolder tree, resume after a kill, analyze, and user errors."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from checks import one_line_error
from gloo_group import finish, torchrun

import builders
from builders.spec import ConvSpec, HeadSpec, NetworkSpec
from topo.cli.main import main
from topo.construct.prefix import calibrate_batchnorm
from topo.data import load, make_loader
from topo.train.files import read_checkpoint
from topo.common.writing import KILL_AT_WRITE

FAST = ["--skeleton", "1,pool,1", "--stats-batches", "2", "--epochs", "1", "--batch-size", "64",
        "--workers", "0", "--no-progress", "--data", "digits", "--no-controls"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "digits"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded machine's cores are not oversubscribed
    try:
        assert main([*FAST, "--epochs", "4", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_run_on_digits_writes_every_result(digits_run: Path):
    out = digits_run
    for name in ("config.json", "state.json", "topology.json", "comparison.csv", "comparison.md",
                 "comparison.tex", "report.md", "construction/records.json",
                 "construction/inception3a_stats.pt", "construction/inception3a_clusters.json",
                 "training/discovered.ckpt", "training/discovered_metrics.csv",
                 "training/reference.ckpt", "training/reference_metrics.csv"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["data"] == "digits" and config["environment"]["torch"] == torch.__version__

    spec = NetworkSpec.from_json((out / "topology.json").read_text())
    net = builders.build(spec).eval()
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)

    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 2
    rows = json.loads((out / "state.json").read_text())
    discovered, reference = rows["train:discovered"], rows["train:reference"]
    assert abs(discovered["macs"] / reference["macs"] - 1) <= 0.05  # the budget: the reference's cost
    assert discovered["top1"] > 0.8 and reference["top1"] > 0.8  # both train: chance is 0.1
    assert discovered["throughput"] > 0
    report = (out / "report.md").read_text()
    for link in [part.split(")")[0] for part in report.split("](")[1:]]:
        assert (out / link).is_file(), link
    assert list((out / "figures").glob("*.png")) and list((out / "figures").glob("*.pdf"))


@pytest.mark.slow
def test_report_command_rerenders(digits_run: Path, capsys):
    (digits_run / "report.md").unlink()
    assert main(["report", str(digits_run)]) == 0
    assert (digits_run / "report.md").is_file()
    assert "discovered" in capsys.readouterr().out


@pytest.mark.slow
def test_run_on_an_image_folder_tree(image_tree: Path, tmp_path: Path, one_thread):
    out = tmp_path / "tree"
    args = ["--data", "imagenet", "--data-dir", str(image_tree), "--image-size", "32", "--batch-size", "8",
            "--skeleton", "1", "--stats-batches", "1", "--epochs", "1", "--width-mult", "0.125",
            "--workers", "0", "--no-progress", "--no-controls", "--out", str(out)]
    assert main(args) == 0
    spec = NetworkSpec.from_json((out / "topology.json").read_text())
    assert spec.in_channels == 3 and spec.head.num_classes == 2
    assert len(pd.read_csv(out / "comparison.csv")) == 2


@pytest.mark.slow
def test_resume_after_a_kill(tmp_path: Path, one_thread):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "topo.cli", *FAST, "--epochs", "3", "--out", str(out)]
    # killed (by topo.common.writing's testing hook, not by a racing poll) while the second checkpoint is written
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_AT_WRITE: "2:discovered.ckpt"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert read_checkpoint(out / "training" / "discovered.ckpt", resumable=True)["epoch"] == 1
    state = json.loads((out / "state.json").read_text())
    assert "construct" in state and "train:discovered" not in state and "train:reference" not in state
    topology_written = os.stat(out / "topology.json").st_mtime_ns

    assert main(["--resume", str(out), "--workers", "0", "--jobs", "1", "--quiet"]) == 0  # a resume may change these
    state = json.loads((out / "state.json").read_text())
    assert {"construct", "train:discovered", "train:reference"} <= set(state)
    assert os.stat(out / "topology.json").st_mtime_ns == topology_written  # construction was not redone
    metrics = pd.read_csv(out / "training" / "discovered_metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]
    assert (out / "report.md").is_file()
    assert not list(out.rglob("*.tmp")), "the killed run's temporary file was not cleaned up"


@pytest.mark.slow
def test_analyze_a_trained_googlenet(image_tree: Path, tmp_path: Path, one_thread):
    torch.manual_seed(0)
    net = builders.googlenet("torchvision", num_classes=2, aux_logits=False, width_mult=0.125, input_size=96)
    # BatchNorm statistics of the data, as a trained network has (fresh ones make every deep unit constant)
    bundle = load("folder", image_tree, image_size=96)
    calibrate_batchnorm(net, make_loader(bundle.train, batch_size=8, train=True, workers=0, device="cpu"), 4, "cpu")
    weights = tmp_path / "googlenet.pth"
    torch.save(net.state_dict(), weights)
    out = tmp_path / "analysis"
    assert main(["analyze", "--weights", str(weights), "--width-mult", "0.125", "--num-classes", "2",
                 "--data", "folder", "--data-dir", str(image_tree), "--image-size", "96", "--batch-size", "8",
                 "--stats-batches", "2", "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    records = json.loads((out / "analysis.json").read_text())
    assert [r["name"] for r in records] == [m.name for m in net.spec.inception_modules()]
    for rec in records:
        assert rec["reference"]["name"] == rec["name"]
        assert rec["macs"] <= rec["budget_macs"] or rec.get("fallback")
    assert (out / "analysis.md").is_file() and (out / "branch_widths.png").is_file()


def _train_on_broken_tree(tree: Path, tmp_path: Path, *flags: str) -> int:
    """`topo-build train` of a one-convolution network on ``tree`` (16 px), one epoch."""
    spec = NetworkSpec(stem=(ConvSpec("conv1", 8, 3),), head=HeadSpec(num_classes=2), input_size=16)
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(spec.to_json())
    return main(["train", str(spec_file), "--data", "folder", "--data-dir", str(tree), "--image-size", "16",
                 "--epochs", "1", "--workers", "0", "--no-progress", "--out", str(tmp_path / "out"), *flags])


@pytest.mark.parametrize("flags, at_load, in_training", [
    (["--batch-size", "16"], 1, 1),
    (["--batch-size", "17", "--no-verify"], 0, 2),
])
def test_no_verify_leaves_unreadable_images_to_be_found_when_read(
    flags, at_load, in_training, broken_image_tree: Path, tmp_path: Path, caplog
):
    """The tree holds a garbled file (its header gives it away) and a truncated JPEG (found only by decoding);
    one batch holds every training image, so each is read once."""
    with caplog.at_level(logging.WARNING):
        assert _train_on_broken_tree(broken_image_tree, tmp_path, *flags) == 0
    assert caplog.text.count(f"skipped 1 of 17 images in {broken_image_tree / 'train'}") == at_load
    assert f"tiny epoch 1: skipped unreadable images, {in_training} in training and 0 in validation" in caplog.text
    garbled = broken_image_tree / "train" / "china" / "garbled.jpg"
    assert (f"skipped unreadable image {garbled}" in caplog.text) == (at_load == 0)


def test_no_verify_with_strict_fails_when_an_unreadable_image_is_read(broken_image_tree: Path, tmp_path: Path, capsys):
    assert _train_on_broken_tree(broken_image_tree, tmp_path, "--batch-size", "17", "--strict", "--no-verify") == 2
    line = one_line_error(capsys)
    assert "cannot be read" in line and "remove or replace it" in line
    assert "unreadable images in" not in line  # not the message of the check at load time


@pytest.mark.parametrize("argv, expected", [
    (["--data", "imagenet", "--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["--data", "folder", "--data-dir", __file__], "is a file, not a folder"),
    (["--resume", "/no/such/run"], "run directory"),
    (["train", "/no/such/spec.json"], "spec file"),
    (["--reference", "resnet"], "reference"),
    (["--skeleton", "2,poll,2"], "skeleton"),
    (["--workers", "two"], "--workers"),
    (["--jobs", "two"], "--jobs"),
    (["analyze", "--variant", "small", "--weights", "/no/such/weights.pth"], "weights file"),
])
def test_user_errors_are_one_line(argv, expected, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "out")] if argv[0] not in ("--resume",) else argv) == 2
    line = one_line_error(capsys)
    assert line.startswith("topo-build: error:") and expected in line


def test_invalid_spec_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stem": [{"type": "conv", "name": "c", "out_channels": -3, "kernel_size": 3}]}))
    assert main(["train", str(bad), "--out", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys)
    assert "out_channels" in line and "-3" in line


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--epochs", "-1"])
    assert exit_info.value.code == 2
    assert "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--method", "kmeans"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_run_under_torchrun(tmp_path: Path):
    out = tmp_path / "ddp"
    returncode, stdout, stderr = finish(torchrun(
        "-m", "topo.cli", "--skeleton", "1", "--stats-batches", "2", "--epochs", "1", "--batch-size", "64",
        "--workers", "0", "--no-progress", "--data", "digits", "--no-controls", "--out", out,
    ), timeout=300)
    assert returncode == 0, stderr[-2000:]
    assert stdout.count("training discovered") == 1  # only rank 0 speaks
    spec = NetworkSpec.from_json((out / "topology.json").read_text())
    assert [m.name for m in spec.inception_modules()] == ["inception3a"]
    assert len(pd.read_csv(out / "comparison.csv")) == 2


@pytest.mark.slow
def test_threshold_decoding_under_torchrun_grows_one_network(tmp_path: Path):
    """The threshold decoder runs under torchrun (each process samples its own shard; all take rank 0's
    weights, `topo.construct.loop.decode_thresholds`): the construction completes with its units decoded."""
    out = tmp_path / "ddp"
    returncode, _, stderr = finish(torchrun(
        "-m", "topo.cli", "construct", "--data", "planted", "--stem", "none", "--init", "hebbian", "--budget", "none",
        "--skeleton", "2", "--decoder", "threshold", "--fire-quantile", "none", "--null", "none", "--no-pool-branch",
        "--stats-batches", "2", "--workers", "0", "--no-progress", "--no-controls", "--out", out,
    ), timeout=300)
    assert returncode == 0, stderr[-2000:]
    records = json.loads((out / "construction" / "records.json").read_text())
    assert records[0]["decoded_units"] > 0 and 0 < records[0]["decoded_rate"] < 0.5


class _BrokenImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        from topo.common.errors import DataError

        raise DataError(f"image {index}.jpg is truncated; delete it or run without --strict")


def test_an_error_from_a_loader_worker_is_still_one_line():
    from topo.cli.main import one_line

    loader = torch.utils.data.DataLoader(_BrokenImages(), num_workers=1)
    with pytest.raises(Exception) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what PyTorch re-raises
    assert one_line(caught.value) == "image 0.jpg is truncated; delete it or run without --strict"


def _tiny_digits_spec(tmp_path: Path) -> Path:
    spec = NetworkSpec(stem=(ConvSpec("conv1", 8, 3),), head=HeadSpec(num_classes=10), in_channels=1, input_size=8)
    path = tmp_path / "tiny.json"
    path.write_text(spec.to_json())
    return path


@pytest.mark.slow
def test_per_epoch_lines_reach_the_command_line_and_quiet_hides_them(tmp_path: Path, capsys):
    spec = _tiny_digits_spec(tmp_path)
    common = ["train", str(spec), "--epochs", "2", "--workers", "0", "--no-progress", "--data", "digits"]
    assert main([*common, "--out", str(tmp_path / "loud")]) == 0
    out = capsys.readouterr().out
    assert "tiny epoch 1/2: train loss" in out and "tiny epoch 2/2: train loss" in out
    assert "Train time: seconds spent in the training passes" in out  # the table says what it measures
    assert main([*common, "--quiet", "--out", str(tmp_path / "quiet")]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" not in out and "| tiny" in out  # the result table is still printed


@pytest.mark.slow
def test_train_command_writes_a_run_directory(tmp_path: Path):
    spec = _tiny_digits_spec(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(spec), "--epochs", "1", "--workers", "0", "--no-progress", "--data", "digits", "--out", str(out)]) == 0
    metrics = pd.read_csv(out / "training" / "tiny_metrics.csv")
    table = pd.read_csv(out / "comparison.csv")
    # "Train time" is the training passes only, and the throughput is measured over the same passes
    assert table["Train time (s)"].iloc[0] == pytest.approx(metrics["train_time_s"].sum(), rel=1e-6)
    assert table["Throughput (img/s)"].iloc[0] == pytest.approx(
        metrics["train_images"].sum() / metrics["train_time_s"].sum(), rel=1e-6)


# ----------------------------------------------------------------------------- a run that stops part-way
def test_a_diverging_training_stops_with_the_epoch_and_the_fix(tmp_path: Path, capsys, one_thread):
    """`--lr 1000` on digits: the loss becomes NaN in the first epoch; nothing diverged is saved or tabulated."""
    spec, out = _tiny_digits_spec(tmp_path), tmp_path / "run"
    argv = ["train", str(spec), "--lr", "1000", "--epochs", "3", "--workers", "0", "--no-progress", "--data", "digits", "--out", str(out)]
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert "tiny diverged in epoch 1 of 3: the training loss is inf; no checkpoint was written" in line
    assert "Lower the learning rate (now 1000)" in line and "--grad-clip" in line
    assert not (out / "training" / "tiny.ckpt").exists() and not (out / "comparison.csv").exists()


def _fail_write(monkeypatch, after: int, error: int, where: str) -> list[int]:
    """Make the ``after+1``-th atomic write fail with ``error`` (at ``fsync`` or creating the temporary file)."""
    import tempfile

    import topo.common.writing as writing

    calls = []
    real = {"fsync": os.fsync, "mkstemp": tempfile.mkstemp}[where]

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    monkeypatch.setattr(writing.os if where == "fsync" else writing.tempfile, where, failing)
    return calls


@pytest.mark.parametrize("error, where", [(errno.ENOSPC, "fsync"), (errno.EROFS, "mkstemp")])
def test_a_full_disk_or_read_only_folder_during_a_run_is_one_line_and_keeps_the_earlier_files(
        error, where, tmp_path: Path, capsys, monkeypatch, one_thread):
    spec, out = _tiny_digits_spec(tmp_path), tmp_path / "run"
    # config.json, the spec, epoch 1 (checkpoint, metrics), epoch 2 (checkpoint, metrics): the 6th write fails
    calls = _fail_write(monkeypatch, 5, error, where)
    argv = ["train", str(spec), "--epochs", "3", "--workers", "0", "--no-progress", "--data", "digits", "--out", str(out)]
    assert main(argv) == 1
    line = one_line_error(capsys)
    assert line.startswith("topo-build: error: cannot write") and os.strerror(error) in line
    assert "tiny_metrics.csv" in line and "every file written before is intact" in line
    assert len(calls) == 6
    checkpoint = read_checkpoint(out / "training" / "tiny.ckpt", resumable=True)
    assert checkpoint["epoch"] == 2  # epoch 2's checkpoint was written; its metrics file was not
    assert list(pd.read_csv(out / "training" / "tiny_metrics.csv")["epoch"]) == [1]
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    assert main(argv) == 0  # space again: the same command goes on from the checkpoint
    assert list(pd.read_csv(out / "training" / "tiny_metrics.csv")["epoch"]) == [1, 2, 3]
