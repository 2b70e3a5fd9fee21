"""Null inputs: the data with its structure taken away, batch by batch.

Three ways of keeping what a network's own filters would produce from any input
while removing part of what the data adds:

* ``"shuffled"``: every image's pixel positions permuted by one fixed, seeded
  permutation (the same for every image and channel). Each pixel keeps its
  values and its correlations with the other pixels; their geometry goes, so
  neighbouring positions no longer share a cause.
* ``"noise"``: matched-moment noise, Gaussian with each pixel's own mean and
  standard deviation (per channel and position, estimated over the batches it
  replaces). Every first and second moment of a single pixel stays; every
  correlation between pixels goes.
* ``"phase"``: phase-randomised images. Each image's 2-D Fourier amplitudes
  are kept and its phases replaced by those of white noise (the same phases for
  every channel of an image, the mean's phase kept), so each image keeps its
  power spectrum, hence its spatial autocorrelation, and loses its edges,
  contours and every higher-order structure: what the power spectrum alone
  produces.

**Streams.** Every draw comes from its own random stream, named by the seed,
the *role* of the draw and the batch index (`stream_seed`): a control
construction's input (role ``"control"``) and the null a construction tests its
pairs against (role ``"reference"``) never share random numbers, so the noise
control is never tested against a copy of its own noise. Draws are made on the
CPU, so a seed gives the same null on every device.

`NullBatches` wraps any iterable of batches (a DataLoader, or what
``construct``'s ``loader`` returns) and yields the null version of each batch
with its labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import Dataset

from topo.common.batches import split_batch
from topo.common.errors import UserError
from topo.common.seeding import derived_seed

KINDS = ("shuffled", "noise", "phase")
#: The roles a null draw can play; each has its own stream ("training": the images and labels a control's
#: construction trains its prefixes on, `NullDataset`).
ROLES = ("control", "reference", "training")


def stream_seed(seed: int, role: str, kind: str, index: int = 0) -> int:
    """The seed of one draw: batch ``index`` of the ``kind`` null in ``role``, for the construction seed ``seed``
    (an independent stream for every combination, `topo.common.seeding.derived_seed`)."""
    return derived_seed(seed, role, kind, index)


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

    ``moments`` are needed for ``"noise"`` (see `PixelMoments.of`); ``seed`` and ``role`` (one of `ROLES`) name
    the random stream (`stream_seed`) of the permutation, the noise or the phases.
    """

    def __init__(self, batches: Iterable[Any], kind: str, *, seed: int = 0, role: str = "control",
                 moments: PixelMoments | None = None) -> None:
        if kind not in KINDS:
            raise UserError(f"null input {kind!r} is unknown: use one of {', '.join(KINDS)}")
        if role not in ROLES:
            raise UserError(f"null role {role!r} is unknown: use one of {', '.join(ROLES)}")
        if kind == "noise" and moments is None:
            raise UserError("matched-moment noise needs the data's pixel moments: pass moments=PixelMoments.of(...)")
        self.batches, self.kind, self.seed, self.role, self.moments = batches, kind, seed, role, moments

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
            null = self.draw(x, index)
            yield (null, *rest) if rest else null

    def draw(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The null of the images ``x`` (N, C, H, W) as batch ``index`` of the stream."""
        return {"shuffled": self._shuffle, "noise": self._noise, "phase": self._phase}[self.kind](x, index)

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(stream_seed(self.seed, self.role, self.kind, index))

    def _shuffle(self, x: torch.Tensor, index: int) -> torch.Tensor:
        order = torch.randperm(x.shape[2] * x.shape[3], generator=self._generator(0)).to(x.device)  # one for all
        return x.flatten(2)[:, :, order].reshape(x.shape)

    def _noise(self, x: torch.Tensor, index: int) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self._generator(index), dtype=torch.float64)
        values = self.moments.mean + self.moments.std * noise
        return values.to(device=x.device, dtype=x.dtype)

    def _phase(self, x: torch.Tensor, index: int) -> torch.Tensor:
        white = torch.randn((x.shape[0], 1, *x.shape[2:]), generator=self._generator(index), dtype=torch.float64)
        return phase_randomised(x.detach().to("cpu", torch.float64), white).to(device=x.device, dtype=x.dtype)


def phase_randomised(x: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with each image's Fourier amplitudes and the phases of ``white`` (N, 1, H, W) noise.

    The phases of a real image's transform are Hermitian-symmetric, so the result is real (its imaginary part,
    rounding only, is dropped); the zero frequency keeps the image's own phase, so each channel keeps its mean.
    """
    spectrum = torch.fft.fft2(x)
    phase = torch.angle(torch.fft.fft2(white)).expand_as(spectrum).clone()
    phase[..., 0, 0] = torch.angle(spectrum[..., 0, 0])
    return torch.fft.ifft2(torch.polar(spectrum.abs(), phase)).real


def null_batches(batches_factory, kind: str, *, seed: int, role: str, max_batches: int | None) -> NullBatches:
    """``NullBatches`` over ``batches_factory()``; for noise the moments come from a first pass over it."""
    moments = PixelMoments.of(batches_factory(), max_batches) if kind == "noise" else None
    return NullBatches(batches_factory(), kind, seed=seed, role=role, moments=moments)


class NullDataset(Dataset):
    """``dataset`` image by image as its ``kind`` null, each image with a label drawn at random among
    ``num_classes``: what a control's construction trains its prefixes on (``--epochs-per-layer``), so that the
    control runs the same brief training as the real construction and nothing of the real labels or images enters
    it. Image ``i``'s draw and label come from the ``"training"`` stream of ``seed`` at ``i`` (`stream_seed`), the
    same on every epoch and device, and ``part`` ("train", "val") names its own stream; the shuffled null keeps
    one permutation per part."""

    def __init__(self, dataset: Dataset, kind: str, *, seed: int, num_classes: int, part: str = "train",
                 moments: PixelMoments | None = None) -> None:
        self.dataset, self.num_classes = dataset, int(num_classes)
        self.null = NullBatches((), kind, seed=derived_seed(seed, part), role="training", moments=moments)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = split_batch(self.dataset[index])[0]
        labels = torch.Generator().manual_seed(derived_seed(self.null.seed, "training", "label", index))
        return self.null.draw(x[None], index)[0], int(torch.randint(self.num_classes, (1,), generator=labels))
