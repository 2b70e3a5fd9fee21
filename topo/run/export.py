"""Trained networks as files other programs can use: safetensors, ONNX, TorchScript and torch.export.

    export(model, "net.onnx")                          # the format follows the suffix
    export_run("runs/run-digits-...", "safetensors")   # RUN_DIR/export/discovered.safetensors
    model, spec = load_safetensors("net.safetensors")  # rebuilt from the file alone, no pickle

=============== ============== ===================================================================
format          suffix         what
=============== ============== ===================================================================
``safetensors`` .safetensors   the weights, with the NetworkSpec JSON in the file's metadata
``onnx``        .onnx          an ONNX graph, input ``input`` (N, C, H, W), output ``logits``
``torchscript`` .pt            ``torch.jit.trace``: ``torch::jit::load`` in C++ (libtorch)
``pt2``         .pt2           ``torch.export``: ``torch.export.load`` in Python
=============== ============== ===================================================================

Every export writes atomically (``topo.common.writing.atomic_path``) and checks the written
file before it replaces anything: the file is read back and run on the example
input and on a batch of another size (the batch dimension is dynamic in every
format), and its logits must lie within ``tolerance`` of the model's:
``max |file - model| <= tolerance * max(1, max |model|)``, with ``tolerance``
1e-4 by default (float32 kernels of another runtime differ by about 1e-6 here).
A file that fails the check raises :class:`ExportError` and is not written.
Networks are exported in eval mode, on the CPU, in float32.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from builders.spec import NetworkSpec
from topo.common.errors import SpecError, UserError
from topo.common.writing import atomic_path
from topo.run.load import build_with_weights, load_run

log = logging.getLogger(__name__)

SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
FORMATS = tuple(SUFFIXES)
TOLERANCE = 1e-4
SPEC_KEY = "topo.network_spec"  # safetensors metadata: the NetworkSpec JSON
VERSION_KEY = "topo.export_version"
INSTALL_HINT = 'pip install "topo-build[export]"'


class ExportError(UserError):
    """An exported file that does not reproduce the model's outputs, or a missing exporter package."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote and how closely the file reproduces the model."""

    path: Path
    format: str
    max_abs_diff: float
    tolerance: float


def _require(module: str) -> Any:
    """``import module``, or an :class:`ExportError` naming its package and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ExportError(f"exporting needs the Python package {package!r}: {INSTALL_HINT}") from None


def format_for(path: str | Path | None, format: str | None = None) -> str:
    """``format`` checked (known, and not contradicted by a suffix of ``path`` that names another format), or
    the format named by ``path``'s suffix."""
    named = _format_of_suffix(path)
    if format is None:
        if path is None:
            raise UserError(f"name an export format: one of {', '.join(FORMATS)}")
        if named is None:
            raise UserError(f"cannot tell the export format of {path}: name a format ({', '.join(FORMATS)}) "
                            f"or use a suffix {', '.join(SUFFIXES.values())}")
        return named
    if format not in SUFFIXES:
        raise UserError(f"export format {format!r} is unknown: use one of {', '.join(FORMATS)}")
    if named is not None and named != format:
        raise UserError(f"export format {format!r} contradicts the file {path}, whose suffix {Path(path).suffix} "
                        f"names {named!r}: write {Path(path).with_suffix(SUFFIXES[format])}, or export {named!r}")
    return format


def _format_of_suffix(path: str | Path | None) -> str | None:
    """The format whose suffix ``path`` has (any case), None for another suffix or no path."""
    if path is None:
        return None
    suffix = Path(path).suffix.lower()
    return next((name for name, known in SUFFIXES.items() if known == suffix), None)


def example_for(spec: NetworkSpec, batch: int = 2) -> torch.Tensor:
    """A fixed (seeded) normal input batch at the spec's nominal input size."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, spec.in_channels, spec.input_size, spec.input_size, generator=generator)


def _prepared(model: nn.Module) -> nn.Module:
    """A CPU float32 eval-mode copy: the caller's model keeps its device, dtype and mode."""
    return copy.deepcopy(model).cpu().float().eval()


def _check(name: str, run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
           example: torch.Tensor, tolerance: float) -> float:
    """The largest difference between ``run`` and ``model`` on ``example`` and on a batch one image
    larger; an :class:`ExportError` beyond the tolerance."""
    worst = 0.0
    for x in (example, torch.cat([example, example[:1]])):
        with torch.no_grad():
            want, got = model(x).float(), torch.as_tensor(run(x)).float()
        if got.shape != want.shape:
            raise ExportError(f"exported {name} gives logits of shape {tuple(got.shape)} for a batch of "
                              f"{len(x)}, not {tuple(want.shape)}")
        diff = float((got - want).abs().max()) if want.numel() else 0.0
        limit = tolerance * max(1.0, float(want.abs().max()) if want.numel() else 0.0)
        if not diff <= limit:  # also catches NaN
            raise ExportError(f"exported {name} differs from the model by {diff:.3g} (allowed {limit:.3g}) "
                              f"on a batch of {len(x)}: the file was not written")
        worst = max(worst, diff)
    return worst


# --------------------------------------------------------------------------- safetensors
def export_safetensors(model: nn.Module, path: str | Path, spec: NetworkSpec | None = None, *,
                       example_input: torch.Tensor | None = None, tolerance: float = TOLERANCE) -> Exported:
    """The weights as safetensors, with ``spec`` (default ``model.spec``) as JSON in the metadata.

    :func:`load_safetensors` rebuilds the network from the file alone.
    """
    spec = _spec_of(model, spec)
    safetensors_torch = _require("safetensors.torch")
    model = _prepared(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    example = example_for(spec) if example_input is None else example_input.cpu().float()
    metadata = {"format": "pt", SPEC_KEY: spec.to_json(indent=None), VERSION_KEY: "1"}
    with atomic_path(path) as tmp:
        tmp.write_bytes(safetensors_torch.save(state, metadata=metadata))  # into atomic_path's file, its mode kept
        loaded, _ = load_safetensors(tmp)
        diff = _check(f"safetensors file {path}", loaded, model, example, tolerance)
    return Exported(Path(path), "safetensors", diff, tolerance)


def load_safetensors(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, NetworkSpec]:
    """The network (eval mode, on ``map_location``) and spec stored in a file written by :func:`export_safetensors`."""
    safetensors = _require("safetensors")
    safetensors_torch = _require("safetensors.torch")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"safetensors file {path} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = safetensors_torch.load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - the safetensors error types differ between versions
        raise UserError(f"safetensors file {path} is truncated or corrupt ({type(e).__name__})") from None
    if SPEC_KEY not in metadata:
        raise UserError(f"safetensors file {path} holds no network spec ({SPEC_KEY!r} metadata): "
                        f"it was not written by topo.run.export; build the network and load the weights yourself")
    try:
        spec = NetworkSpec.from_json(metadata[SPEC_KEY])
    except SpecError as e:
        raise SpecError(f"safetensors file {path}: {e}") from None
    model = build_with_weights(spec, state, source=str(path), spec_source=f"the spec in {path}")
    return model.to(map_location).eval(), spec


def _spec_of(model: nn.Module, spec: NetworkSpec | None) -> NetworkSpec:
    spec = spec if spec is not None else getattr(model, "spec", None)
    if not isinstance(spec, NetworkSpec):
        raise UserError("safetensors export needs the network's NetworkSpec: pass spec= (or export a builders.Network)")
    return spec


# --------------------------------------------------------------------------- ONNX
def _onnx_kwargs(dynamo: bool | None) -> dict[str, Any]:
    """The arguments that select torch.onnx's exporter: ``None`` picks the torch.export-based one
    (torch >= 2.5) when ``onnxscript`` is installed, else the TorchScript-based one."""
    params = inspect.signature(torch.onnx.export).parameters
    has_dynamo = {"dynamo", "external_data"} <= set(params)
    if dynamo is None:
        dynamo = has_dynamo and importlib.util.find_spec("onnxscript") is not None
    if dynamo and not has_dynamo:
        raise ExportError(f"torch {torch.__version__} has no torch.export-based ONNX exporter: use dynamo=False")
    if dynamo:
        _require("onnx")
        _require("onnxscript")
        batch = torch.export.Dim("batch", min=1)
        return {"dynamo": True, "external_data": False, "dynamic_shapes": ({0: batch},)}
    legacy: dict[str, Any] = {"dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}
    return {"dynamo": False, **legacy} if "dynamo" in params else legacy


#: Loggers of the ONNX exporter's passes, which report every pass at INFO ("Removed 353 unused nodes").
ONNX_LOGGERS = ("onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet_loggers(names: tuple[str, ...]) -> Any:
    """Only warnings and errors from the loggers ``names`` inside the block; their levels restored after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor, *, dynamo: bool | None = None,
                opset: int | None = None, tolerance: float = TOLERANCE) -> Exported:
    """An ONNX graph (input ``input``, output ``logits``, dynamic batch), checked with onnxruntime.

    ``dynamo`` chooses torch.onnx's exporter: True the torch.export-based one
    (needs ``onnxscript``), False the TorchScript-based one (deprecated from
    torch 2.9, but in every torch >= 2.4), None the first where available.
    """
    ort = _require("onnxruntime")
    model, example = _prepared(model), example_input.detach().cpu().float()
    options = _onnx_kwargs(dynamo)
    with atomic_path(path) as tmp:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), _quiet_loggers(ONNX_LOGGERS):  # it prints and logs its progress
            torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                              opset_version=opset, **options)
        if printed.getvalue():
            log.debug("torch.onnx: %s", printed.getvalue().strip())
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diff = _check(f"ONNX file {path}", lambda x: session.run(None, {"input": x.numpy()})[0],
                      model, example, tolerance)
    return Exported(Path(path), "onnx", diff, tolerance)


# --------------------------------------------------------------------------- TorchScript and torch.export
@contextlib.contextmanager
def _quiet_jit() -> Any:
    """Hide the notice recent torch (2.14 here) gives that TorchScript is deprecated: it was asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def export_torchscript(model: nn.Module, path: str | Path, example_input: torch.Tensor, *,
                       tolerance: float = TOLERANCE) -> Exported:
    """A traced TorchScript module (``torch.jit.trace``), loadable in C++ with ``torch::jit::load``."""
    model, example = _prepared(model), example_input.detach().cpu().float()
    with atomic_path(path) as tmp, _quiet_jit():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        traced.save(str(tmp))
        loaded = torch.jit.load(str(tmp), map_location="cpu")
        diff = _check(f"TorchScript file {path}", loaded, model, example, tolerance)
    return Exported(Path(path), "torchscript", diff, tolerance)


def export_program(model: nn.Module, path: str | Path, example_input: torch.Tensor, *,
                   tolerance: float = TOLERANCE) -> Exported:
    """A ``torch.export`` program with a dynamic batch (``.pt2``), loadable with ``torch.export.load``."""
    model, example = _prepared(model), example_input.detach().cpu().float()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()  # torch.export.save wants a path ending in .pt2 or a buffer
    torch.export.save(program, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
        loaded = torch.export.load(io.BytesIO(tmp.read_bytes())).module()
        diff = _check(f"torch.export file {path}", loaded, model, example, tolerance)
    return Exported(Path(path), "pt2", diff, tolerance)


# --------------------------------------------------------------------------- front doors
def export(model: nn.Module, path: str | Path, format: str | None = None, *, spec: NetworkSpec | None = None,
           example_input: torch.Tensor | None = None, tolerance: float = TOLERANCE, **options: Any) -> Exported:
    """Write ``model`` to ``path`` in ``format`` (default: from the suffix), checked against the model.

    ``spec`` defaults to ``model.spec`` (a ``builders.Network``); ``example_input``
    to a seeded batch of two at the spec's input size. ``options`` go to the
    format's function (``dynamo``, ``opset`` for ONNX).
    """
    format = format_for(path, format)
    spec = spec if spec is not None else getattr(model, "spec", None)
    if example_input is None:
        if not isinstance(spec, NetworkSpec):
            raise UserError("export needs example_input= for a network without a NetworkSpec")
        example_input = example_for(spec)
    if format == "safetensors":
        return export_safetensors(model, path, spec, example_input=example_input, tolerance=tolerance, **options)
    writer = {"onnx": export_onnx, "torchscript": export_torchscript, "pt2": export_program}[format]
    return writer(model, path, example_input, tolerance=tolerance, **options)


def export_run(run_dir: str | Path, format: str | None = None, *, network: str = "discovered",
               path: str | Path | None = None, ema: bool = False, **options: Any) -> Exported:
    """Export a run's trained ``network`` (see :func:`topo.run.load.load_run`) in ``format``, or the
    format of ``path``'s suffix; the default path is ``RUN_DIR/export/NETWORK<suffix>``."""
    format = format_for(path, format)
    model = load_run(run_dir, network, ema=ema)
    out = Path(path) if path is not None else Path(run_dir) / "export" / f"{network}{SUFFIXES[format]}"
    result = export(model, out, format, **options)
    log.info("exported %s of %s to %s (max |difference| %.3g)", network, run_dir, out, result.max_abs_diff)
    return result

