"""Null inputs: the data with its structure taken away, batch by batch.

Two ways of keeping what a network's own filters would produce from any input
while removing what the data adds:

* ``"shuffled"``: every image's pixel positions permuted by one fixed, seeded
  permutation (the same for every image and channel). Each pixel keeps its
  values and its correlations with the other pixels; their geometry goes, so
  neighbouring positions no longer share a cause.
* ``"noise"``: matched-moment noise, Gaussian with each pixel's own mean and
  standard deviation (per channel and position, estimated over the batches it
  replaces). Every first and second moment of a single pixel stays; every
  correlation between pixels goes.

`NullBatches` wraps any iterable of batches (a DataLoader, or what
``construct``'s ``loader`` returns) and yields the null version of each batch
with its labels. It is deterministic: the permutation and the noise are drawn
from generators seeded by ``seed`` (and the batch index), on the CPU, so a seed
gives the same null on every device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from topo.common.batches import split_batch
from topo.common.errors import UserError

KINDS = ("shuffled", "noise")


@dataclass(frozen=True)
class PixelMoments:
    """Per (channel, y, x) mean and standard deviation of a set of images (float64)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, batches: Iterable[Any], max_batches: int | None = None) -> "PixelMoments":
        """The moments over (the first ``max_batches`` of) ``batches``, with a float64 running sum."""
        total = square = None
        count = 0
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            x = split_batch(batch)[0].detach().to("cpu", torch.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
            square = (x * x).sum(0) if square is None else square + (x * x).sum(0)
            count += x.shape[0]
        if count < 2:
            raise UserError(f"matched-moment noise needs at least 2 images to estimate from, got {count}; "
                            "record over more data")
        mean = total / count
        var = (square / count - mean * mean).clamp_min(0.0) * count / (count - 1)
        return cls(mean, var.sqrt())


class NullBatches:
    """The null version (``kind`` in `KINDS`) of every batch of ``batches``, labels kept.

    ``moments`` are needed for ``"noise"`` (see `PixelMoments.of`); ``seed`` fixes
    the permutation and the noise.
    """

    def __init__(self, batches: Iterable[Any], kind: str, *, seed: int = 0,
                 moments: PixelMoments | None = None) -> None:
        if kind not in KINDS:
            raise UserError(f"null input {kind!r} is unknown: use one of {', '.join(KINDS)}")
        if kind == "noise" and moments is None:
            raise UserError("matched-moment noise needs the data's pixel moments: pass moments=PixelMoments.of(...)")
        self.batches, self.kind, self.seed, self.moments = batches, kind, seed, moments

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    # the wrapped loader's generators: `topo.record` puts them back to replay the same batches
    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.batches, "generator", None)

    @property
    def sampler(self) -> Any:
        return getattr(self.batches, "sampler", None)

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.batches):
            x, rest = split_batch(batch)
            null = self._shuffle(x) if self.kind == "shuffled" else self._noise(x, index)
            yield (null, *rest) if rest else null

    def _shuffle(self, x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(x.shape[2] * x.shape[3], generator=generator).to(x.device)
        return x.flatten(2)[:, :, order].reshape(x.shape)

    def _noise(self, x: torch.Tensor, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        values = self.moments.mean + self.moments.std * noise
        return values.to(device=x.device, dtype=x.dtype)


def null_batches(batches_factory, kind: str, *, seed: int, max_batches: int | None) -> NullBatches:
    """``NullBatches`` over ``batches_factory()``; for noise the moments come from a first pass over it."""
    moments = PixelMoments.of(batches_factory(), max_batches) if kind == "noise" else None
    return NullBatches(batches_factory(), kind, seed=seed, moments=moments)
