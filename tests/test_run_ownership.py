"""A run owns its folder, keeps where its data is, and refuses what it cannot do before anything is written
(issue 35): the folder lock, an absolute ``--data-dir``, an export format against its suffix, an unavailable
``--device``, and the messages of ``--config`` files, Ctrl-C and Python warnings.

The commands run in the test process on tiny inputs; where a test only needs the checks before the work, the
work itself is replaced by a failure (``no_work``), so that a command that goes on where it should stop fails
at once instead of running.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from checks import one_line_error

from builders.spec import ConvSpec, HeadSpec, NetworkSpec
from topo.cli import commands
from topo.cli.main import main
from topo.cli.settings import parse
from topo.common.devices import check_device
from topo.common.processes import Job, run_jobs
from topo.common.errors import UserError
from topo.common.writing import atomic_write_text
from topo.construct.config import ConstructConfig
from topo.run import stages
from topo.run.config import RunConfig
from topo.run.export import format_for
from topo.run.rundir import RunDir
from topo.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

LOCK = ".topo-build.lock"  # topo.run.rundir.LOCK_FILE, spelled out: the tests hold it as any process would
FAST = ["--skeleton", "1,pool,1", "--stats-batches", "2", "--epochs", "1", "--workers", "0", "--no-progress"]


# --------------------------------------------------------------------------- helpers
def tiny_spec(folder: Path, num_classes: int = 10) -> Path:
    spec = NetworkSpec(stem=(ConvSpec("conv1", 8, 3),), head=HeadSpec(num_classes=num_classes), in_channels=1,
                       input_size=8)
    path = folder / "tiny.json"
    atomic_write_text(path, spec.to_json() + "\n")
    return path


def tensors_file(folder: Path) -> Path:
    """A two-class ``--data tensors`` file of 96 random 8x8 maps."""
    folder.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).normal(size=(96, 1, 8, 8)).astype(np.float32)
    np.savez(folder / "d.npz", x=x, y=np.arange(96) % 2)
    return folder / "d.npz"


def saved_run(folder: Path) -> Path:
    run = RunDir(folder)
    run.write_config(RunConfig(data="digits", controls=False, construct=ConstructConfig(skeleton="1,pool,1"),
                               train=TrainConfig(epochs=1, workers=0, progress=False)).to_dict())
    return folder


def hold(folder: Path) -> int:
    """The lock of ``folder`` taken as a topo-build process takes it (exclusive, its pid written): the fd."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def locked(folder: Path) -> bool:
    """Whether some process holds the lock of ``folder`` now."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def raising(error: BaseException) -> Callable[..., None]:
    def raise_it(*args: object, **kwargs: object) -> None:
        raise error
    return raise_it


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command's work replaced by a failure: a command that gets past its checks fails at once."""
    started = raising(AssertionError("the command started its work"))
    for name in ("run_all", "constructions_stage", "train", "run_study", "analyze", "timed_evaluate", "report_stage"):
        monkeypatch.setattr(commands, name, started)


# --------------------------------------------------------------------------- 1. one run, one folder
def _argv(command: str, folder: Path, inputs: Path) -> list[str]:
    out = ["--out", str(folder)]
    return {
        "run": ["--data", "digits", *FAST, "--no-controls", *out],
        "resume": ["--resume", str(folder)],
        "report": ["report", str(folder)],
        "construct": ["construct", "--data", "digits", *FAST[:4], "--no-controls", *out],
        "train": ["train", str(tiny_spec(inputs)), "--data", "digits", *FAST[4:], *out],
        "study": ["study", "--data", "digits", *FAST, *out],
        "analyze": ["analyze", "--data", "digits", "--variant", "small", "--no-progress", *out],
    }[command]


@pytest.mark.parametrize("command", ["run", "resume", "report", "construct", "train", "study", "analyze"])
def test_a_folder_in_use_is_refused_at_once(command: str, tmp_path: Path, no_work: None, capsys) -> None:
    """Also ``report``, which writes into a run's folder; ``export`` and ``eval`` only read a run's files (each
    written whole) and write their own whole, so they take no lock."""
    folder, inputs = tmp_path / "out", tmp_path / "inputs"
    inputs.mkdir()
    if command in ("resume", "report"):
        saved_run(folder)
    argv = _argv(command, folder, inputs)
    fd = hold(folder)
    before = tree(tmp_path)
    try:
        assert main(argv) == 2
    finally:
        os.close(fd)
    line = one_line_error(capsys)
    assert str(folder) in line and f"another topo-build process (pid {os.getpid()}) is using it" in line, line
    assert tree(tmp_path) == before, "a file was written in a folder in use"


def test_the_folder_is_owned_before_config_json_and_released_after_an_error(tmp_path: Path, monkeypatch) -> None:
    out, seen = tmp_path / "run", []
    write_config = RunDir.write_config

    def checked(self: RunDir, config: dict, *, command: str = "run") -> None:
        seen.append(locked(self.root))
        write_config(self, config, command=command)

    monkeypatch.setattr(RunDir, "write_config", checked)
    monkeypatch.setattr(stages, "constructions_stage", raising(RuntimeError("a bug after config.json")))
    with pytest.raises(RuntimeError, match="a bug after config.json"):
        main(["--data", "digits", *FAST, "--no-controls", "--out", str(out)])
    assert seen == [True], "config.json was written by a run that did not own its folder"
    assert (out / "config.json").is_file() and not locked(out) and not (out / LOCK).exists()


def test_a_failed_check_leaves_no_folder_and_no_lock(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["--data", "digits", *FAST, "--batch-size", "5000", "--out", str(out)]) == 2
    assert "--batch-size 1437 or less" in one_line_error(capsys)
    assert not out.exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path, capsys) -> None:
    """Another process owns the folder (`owned_folder`, as every command does): refused, naming its pid; once
    it is killed (the kernel drops its lock, its lock file stays), the next command owns the folder."""
    out = tmp_path / "run"
    owner = ("import sys, time\nfrom topo.run.rundir import owned_folder\nwith owned_folder(sys.argv[1]):\n"
             "    print('owned', flush=True)\n    time.sleep(120)\n")
    argv = ["--data", "digits", *FAST, "--batch-size", "5000", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", owner, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "owned"
        assert main(argv) == 2
        assert f"{out} is in use: another topo-build process (pid {proc.pid})" in one_line_error(capsys)
        proc.kill()
        proc.wait(timeout=60)
        assert (out / LOCK).exists()  # left behind by the killed process
        assert main(argv) == 2
        assert "--batch-size 1437 or less" in one_line_error(capsys)  # past the lock, to the run's own checks
        assert not (out / LOCK).exists() and not locked(out)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()


def test_shards_of_a_study_share_its_folder_and_nothing_else_does(tmp_path: Path) -> None:
    from topo.run.rundir import StudyFiles, owned_folder

    out = tmp_path / "study"
    files = StudyFiles(out)
    with owned_folder(out, shared=True), owned_folder(out, lock=files.shard_lock(0, 2)):
        with owned_folder(out, shared=True), owned_folder(out, lock=files.shard_lock(1, 2)):
            pass  # the other shard goes on beside it
        with pytest.raises(UserError, match="is in use"), owned_folder(out):
            pass  # a whole study does not
        with pytest.raises(UserError, match=r"is in use: another topo-build process \(pid"), \
                owned_folder(out, lock=files.shard_lock(0, 2)):
            pass  # nor the same shard twice
    with owned_folder(out):
        pass
    assert not out.exists()


# --------------------------------------------------------------------------- 2. a relative --data-dir
def test_a_run_made_with_a_relative_data_dir_resumes_from_another_folder(tmp_path: Path, monkeypatch,
                                                                        capsys) -> None:
    data = tensors_file(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    # each attempt stops where the work begins: its checks passed, the data was found and loaded
    monkeypatch.setattr(stages, "constructions_stage", raising(KeyboardInterrupt()))
    monkeypatch.chdir(tmp_path)
    argv = ["--data", "tensors", "--data-dir", "data/d.npz", *FAST, "--batch-size", "16", "--no-controls"]
    assert main([*argv, "--out", "run"]) == 130
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["data_dir"] == str(data)
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["--resume", "../run"]) == 130, capsys.readouterr().err
    for same_place in ("../data/d.npz", "../link/d.npz", str(data)):
        assert main(["--resume", "../run", "--data-dir", same_place]) == 130, capsys.readouterr().err
    capsys.readouterr()
    assert main(["--resume", "../run", "--data-dir", "d.npz"]) == 2  # another place: another experiment
    assert f"--data-dir {data}, not {tmp_path / 'elsewhere' / 'd.npz'}" in one_line_error(capsys)


def test_a_run_saved_with_a_relative_data_dir_by_an_older_version_is_found(tmp_path: Path, monkeypatch,
                                                                          caplog) -> None:
    """Older runs saved ``data_dir`` as typed; it is looked for from here, then from the folders above the run."""
    data = tensors_file(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stages, "constructions_stage", raising(KeyboardInterrupt()))
    argv = ["--data", "tensors", "--data-dir", "data/d.npz", *FAST, "--batch-size", "16", "--no-controls"]
    assert main([*argv, "--out", "runs/old"]) == 130
    document = json.loads((tmp_path / "runs" / "old" / "config.json").read_text())
    document["config"]["data_dir"] = "data/d.npz"  # as an older version wrote it
    atomic_write_text(tmp_path / "runs" / "old" / "config.json", json.dumps(document))
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert RunConfig.of_run(RunDir("../runs/old")).data_dir == str(data)  # two folders above the run
    assert main(["--resume", "../runs/old"]) == 130
    assert main(["--resume", "../runs/old", "--data-dir", str(data)]) == 130
    document["config"]["data_dir"] = "nowhere/d.npz"
    atomic_write_text(tmp_path / "runs" / "old" / "config.json", json.dumps(document))
    with caplog.at_level("WARNING"):
        assert RunConfig.of_run(RunDir("../runs/old")).data_dir == str(tmp_path / "elsewhere" / "nowhere" / "d.npz")
    assert "relative --data-dir nowhere/d.npz, found neither from here nor from a folder above" in caplog.text


def test_eval_of_a_run_made_with_a_relative_data_dir_from_another_folder(tmp_path: Path, monkeypatch,
                                                                        capsys) -> None:
    tensors_file(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    spec = tiny_spec(tmp_path, num_classes=2)
    monkeypatch.chdir(tmp_path)
    assert main(["train", spec.name, "--data", "tensors", "--data-dir", "data/d.npz", "--epochs", "1",
                 "--batch-size", "16", "--workers", "0", "--no-progress", "--out", "run"]) == 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    for extra in ([], ["--data-dir", "../data/d.npz"]):
        assert main(["eval", "../run", "--network", "tiny", "--workers", "0", *extra]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- 3. an export format against its suffix
def test_an_export_format_that_contradicts_the_suffix_is_one_line(tmp_path: Path, capsys) -> None:
    run, out = saved_run(tmp_path / "run"), tmp_path / "net.safetensors"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert "torchscript" in line and str(out) in line and "safetensors" in line, line
    assert not out.exists()
    with pytest.raises(UserError, match="net.pt2"):
        format_for("net.onnx", "pt2")
    assert format_for("net.PT", "torchscript") == "torchscript" and format_for("net.bin", "onnx") == "onnx"
    assert format_for("net.onnx") == "onnx"


# --------------------------------------------------------------------------- 4. an unavailable --device
def _unavailable(device: str) -> bool:
    if device == "mps":
        return not torch.backends.mps.is_available()
    return torch.cuda.device_count() <= 7


@pytest.mark.parametrize("device", ["mps", "cuda:7"])
@pytest.mark.parametrize("command", ["run", "construct", "train"])
def test_an_unavailable_device_is_refused_before_anything_is_written(command: str, device: str, tmp_path: Path,
                                                                      capsys) -> None:
    if not _unavailable(device):
        pytest.skip(f"this machine has {device}")
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    argv = [*_argv(command, out, inputs), "--device", device]
    for _ in range(2):  # nothing is left that would refuse the same command again for another reason
        assert main(argv) == 2
        line = one_line_error(capsys)
        assert f"device {device!r} (--device)" in line and "available: cpu" in line, line
        assert not (out / "config.json").exists() and not out.exists()


@pytest.mark.parametrize("device", ["mps", "mps:1", "cuda:7", "xpu", "meta", "hpu"])
def test_check_device_names_what_is_available(device: str) -> None:
    if device == "mps" and not _unavailable("mps"):
        pytest.skip("this machine has MPS")
    if device == "cuda:7" and not _unavailable("cuda:7"):
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(UserError, match=rf"device {device!r} \(--device\).*available: cpu"):
        check_device(device)
    assert check_device("cpu") == torch.device("cpu") and check_device("auto").type in ("cpu", "cuda")


# --------------------------------------------------------------------------- 5. messages
def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"seed": 3, "train": {"epochs": 2}}).encode())
    args = parse("construct", ["--config", str(path)])
    assert args.seed == 3 and args.epochs == 2


@pytest.mark.parametrize("name, text, key", [
    ("settings.json", '{"seed": 1, "seed": 2}', "seed"),
    ("settings.json", '{"train": {"epochs": 1, "lr": 0.1, "epochs": 1}}', "epochs"),
    ("settings.yaml", "seed: 1\nseed: 2\n", "seed"),
    ("settings.yml", "train:\n  epochs: 1\n  lr: 0.1\n  epochs: 1\n", "epochs"),
])
def test_a_key_given_twice_in_a_config_file_is_one_line(name: str, text: str, key: str, tmp_path: Path,
                                                        no_work: None, capsys) -> None:
    if name.endswith((".yaml", ".yml")):
        pytest.importorskip("yaml")
    path, out = tmp_path / name, tmp_path / "out"
    path.write_text(text)
    assert main(["construct", "--config", str(path), "--data", "digits", "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert f"configuration file {path}" in line and f"{key!r} is given twice" in line, line
    assert not out.exists()


@pytest.mark.parametrize("command, patched, continued", [
    ("run", (stages, "constructions_stage"), "--resume {out}"),
    ("construct", (commands, "constructions_stage"), "--out {out}"),
    ("train", (commands, "train"), "--out {out}"),
])
def test_ctrl_c_names_the_folder_to_continue(command: str, patched: tuple, continued: str, tmp_path: Path,
                                            monkeypatch, capsys) -> None:
    monkeypatch.setattr(*patched, raising(KeyboardInterrupt()))
    monkeypatch.chdir(tmp_path)
    argv = [arg for arg in _argv(command, tmp_path / "unused", tmp_path) if arg not in ("--out", str(tmp_path / "unused"))]
    assert main(argv) == 130
    out = next((tmp_path / "runs").iterdir())  # the folder named after the time
    err = capsys.readouterr().err.strip()
    assert err.startswith("topo-build: interrupted") and continued.format(out=Path("runs") / out.name) in err, err
    assert "RUN_DIR" not in err and not locked(out)


def _warn_in_a_job(text: str) -> int:
    warnings.warn(text, UserWarning)
    return 0


def test_a_warning_inside_a_side_by_side_job_is_its_message_alone(monkeypatch, capfd) -> None:
    """`construct --jobs 2` runs constructions in spawned workers, which show warnings as the command line does."""
    def warns_in_jobs(args: object) -> int:
        jobs = [Job(f"job {i}", _warn_in_a_job, (f"only {i} clusters were found",)) for i in (1, 2)]
        return sum(run_jobs(jobs, 2, progress=False))

    monkeypatch.setitem(commands.HANDLERS, "report", warns_in_jobs)
    assert main(["report", "anywhere"]) == 0
    out = capfd.readouterr().out
    assert {"warning: only 1 clusters were found", "warning: only 2 clusters were found"} <= set(out.splitlines()), out
    assert ".py:" not in out and "UserWarning" not in out


def test_a_python_warning_is_its_message_alone(monkeypatch, capsys) -> None:
    def warns(args: object) -> int:
        warnings.warn("only 2 clusters were found", UserWarning)
        return 0

    monkeypatch.setitem(commands.HANDLERS, "report", warns)
    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["report", "anywhere"]) == 0
    out = capsys.readouterr().out
    assert "warning: only 2 clusters were found" in out.splitlines(), out
    assert ".py:" not in out and "UserWarning" not in out
    assert warnings.showwarning is shown  # the command line's display is its own, not left behind
