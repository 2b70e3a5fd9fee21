"""topo.record under torch.distributed: two gloo processes, each with its own shard of sklearn's digits."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from gloo_group import run_two
from torch import nn

import topo
from topo.common.errors import StatsError
from topo.stats.layer_stats import LayerStats

LAYERS = ["1", "3", "6:input"]  # two ReLU maps (8x8) and the head's input (one vector per image)
OFFSETS = [(0, 0), (1, -1), (-2, 2), (0, 2)]
SPLIT = 70  # unequal shards: rank 0 takes 70 images, rank 1 the other 130

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def digits_images() -> torch.Tensor:
    """The first 200 digits as (N, 1, 8, 8) float32 images in [0, 1]."""
    # imported here: the spawned workers receive their images and need not import scikit-learn
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[:200] / 16.0, dtype=torch.float32).unsqueeze(1)


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def record(batches: Iterable[torch.Tensor]) -> dict[str, LayerStats]:
    return topo.record(small_cnn(), batches, LAYERS, max_offset=2, positions=None, progress=False)


def _record_shard(rank: int, shards: tuple[torch.Tensor, torch.Tensor], out_dir: str) -> None:
    for index, layer in enumerate(record(shards[rank].split(32)).values()):
        layer.save(f"{out_dir}/rank{rank}-layer{index}.pt")


def _record_shard_or_report(rank: int, shards: tuple[torch.Tensor, torch.Tensor], out_dir: str) -> None:
    try:
        record(shards[rank].split(32))
        message = "no error"
    except StatsError as error:
        message = str(error)
    Path(out_dir, f"rank{rank}.txt").write_text(message)


def test_two_process_record_equals_one_process_over_all_the_data(tmp_path):
    images = digits_images()
    run_two(_record_shard, (images[:SPLIT], images[SPLIT:]), str(tmp_path), init_file=str(tmp_path / "init"))
    single = record(images.split(32))
    for index, spec in enumerate(LAYERS):
        want = single[spec]
        for rank in (0, 1):
            got = LayerStats.load(tmp_path / f"rank{rank}-layer{index}.pt")
            assert got.count == want.count == (200 if spec == "6:input" else 200 * 64)
            np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12, atol=1e-12)
            if not want.spatial:
                np.testing.assert_allclose(got.cov(), want.cov(), rtol=1e-10, atol=1e-12)
                continue
            for dy, dx in OFFSETS:
                np.testing.assert_allclose(got.cross_cov(dy, dx), want.cross_cov(dy, dx), rtol=1e-10, atol=1e-12)
                prob, lift = got.coactivation(dy, dx)
                np.testing.assert_array_equal(prob, want.coactivation(dy, dx)[0])
                np.testing.assert_allclose(lift, want.coactivation(dy, dx)[1], rtol=1e-12)
    conv = single["3"]
    assert np.abs(conv.corr()[~np.eye(8, dtype=bool)]).max() > 0.3  # the units do correlate
    assert np.diag(conv.coactivation(0, 1)[1]).max() > 2.0  # and neighbours fire together, twice chance or more


def test_a_rank_with_an_empty_shard_makes_every_rank_raise_the_same_error(tmp_path):
    images = digits_images()
    run_two(_record_shard_or_report, (images[:SPLIT], images[:0]), str(tmp_path), init_file=str(tmp_path / "init"))
    messages = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert messages[0] == messages[1]
    assert "\n" not in messages[0]
    assert messages[0].startswith("layer '1' saw no activations on rank 1 of 2 processes")
    assert "give every process a non-empty shard" in messages[0]


def test_without_a_process_group_an_empty_data_set_names_the_layer():
    with pytest.raises(StatsError, match=r"^layer '1' saw no activations: the data was empty"):
        record([])


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    images = digits_images()
    poisoned = images[SPLIT:].clone()
    poisoned[40, 0, 3, 3] = float("nan")  # the second batch of rank 1's shard
    run_two(_record_shard_or_report, (images[:SPLIT], poisoned), str(tmp_path), init_file=str(tmp_path / "init"))
    own, other = (tmp_path / "rank1.txt").read_text(), (tmp_path / "rank0.txt").read_text()
    assert "NaN" in own and "\n" not in own  # the failed rank raises its own error
    assert other.startswith("rank 1 of 2 failed while recording, so this one stops too: StatsError: ")
    assert other.endswith(own) and "\n" not in other
