"""`topo.run.export`: every format's file gives the logits of the trained network it was written from."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from checks import close
from torch import nn

import builders
import topo
from builders.spec import NetworkSpec
from topo.common.errors import SpecError, UserError
from topo.run.export import ExportError, example_for, export, export_onnx, export_run, format_for, load_safetensors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),  # recent torch (2.14 here)
]

# the fixtures digits, trained (GoogLeNet's small variant trained two epochs on them, and its run), images (50
# validation digits) and want (the trained network's logits on them) are in conftest.py, shared with
# test_cli_results.py


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_rebuilds_the_network_from_the_file_alone(trained, images, want, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    model, _ = trained
    path = tmp_path / "net.safetensors"
    result = export(model, path)
    assert result.format == "safetensors" and result.max_abs_diff == 0.0
    loaded, spec = load_safetensors(path)
    assert spec == model.spec and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images), want)
    # the file is a JSON header and raw tensors (no pickle); the spec is in the header's metadata
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    assert NetworkSpec.from_json(header["__metadata__"]["topo.network_spec"]) == model.spec
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_safetensors_files_without_a_spec_or_damaged(trained, tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, _ = trained
    plain = tmp_path / "plain.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    with pytest.raises(UserError, match="holds no network spec"):
        load_safetensors(plain)
    damaged = tmp_path / "damaged.safetensors"
    export(model, damaged)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"{damaged} is truncated or corrupt"):
        load_safetensors(damaged)
    with pytest.raises(UserError, match="does not exist"):
        load_safetensors(tmp_path / "missing.safetensors")


def test_safetensors_whose_spec_does_not_fit_its_weights(trained, tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, _ = trained
    other = builders.googlenet_spec("small", num_classes=10, width_mult=0.5, in_channels=1, input_size=8)
    path = tmp_path / "mixed.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(path), metadata={"topo.network_spec": other.to_json()})
    with pytest.raises(SpecError, match="does not match the weights"):
        load_safetensors(path)


# ----------------------------------------------------------------------------- ONNX


def _onnx_case(trained, images, want, tmp_path: Path, dynamo: bool) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, _ = trained
    path = tmp_path / "net.onnx"
    result = export(model, path, dynamo=dynamo)
    assert result.format == "onnx" and result.max_abs_diff <= result.tolerance * max(1.0, float(want.abs().max()))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inputs,), (outputs,) = session.get_inputs(), session.get_outputs()
    assert (inputs.name, outputs.name) == ("input", "logits")
    assert isinstance(inputs.shape[0], str) and inputs.shape[1:] == [1, 8, 8]  # a dynamic batch dimension
    close(session.run(None, {"input": images.numpy()})[0], want)
    close(session.run(None, {"input": images[:1].numpy()})[0], want[:1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch >= 2.9 deprecates this exporter
def test_onnx_from_the_torchscript_based_exporter(trained, images, want, tmp_path: Path) -> None:
    _onnx_case(trained, images, want, tmp_path, dynamo=False)


@pytest.mark.slow
def test_onnx_from_the_torch_export_based_exporter(trained, images, want, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    if torch.__version__ < "2.5":
        pytest.skip("torch.onnx.export(dynamo=True) needs torch >= 2.5")
    _onnx_case(trained, images, want, tmp_path, dynamo=True)


def test_a_missing_exporter_package_is_one_line(trained, tmp_path: Path, monkeypatch) -> None:
    model, _ = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    hint = r"needs the Python package 'onnxruntime': pip install \"topo-build\[export\]\""
    with pytest.raises(ExportError, match=hint):
        export_onnx(model, tmp_path / "net.onnx", example_for(model.spec))
    assert not (tmp_path / "net.onnx").exists()


# ----------------------------------------------------------------------------- TorchScript and torch.export


def test_torchscript(trained, images, want, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "net.pt"
    assert export(model, path).format == "torchscript"
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        close(loaded(images), want)
        close(loaded(images[:1]), want[:1])


@pytest.mark.slow
def test_torch_export_program(trained, images, want, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "net.pt2"
    assert export(model, path).format == "pt2"
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        close(loaded(images), want)
        close(loaded(images[:1]), want[:1])
    assert not list(tmp_path.glob(".*.tmp"))


def test_networks_without_a_spec_export_with_an_example_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x = torch.randn(5, 1, 8, 8)
    with pytest.raises(UserError, match="needs example_input"):
        export(net, tmp_path / "net.pt")
    export(net, tmp_path / "net.pt", example_input=x[:2])
    with torch.no_grad():
        close(torch.jit.load(str(tmp_path / "net.pt"))(x), net(x))
    with pytest.raises(UserError, match="needs the network's NetworkSpec"):
        export(net, tmp_path / "net.safetensors", example_input=x[:2])


# ----------------------------------------------------------------------------- checks and options


class BatchBaked(nn.Module):
    """A network whose trace keeps the example's batch size as a constant: its file is wrong for other batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * int(x.shape[0])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_file_that_does_not_reproduce_the_model_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "out" / "baked.pt"
    with pytest.raises(ExportError) as error:
        export(BatchBaked(), path, example_input=torch.ones(2, 1, 4, 4))
    message = str(error.value)
    assert "\n" not in message and "differs from the model by 1 (allowed 0.0003)" in message and "batch of 3" in message
    assert list(path.parent.iterdir()) == []  # neither the file nor a temporary one


def test_export_leaves_the_model_as_it_was(trained, images, want, tmp_path: Path) -> None:
    model, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        export(model, tmp_path / "net.pt")
        assert model.training
    finally:
        model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        close(torch.jit.load(str(tmp_path / "net.pt"))(images), want)  # exported in eval mode


def test_formats_follow_the_suffix_or_the_name() -> None:
    assert [format_for(f"a{s}") for s in (".safetensors", ".onnx", ".pt", ".pt2")] == [
        "safetensors", "onnx", "torchscript", "pt2"]
    assert format_for("model.bin", "onnx") == "onnx"
    with pytest.raises(UserError, match="cannot tell the export format of model.bin"):
        format_for("model.bin")
    with pytest.raises(UserError, match="export format 'tflite' is unknown"):
        format_for("model.onnx", "tflite")
    with pytest.raises(UserError, match="name an export format"):
        format_for(None)


def test_example_input_is_seeded_at_the_spec_size(trained) -> None:
    model, _ = trained
    x = example_for(model.spec)
    assert x.shape == (2, 1, 8, 8) and torch.equal(x, example_for(model.spec))


def test_export_run_writes_into_the_run(trained, images, tmp_path: Path) -> None:
    _, run_dir = trained
    result = export_run(run_dir, "torchscript")
    assert result.path == run_dir / "export" / "discovered.pt" and result.path.is_file()
    loaded = torch.jit.load(str(result.path))
    with torch.no_grad():
        close(loaded(images), topo.load_run(run_dir)(images))
    chosen = export_run(run_dir, path=tmp_path / "elsewhere.pt")
    assert chosen.format == "torchscript" and chosen.path.is_file()
    with pytest.raises(UserError, match="no trained network 'reference'"):
        export_run(run_dir, "torchscript", network="reference")
