"""CIFAR under torch.distributed: only rank 0 downloads, and a failure anywhere stops every rank.

torchvision's CIFAR10 is replaced by a stand-in whose "download" writes the files itself, so
nothing here touches the network.
"""
from __future__ import annotations

import pytest

import json
import time
from pathlib import Path

import torch.distributed as dist
import torchvision
from gloo_group import run_two

from topo.data import load, sources

pytestmark = pytest.mark.slow  # subprocesses or whole constructions: seconds each


class FakeCIFAR10:
    """torchvision's CIFAR10 as ``cifar()`` sees it: "Dataset not found" without the files, and with
    ``download=True`` a download (slow enough for two processes to overlap) unless the files are there.
    Each download leaves a marker naming the rank and split; ``download_error`` makes it fail instead."""

    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    download_error: Exception | None = None

    def __init__(self, root: str, train: bool = True, transform=None, download: bool = False) -> None:
        files = Path(root) / "cifar-10-batches-py" / "batches.meta"
        if download and not files.exists():
            files.parent.mkdir(parents=True, exist_ok=True)
            (Path(root) / f"downloaded-by-rank{dist.get_rank()}-{'train' if train else 'test'}").touch()
            time.sleep(0.5)
            if self.download_error is not None:
                raise self.download_error
            files.write_bytes(b"")
        if not files.exists():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")


def _use_fake_cifar(download_error: Exception | None = None) -> None:
    FakeCIFAR10.download_error = download_error
    torchvision.datasets.CIFAR10 = FakeCIFAR10
    sources.reachable = lambda *args, **kwargs: True  # never ask the network


def _outcome(root: Path, download: bool | None) -> str:
    """What loading CIFAR-10 from ``root`` gave this rank: its classes, or the error's type and message."""
    try:
        return f"opened {len(load('cifar10', root, download=download).class_names)} classes"
    except Exception as error:  # noqa: BLE001 - the test compares what each rank saw
        return f"{type(error).__name__}: {error}"


def _load_twice(rank: int, root: str, out_dir: str) -> None:
    _use_fake_cifar()
    outcomes = [_outcome(Path(root), None), _outcome(Path(root), None)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))


def _load_with_failures(rank: int, out_dir: str) -> None:
    out = Path(out_dir)
    _use_fake_cifar()
    outcomes = {"no download allowed": _outcome(out / "never", download=False)}
    # rank 0 finds the files the test wrote; rank 1 looks in a folder without them
    outcomes["files on rank 0 only"] = _outcome(out / ("rank0-only" if rank == 0 else "elsewhere"), download=False)
    _use_fake_cifar(download_error=OSError("connection reset by peer"))
    outcomes["download fails"] = _outcome(out / "failing", download=True)
    _use_fake_cifar(download_error=ValueError("a bug in the download code"))
    outcomes["download crashes"] = _outcome(out / "crashing", download=True)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))


def _read(out_dir: Path) -> list:
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_only_rank_0_downloads_and_every_rank_opens_the_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    run_two(_load_twice, str(root), str(tmp_path), init_file=str(tmp_path / "init"), timeout=60)
    assert _read(tmp_path) == [["opened 10 classes"] * 2] * 2
    assert sorted(p.name for p in root.glob("downloaded-by-*")) == ["downloaded-by-rank0-train"]


def test_a_failure_on_any_rank_raises_the_same_data_error_on_every_rank(tmp_path: Path) -> None:
    (tmp_path / "rank0-only" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "rank0-only" / "cifar-10-batches-py" / "batches.meta").write_bytes(b"")
    run_two(_load_with_failures, str(tmp_path), init_file=str(tmp_path / "init"), timeout=60)
    rank0, rank1 = _read(tmp_path)

    never = rank0["no download allowed"]
    assert never == rank1["no download allowed"]
    assert never.startswith(f"DataError: CIFAR-10 not found in {tmp_path / 'never'}") and never.endswith(
        "or allow downloading"
    )
    assert not (tmp_path / "never").exists()

    for outcome in (rank0["files on rank 0 only"], rank1["files on rank 0 only"]):
        assert outcome.startswith("DataError: CIFAR-10 not found in ")
        assert "rank 0 has the files but rank(s) 1 cannot open them: give every process the same data directory" in (
            outcome
        )

    fails = rank0["download fails"]
    assert fails == rank1["download fails"]
    assert fails.startswith("DataError: CIFAR-10 not found") and "downloading failed (connection reset by peer)" in fails
    assert [p.name for p in (tmp_path / "failing").glob("downloaded-by-*")] == ["downloaded-by-rank0-train"]

    assert rank0["download crashes"] == "ValueError: a bug in the download code"  # a bug stays a bug on rank 0
    assert rank1["download crashes"].startswith("DataError: CIFAR-10 not found in ")
    assert rank1["download crashes"].endswith("rank 0 failed to open or download it (see its error)")
    assert all("\n" not in outcome for outcomes in (rank0, rank1) for outcome in outcomes.values())
