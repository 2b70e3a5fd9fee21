"""Results people can use, from the command line: `topo-build export`, `topo-build eval`, `--config FILE`
(a run's config.json given back), `--sync-bn` and `--deterministic`."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from checks import close, one_line_error
from torch import nn
from torch.utils.data import Dataset

import builders
from analysis.tables import COMPARISON_CAPTION
from topo.common import distributed as dist_info
from topo.cli.resume import study_config
from topo.cli.main import main
from topo.cli.settings import parse, run_config
from topo.construct.config import ConstructConfig
from topo.data import make_loader
from topo.common.errors import UserError
from topo.run.export import SUFFIXES, load_safetensors
from topo.train.files import read_checkpoint
from topo.common.writing import atomic_write_json, atomic_write_text
from topo.run.config import RunConfig
from topo.run.rundir import RunDir
from topo.run.study import StudyConfig
from topo.train.config import TrainConfig, check_sync_bn
from topo.train.trainer import _sync_batchnorm, deterministic_algorithms, evaluate

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

# the export tests' fixtures are in conftest.py: digits, a run of GoogLeNet's small variant trained two epochs on
# them (trained), 50 of their validation images (images) and the trained network's logits on those (want); their
# comparison of logits is checks.close

QUICK = ["--data", "digits", "--epochs", "1", "--batch-size", "64", "--workers", "0", "--no-progress"]


def _as_json(config: RunConfig | StudyConfig) -> dict:
    """A configuration as config.json holds it (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict()))


def _saved_run(root: Path, config: RunConfig, command: str = "run") -> Path:
    run = RunDir(root)
    run.write_config(config.to_dict(), command=command)
    return run.config_path


#: A configuration away from the defaults in every section.
SETTINGS = RunConfig(
    data="digits", seed=3, reference="googlenet-small", width_mult=0.5, aux_heads="reference",
    construct=ConstructConfig(method="spectral", window=3, n_clusters=4, positions=None, fire_quantile=None,
                              budget_macs=2_000_000, pool_branch=False, seed=3),
    train=TrainConfig(epochs=2, lr=0.1, ema_decay=0.99, grad_clip=1.0, schedule="paper", deterministic=True,
                      sync_bn=True, workers=0, progress=False, seed=3),
)


# --------------------------------------------------------------------------- export
@pytest.mark.slow
@pytest.mark.parametrize("format", ["safetensors", "onnx", "torchscript", "pt2"])
def test_export_command_writes_every_format(format, trained, images, want, tmp_path, capsys, one_thread):
    if format == "onnx":
        pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
    if format == "safetensors":
        pytest.importorskip("safetensors")
    _, run = trained
    out = tmp_path / f"net{SUFFIXES[format]}"
    assert main(["export", str(run), "--format", format, "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)  # the written path, and nothing else
    if format == "onnx":
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": images.numpy()})[0]
    else:
        loaded = {"safetensors": lambda p: load_safetensors(p)[0], "torchscript": lambda p: torch.jit.load(str(p)),
                  "pt2": lambda p: torch.export.load(str(p)).module()}[format](out)
        with torch.no_grad():
            got = loaded(images)
    close(got, want)


@pytest.mark.slow
def test_export_command_default_path_and_format_from_suffix(trained, images, want, tmp_path, capsys, one_thread):
    _, run = trained
    assert main(["export", str(run), "--format", "torchscript", "--quiet"]) == 0
    default = run / "export" / "discovered.pt"
    assert capsys.readouterr().out.strip() == str(default)
    with torch.no_grad():
        close(torch.jit.load(str(default))(images), want)
    assert main(["export", str(run), "--out", str(tmp_path / "net.pt2"), "--quiet"]) == 0  # format: the suffix's
    with torch.no_grad():
        close(torch.export.load(str(tmp_path / "net.pt2")).module()(images), want)


def test_export_command_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "--format", "onnx"]) == 2
    assert "is not a topo-build run directory" in one_line_error(capsys)
    _saved_run(tmp_path / "empty", RunConfig())
    assert main(["export", str(tmp_path / "empty"), "--format", "pt2"]) == 2
    line = one_line_error(capsys)
    assert "no trained network 'discovered'" in line and "none yet" in line
    assert main(["export", str(tmp_path / "empty")]) == 2
    assert "give --format" in one_line_error(capsys)
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "net.bin")]) == 2
    assert "cannot tell the export format" in one_line_error(capsys)


@pytest.mark.slow
def test_export_without_the_extra_names_it(trained, tmp_path, capsys, monkeypatch, one_thread):
    _, run = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "net.onnx")]) == 2
    assert 'pip install "topo-build[export]"' in one_line_error(capsys)
    assert not (tmp_path / "net.onnx").exists()


# --------------------------------------------------------------------------- eval
def _reference_metrics(model: nn.Module, digits) -> dict[str, float]:
    """topo.train's evaluation of ``model`` on the digits' validation split."""
    return evaluate(model, digits.val, device="cpu", config=TrainConfig(workers=0))


@pytest.mark.slow
def test_eval_of_a_run_is_the_training_evaluation(trained, digits, tmp_path, capsys, one_thread):
    model, run = trained
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--workers", "0", "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    expected = _reference_metrics(model, digits)
    assert 0.2 < expected["top1"] < 1.0  # a trained network, not chance (0.1): equal counts mean something
    assert (result["top1"], result["top5"], result["count"]) == (expected["top1"], expected["top5"], 360)
    # each batch's loss is a float32 sum: batches of 64 here, of 256 in evaluate's default loader
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    # the last epoch's evaluation during training: eval took over the run's data settings (digits)
    history = pd.read_csv(run / "training" / "discovered_metrics.csv")
    assert result["top1"] == pytest.approx(history["val_top1"].iloc[-1], abs=1e-12)
    assert result["data"] == "digits" and result["images_per_s"] > 0 and result["eval_time_s"] > 0
    table = capsys.readouterr().out
    assert f"{100 * expected['top1']:.1f}" in table and f"{100 * expected['top5']:.1f}" in table


@pytest.mark.slow
def test_eval_of_a_spec_with_weights_and_of_an_exported_file(trained, digits, tmp_path, one_thread):
    pytest.importorskip("safetensors")
    model, run = trained
    expected = _reference_metrics(model, digits)
    spec_run = ["eval", str(run / "topology.json"), "--weights", str(run / "training" / "discovered.ckpt")]
    exported = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(exported), "--quiet"]) == 0
    for source in (spec_run, ["eval", str(exported)]):
        out = tmp_path / "eval.json"
        assert main([*source, "--data", "digits", "--workers", "0", "--out", str(out), "--quiet"]) == 0
        result = json.loads(out.read_text())
        assert (result["top1"], result["top5"]) == (expected["top1"], expected["top5"]), source


def test_eval_errors_are_one_line(tmp_path, capsys):
    spec = builders.googlenet_spec("small", num_classes=10, width_mult=0.125, in_channels=1, input_size=8)
    atomic_write_text(tmp_path / "net.json", spec.to_json() + "\n")
    assert main(["eval", str(tmp_path / "net.json"), "--data", "digits"]) == 2
    assert "--weights" in one_line_error(capsys)
    torch.save(builders.build(spec).state_dict(), tmp_path / "net.pt")
    wrong = ["eval", str(tmp_path / "net.json"), "--weights", str(tmp_path / "net.pt"), "--data", "fake",
             "--workers", "0"]
    assert main(wrong) == 2
    assert "use a spec built for this data" in one_line_error(capsys)
    assert main(["eval", str(tmp_path / "net.json"), "--weights", str(tmp_path / "net.pt"), "--out",
                 str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys)


def test_eval_of_a_run_takes_the_runs_data_settings(tmp_path):
    _saved_run(tmp_path / "run", SETTINGS)
    args = parse("eval", [str(tmp_path / "run")])
    assert (args.data, args.seed) == ("digits", 3)  # the parser's own defaults are another data set and seed 0
    assert parse("eval", [str(tmp_path / "run"), "--seed", "1"]).seed == 1


# --------------------------------------------------------------------------- --config
@pytest.mark.parametrize("command,argv", [("run", []), ("construct", []), ("train", ["net.json"])])
def test_a_runs_config_json_given_back_is_the_same_configuration(command, argv, tmp_path):
    path = _saved_run(tmp_path / "run", SETTINGS, command)
    args = parse(command, [*argv, "--config", str(path)])
    assert _as_json(run_config(args)) == json.loads(path.read_text())["config"]


def test_flags_override_the_config_file(tmp_path):
    path = _saved_run(tmp_path / "run", SETTINGS)
    config = run_config(parse("run", ["--config", str(path), "--epochs", "5", "--seed", "4", "--method", "arora",
                                      "--no-deterministic", "--positions", "auto"]))
    assert (config.train.epochs, config.seed, config.train.seed, config.construct.seed) == (5, 4, 4, 4)
    assert (config.construct.method, config.construct.positions, config.train.deterministic) == ("arora", "auto",
                                                                                                 False)
    assert (config.train.lr, config.construct.window, config.width_mult) == (0.1, 3, 0.5)  # the rest: the file's


def test_the_decoder_pool_branch_and_direct_only_flags_reach_the_construction():
    flags = ["--init", "hebbian", "--budget", "none", "--decoder", "threshold", "--no-pool-branch", "--no-direct-only"]
    config = run_config(parse("construct", flags)).construct
    assert (config.decoder, config.pool_branch, config.direct_only) == ("threshold", False, False)
    assert not config.clustering(5).direct_only
    default = run_config(parse("construct", [])).construct
    assert (default.decoder, default.pool_branch, default.direct_only) == ("mean", True, True)
    assert default.clustering(5).direct_only


def test_a_study_json_given_back_is_the_same_study(tmp_path):
    study = StudyConfig(run=SETTINGS, arms=("discovered", "reference", "uniform"), seeds=2, margin=1.0)
    path = tmp_path / "study.json"
    atomic_write_json(path, {"config": study.to_dict(), "environment": {}})  # as topo.run.study.open_study writes it
    args = parse("study", ["--config", str(path)])
    assert _as_json(study_config(args, tmp_path)) == _as_json(study)


def test_a_hand_written_config_file(tmp_path):
    path = tmp_path / "settings.json"
    # sections like config.json's, and options by their dest or their flag
    atomic_write_json(path, {"data": "digits", "epochs": 2, "train": {"lr": 0.2}, "construct": {"method": "louvain"},
                             "clusters": 6, "budget": "none", "batch-size": 32, "positions": "all"})
    config = run_config(parse("run", ["--config", str(path)]))
    assert (config.data, config.train.epochs, config.train.lr, config.train.batch_size) == ("digits", 2, 0.2, 32)
    assert (config.construct.method, config.construct.budget_macs, config.construct.n_clusters) == ("louvain",
                                                                                                    "none", 6)
    assert config.construct.positions is None  # "all", converted as on the command line


@pytest.mark.parametrize("settings,named", [
    ({"train": {"epochz": 3}}, "'train.epochz'"),
    ({"lerning_rate": 0.1}, "'lerning_rate'"),
    ({"construct": {"methd": "arora"}}, "'construct.methd'"),
    ({"train": {"data": "digits"}}, "'train.data'"),  # a key in the wrong section
    ({"train": {"epochs": -1}}, "train.epochs -1"),
    ({"construct": {"method": "kmeans"}}, "construct.method 'kmeans'"),
    ({"train": {"amp": "yes"}}, "train.amp 'yes'"),
    ({"seed": 1, "train": {"seed": 2}}, "seed 1 and train.seed 2"),
    ({"train": 3}, "train is 3"),
])
def test_a_bad_config_file_is_one_line_naming_the_key(settings, named, tmp_path, capsys):
    path = tmp_path / "settings.json"
    atomic_write_json(path, settings)
    assert main(["run", "--config", str(path)]) == 2
    line = one_line_error(capsys)
    assert named in line and str(path) in line, line


def test_settings_the_command_does_not_use_are_logged(tmp_path, capsys):
    path = tmp_path / "settings.json"
    atomic_write_json(path, {"seeds": 5, "margin": 0.5})  # a study's; 0.5 is margin's default: not worth a line
    assert main(["train", str(tmp_path / "missing.json"), "--config", str(path)]) == 2
    logged = capsys.readouterr().out
    assert "topo-build train does not use these settings" in logged and "seeds=5" in logged
    assert "margin" not in logged


def test_yaml_without_pyyaml_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    atomic_write_text(tmp_path / "settings.yaml", "train:\n  epochs: 2\n")
    assert main(["run", "--config", str(tmp_path / "settings.yaml")]) == 2
    line = one_line_error(capsys)
    assert "PyYAML is not installed" in line and "JSON" in line


def test_yaml_config_is_read_like_json(tmp_path):
    yaml = pytest.importorskip("yaml")
    data = json.loads(_saved_run(tmp_path / "run", SETTINGS).read_text())["config"]
    atomic_write_text(tmp_path / "settings.yaml", yaml.safe_dump(data))
    assert _as_json(run_config(parse("run", ["--config", str(tmp_path / "settings.yaml")]))) == data


# --------------------------------------------------------------------------- --sync-bn, --deterministic
def _weights(run: Path, name: str = "net") -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "training" / f"{name}.ckpt")["model"]


@pytest.mark.slow
def test_train_with_sync_bn_and_deterministic_and_again_from_its_config(tmp_path, capsys, one_thread):
    spec = builders.googlenet_spec("small", num_classes=10, width_mult=0.125, in_channels=1, input_size=8)
    atomic_write_text(tmp_path / "net.json", spec.to_json() + "\n")
    first, again, plain = tmp_path / "first", tmp_path / "again", tmp_path / "plain"
    assert main(["train", str(tmp_path / "net.json"), *QUICK, "--sync-bn", "--deterministic", "--out", str(first)]) == 0
    assert "--sync-bn: one process, nothing to synchronise" in capsys.readouterr().out  # the logged no-op
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is restored after the command
    saved = json.loads((first / "config.json").read_text())["config"]
    assert saved["train"]["sync_bn"] and saved["train"]["deterministic"]

    assert main(["train", str(tmp_path / "net.json"), "--config", str(first / "config.json"), "--out", str(again),
                 "--quiet"]) == 0
    assert json.loads((again / "config.json").read_text())["config"] == saved  # reproduced exactly ...
    assert main(["train", str(tmp_path / "net.json"), *QUICK, "--out", str(plain), "--quiet"]) == 0
    for other in (again, plain):  # ... and so are the weights; on one CPU process the two flags change nothing
        mine, theirs = _weights(first), _weights(other)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), other


def test_deterministic_algorithms_restore_and_name_the_operation(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    expected = r"--deterministic: put_ has no deterministic implementation"
    with pytest.raises(UserError, match=expected) as caught, deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        torch.zeros(4).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))  # no deterministic kernel
    assert "\n" not in str(caught.value)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_sync_bn_under_torchrun(monkeypatch):
    """Under several processes: SyncBatchNorm layers holding the very parameters the optimiser has; on the CPU a
    one-line error first (nn.SyncBatchNorm trains on CUDA only)."""
    monkeypatch.setattr(dist_info, "is_distributed", lambda: True)
    monkeypatch.setattr(dist_info, "world_size", lambda: 2)
    with pytest.raises(UserError, match="--sync-bn .* needs CUDA"):
        check_sync_bn(TrainConfig(sync_bn=True, device="cpu"))
    check_sync_bn(TrainConfig(sync_bn=False, device="cpu"))
    spec = builders.googlenet_spec("small", num_classes=10, width_mult=0.125, in_channels=1, input_size=8)
    model = builders.build(spec)
    params, state = list(model.parameters()), model.state_dict()
    converted = _sync_batchnorm(model, TrainConfig(sync_bn=True))
    kinds = {type(m) for m in converted.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    assert all(a is b for a, b in zip(params, converted.parameters(), strict=True))
    assert converted.state_dict().keys() == state.keys()  # checkpoints load into the plain network
    assert _sync_batchnorm(builders.build(spec), TrainConfig(sync_bn=False)) is not None


class _Draws(Dataset):
    """Each item: one draw from Python's, NumPy's and torch's generators in the process that loads it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))], dtype=torch.float64)


def test_loader_workers_are_seeded_from_seed_and_epoch():
    """Worker processes draw the same numbers for the same seed and epoch (torch seeds Python, NumPy and torch in
    each worker from the loader's generator, which `EpochLoader.set_epoch` reseeds), other numbers otherwise."""

    def draws(seed: int, epoch: int) -> torch.Tensor:  # rows 0-1: worker 0's first batch, rows 2-3: worker 1's
        loader = make_loader(_Draws(), batch_size=2, train=False, seed=seed, workers=2, device="cpu")
        loader.set_epoch(epoch)
        return torch.cat(list(loader))

    first, same, next_epoch, other_seed = draws(0, 0), draws(0, 0), draws(0, 1), draws(1, 0)
    for column, generator in enumerate(("random", "numpy", "torch")):  # unseeded, a forked worker would repeat
        assert torch.equal(first[:, column], same[:, column]), generator  # the parent's state in every case
        assert not torch.equal(first[:, column], next_epoch[:, column]), generator
        assert not torch.equal(first[:, column], other_seed[:, column]), generator
        assert first[0, column] != first[2, column], generator  # each worker its own stream


def test_comparison_caption_states_the_multiply_add_convention():
    assert "multiply-adds per image (fvcore's 'flops'; FlopCounterMode counts 2 per multiply-add)" in COMPARISON_CAPTION


def test_a_network_that_does_not_fit_the_data_says_what_differs(tmp_path):
    """eval of a run on other data called the run folder a "spec" and said "imagenet has 3 and 3"."""
    from types import SimpleNamespace

    from topo.cli.commands import _check_fits

    spec = builders.googlenet_spec("small", num_classes=10, width_mult=0.125, in_channels=3, input_size=32)
    data = SimpleNamespace(in_channels=3, num_classes=3)
    with pytest.raises(UserError) as caught:
        _check_fits(spec, data, str(tmp_path), "imagenet data in /data")
    message = str(caught.value)
    assert message.startswith(f"the network of run {tmp_path} does not fit imagenet data in /data")
    assert "has 10 classes where the data have 3" in message and "channels" not in message.split(";")[0]
    _check_fits(spec, SimpleNamespace(in_channels=3, num_classes=10), str(tmp_path), "x")  # fits: no error
