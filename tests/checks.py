"""Checks shared by test modules, as plain functions (conftest.py is not importable by name; its fixtures
need no import): the export tests' comparison of logits, and the one-line error of the command line."""
from __future__ import annotations

import torch

# what the tests allow between a file's logits and the model's: float32 kernels of another runtime
ATOL = RTOL = 1e-4


def close(got, want: torch.Tensor) -> None:
    torch.testing.assert_close(torch.as_tensor(got), want, atol=ATOL, rtol=RTOL)


def one_line_error(capsys) -> str:
    """What the command wrote to stderr, checked to be one line and no traceback."""
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]
