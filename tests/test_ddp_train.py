"""Two gloo processes launched by torchrun train like one process, only rank 0 writes files, and a
job that dies after an epoch resumes to the uninterrupted result."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from gloo_group import finish, torchrun
from torch import nn
from torch.utils.data import Subset

from topo.data import load
from topo.common.writing import atomic_write_text
from topo.train.config import TrainConfig
from topo.train.trainer import evaluate, train

VAL_SIZE = 359  # odd: a padding sampler would count one sample twice

MODEL_AND_CONFIG = """
def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))

CONFIG = TrainConfig(epochs=2, batch_size=64, lr=0.05, ema_decay=0.9, seed=3, workers=0, progress=False)
"""

WORKER_SCRIPT = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset
import topo.train.trainer
from topo.data import load
from topo.common.writing import atomic_write_json
from topo.train import TrainConfig, evaluate, train
""" + MODEL_AND_CONFIG + """
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
writes = []
def counting(write):
    def wrapper(*args, **kwargs):
        writes.append(str(args[-1] if write.__name__ == "atomic_torch_save" else args[0]))
        return write(*args, **kwargs)
    wrapper.__name__ = write.__name__
    return wrapper
topo.train.trainer.atomic_torch_save = counting(topo.train.trainer.atomic_torch_save)
topo.train.trainer.atomic_path = counting(topo.train.trainer.atomic_path)

out = Path(sys.argv[1])
data = load("digits")
val = Subset(data.val, range(%d))
result = train(make_model(), data.train, val, CONFIG, run_dir=out / "run", name="net")
metrics = evaluate(result.model, val, device="cpu", batch_size=50)
atomic_write_json(out / f"rank{rank}.json", {"writes": writes, "final": result.final, "evaluate": metrics})
dist.destroy_process_group()
""" % VAL_SIZE

# Run with "interrupt", rank 0 dies (os._exit) as soon as epoch 1's checkpoint is on disk, before the
# metrics file; torchrun then stops rank 1. BatchNorm, dropout (a random stream per rank), warm-up and
# EMA make the resumed run depend on every piece of state the checkpoint restores.
RESUME_SCRIPT = """
import logging, os, sys
import torch
import torch.distributed as dist
from torch import nn
import topo.train.trainer
from topo.data import load
from topo.common.writing import atomic_torch_save
from topo.train import TrainConfig, train

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
run_dir, mode = sys.argv[1], sys.argv[2]
if mode == "interrupt" and rank == 0:
    save = topo.train.trainer.atomic_torch_save
    def save_then_die(obj, path):
        save(obj, path)
        if obj["epoch"] == 1:
            os._exit(3)
    topo.train.trainer.atomic_torch_save = save_then_die

data = load("digits")
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 64, 10),
)
config = TrainConfig(epochs=2, batch_size=64, lr=0.05, warmup_epochs=0.5, ema_decay=0.9, seed=3, workers=0,
                     progress=False)
result = train(model, data.train, data.val, config, run_dir=run_dir, name="net")
atomic_torch_save({"model": result.model.state_dict(), "ema": result.ema_model.state_dict()},
                  f"{run_dir}/final-rank{rank}.pt")
dist.destroy_process_group()
"""

namespace: dict = {"torch": torch, "nn": nn, "TrainConfig": TrainConfig}
exec(MODEL_AND_CONFIG, namespace)
make_model, CONFIG = namespace["make_model"], namespace["CONFIG"]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_two_process_training_matches_one_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    atomic_write_text(script, WORKER_SCRIPT)
    returncode, _, stderr = finish(torchrun(script, tmp_path))
    assert returncode == 0, stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name != "tensorboard") == ["net.ckpt", "net_metrics.csv"]
    assert reports[1]["writes"] == []  # rank 1 wrote nothing
    assert len(reports[0]["writes"]) == 2 * CONFIG.epochs  # checkpoint and metrics, every epoch

    # evaluation covers every sample exactly once, on every rank
    data = load("digits")
    val = Subset(data.val, range(VAL_SIZE))
    ddp_model = make_model()
    ddp_model.load_state_dict(torch.load(run / "net.ckpt", weights_only=True)["model"])
    single_eval = evaluate(ddp_model, val, device="cpu", batch_size=50)
    for report in reports:
        assert report["evaluate"]["count"] == VAL_SIZE
        assert report["evaluate"]["top1"] == pytest.approx(single_eval["top1"], abs=1e-12)
        assert report["evaluate"]["loss"] == pytest.approx(single_eval["loss"], rel=1e-6)
        assert report["final"]["val_top1"] == pytest.approx(single_eval["top1"], abs=1e-12)
    timings = {"epoch_time_s", "train_time_s"}
    finals = [{k: v for k, v in report["final"].items() if k not in timings} for report in reports]
    assert finals[0] == finals[1]

    # two processes with 32 samples each step like one process with 64
    single = train(make_model(), data.train, val, CONFIG)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp_model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    history = pd.read_csv(run / "net_metrics.csv")
    for column in ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "ema_val_top1"):
        assert history[column].tolist() == pytest.approx(single.history[column].tolist(), rel=1e-4, abs=1e-3)
    assert (history["train_images"] == single.history["train_images"]).all()


def test_interrupted_ddp_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    script = tmp_path / "resume.py"
    atomic_write_text(script, RESUME_SCRIPT)
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference = torchrun(script, reference_dir, "full")
    returncode, _, stderr = finish(torchrun(script, resumed_dir, "interrupt"))
    assert returncode != 0, "rank 0 must die after epoch 1"
    assert torch.load(resumed_dir / "net.ckpt", weights_only=True)["epoch"] == 1
    assert not (resumed_dir / "net_metrics.csv").exists()  # it died before writing the metrics
    assert not list(resumed_dir.glob("final-rank*.pt"))

    returncode, _, stderr = finish(torchrun(script, resumed_dir, "resume"))
    assert returncode == 0, stderr[-3000:]
    assert f"resuming net from {resumed_dir / 'net.ckpt'} after epoch 1 of 2" in stderr
    returncode, _, stderr = finish(reference)
    assert returncode == 0, stderr[-3000:]

    for rank in (0, 1):
        got = torch.load(resumed_dir / f"final-rank{rank}.pt", weights_only=True)
        want = torch.load(reference_dir / f"final-rank{rank}.pt", weights_only=True)
        for part in ("model", "ema"):
            assert got[part].keys() == want[part].keys()
            for key in want[part]:
                assert torch.equal(got[part][key], want[part][key]), f"rank {rank}: {part}.{key} differs"
    timings = ["epoch_time_s", "train_time_s"]
    resumed = pd.read_csv(resumed_dir / "net_metrics.csv").drop(columns=timings)
    uninterrupted = pd.read_csv(reference_dir / "net_metrics.csv").drop(columns=timings)
    assert len(resumed) == 2
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=True)
