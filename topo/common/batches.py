"""What a batch is: an input tensor, or a tuple or list whose first item is the input (labels and the rest
after it)."""
from __future__ import annotations

from typing import Any


def split_batch(batch: Any) -> tuple[Any, tuple]:
    """(input, the rest of the batch): a non-empty tuple or list is (input, labels, ...); anything else is the
    input alone."""
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0], tuple(batch[1:])
    return batch, ()


def batch_input(batch: Any) -> Any:
    """The input of a batch (see `split_batch`)."""
    return split_batch(batch)[0]
