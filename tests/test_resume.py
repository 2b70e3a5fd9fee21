"""A training process killed with SIGKILL and resumed ends exactly where an uninterrupted run ends.

The kill is not raced: `topo.common.writing`'s testing hook (``TOPO_TEST_KILL_AT_WRITE``)
makes the process kill itself while it writes its third checkpoint, so the
directory holds the checkpoint of epoch 2 whatever the machine's load.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from topo.train.files import read_checkpoint
from topo.common.writing import KILL_AT_WRITE

EPOCHS = 6
KILLED_AT = 3  # the process dies while writing this epoch's checkpoint

# Dropout and a data set that draws from Python's, NumPy's and torch's global
# generators: exact resume needs every one of them restored.
TRAIN_SCRIPT = f"""
import logging, random, sys
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from topo.data import load
from topo.common.writing import atomic_torch_save
from topo.train import TrainConfig, train

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
torch.set_num_threads(1)

class Jittered(Dataset):
    def __init__(self, data):
        self.data = data
    def __len__(self):
        return len(self.data)
    def __getitem__(self, i):
        x, y = self.data[i]
        scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return x * scale + 0.1 * torch.randn_like(x), y

run_dir = sys.argv[1]
data = load("digits")
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.2),
    nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10),
)
config = TrainConfig(epochs={EPOCHS}, batch_size=32, lr=0.05, warmup_epochs=0.5, label_smoothing=0.1,
                     ema_decay=0.9, grad_clip=5.0, seed=1, workers=0, progress=False)
result = train(model, Jittered(data.train), data.val, config, run_dir=run_dir, name="net")
atomic_torch_save({{"model": result.model.state_dict(), "ema": result.ema_model.state_dict()}},
                  run_dir + "/final.pt")
"""


def _start(run_dir: Path, kill: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(KILL_AT_WRITE, None)
    if kill is not None:
        env[KILL_AT_WRITE] = kill
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stderr


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = _start(reference_dir)
    victim = _start(killed_dir, kill=f"{KILLED_AT}:net.ckpt")
    _, stderr = victim.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL, stderr
    csv = killed_dir / "net_metrics.csv"
    before = pd.read_csv(csv)
    checkpoint = read_checkpoint(killed_dir / "net.ckpt", resumable=True)  # whole: the kill came mid-write
    assert checkpoint["epoch"] == KILLED_AT - 1 == len(before), "the checkpoint of the epoch before the kill"
    assert [p.name for p in killed_dir.glob(".net.ckpt.*")], "killed while writing the next checkpoint"
    assert not (killed_dir / "final.pt").exists()

    resumed_log = _finish(_start(killed_dir))
    _finish(reference)
    assert f"resuming net from {killed_dir / 'net.ckpt'} after epoch {checkpoint['epoch']}" in resumed_log

    got = torch.load(killed_dir / "final.pt", weights_only=True)
    want = torch.load(reference_dir / "final.pt", weights_only=True)
    for part in ("model", "ema"):
        assert got[part].keys() == want[part].keys()
        for key in want[part]:
            assert torch.equal(got[part][key], want[part][key]), f"{part}.{key} differs"

    resumed, uninterrupted = pd.read_csv(csv), pd.read_csv(reference_dir / "net_metrics.csv")
    timings = ["epoch_time_s", "train_time_s"]
    assert len(resumed) == len(uninterrupted) == EPOCHS
    pd.testing.assert_frame_equal(resumed.drop(columns=timings), uninterrupted.drop(columns=timings), check_exact=True)
    # the epochs before the kill come from the checkpoint, not from training them again
    done = len(before)
    pd.testing.assert_frame_equal(resumed.iloc[:done], before, check_exact=True)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    from topo.common.writing import atomic_torch_save
    from topo.common.seeding import capture_rng_state, restore_rng_state, seed_everything

    def draw() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(5)
    atomic_torch_save(capture_rng_state(), tmp_path / "rng.pt")
    first = draw()
    assert draw() != first
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == first
    seed_everything(5)
    assert draw() == first
