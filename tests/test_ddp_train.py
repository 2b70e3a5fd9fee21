"""Two gloo processes launched by torchrun train like one process, and only rank 0 writes files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from topo.data import load
from topo.io import atomic_write_text
from topo.train import TrainConfig, evaluate, train

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
import topo.train
from topo.data import load
from topo.io import atomic_write_json
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
topo.train.atomic_torch_save = counting(topo.train.atomic_torch_save)
topo.train.atomic_path = counting(topo.train.atomic_path)

out = Path(sys.argv[1])
data = load("digits")
val = Subset(data.val, range(%d))
result = train(make_model(), data.train, val, CONFIG, run_dir=out / "run", name="net")
metrics = evaluate(result.model, val, device="cpu", batch_size=50)
atomic_write_json(out / f"rank{rank}.json", {"writes": writes, "final": result.final, "evaluate": metrics})
dist.destroy_process_group()
""" % VAL_SIZE

namespace: dict = {"torch": torch, "nn": nn, "TrainConfig": TrainConfig}
exec(MODEL_AND_CONFIG, namespace)
make_model, CONFIG = namespace["make_model"], namespace["CONFIG"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_process_training_matches_one_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    atomic_write_text(script, WORKER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

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
