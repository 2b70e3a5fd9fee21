"""`second_source`: another real data set at a run's image size and channels, for the control's "other" kind.

The control asks whether a topology differs from one built on other real data
by more than its own seeds differ. The second source is embedded (no download)
and has other statistics than the run's data:

* for the ``patches`` data (grey patches of photographs, each standardised on
  its own): scikit-learn's handwritten ``digits``, resized to the same size
  (pen strokes on a blank ground, standardised over the set);
* for every other data set: the ``patches``, resized to the run's size, their
  grey channel repeated to the run's channel count.
"""
from __future__ import annotations

import dataclasses

from torch.utils.data import Dataset, TensorDataset

from topo.common.errors import DataError
from topo.data.bundle import DataBundle
from topo.data.patches import patches
from topo.data.sources import digits


def second_source(bundle: DataBundle) -> DataBundle:
    """The other real data set for ``bundle`` (see the module docstring), at its image size and channels."""
    other = digits(bundle.image_size) if bundle.name == "patches" else patches(bundle.image_size)
    if other.in_channels == bundle.in_channels:
        return other
    return dataclasses.replace(other, train=_repeat_channels(other.train, bundle.in_channels),
                               val=_repeat_channels(other.val, bundle.in_channels), in_channels=bundle.in_channels)


def _repeat_channels(dataset: Dataset, channels: int) -> TensorDataset:
    if not isinstance(dataset, TensorDataset) or dataset.tensors[0].shape[1] != 1:
        raise DataError(f"the second source's images cannot be given {channels} channels")
    x, y = dataset.tensors
    return TensorDataset(x.expand(-1, channels, -1, -1).contiguous(), y)
