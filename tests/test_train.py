"""The trainer: configuration, schedules, losses, EMA, evaluation, files, and training on digits."""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

import builders
from builders import NetworkOutput
from topo.common.errors import UserError
from topo.train.config import DivergenceError, TrainConfig
from topo.train.trainer import LRSchedule, evaluate, split_output, train


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, classes)
    )


class WithAuxHeads(nn.Module):
    """A linear classifier with two auxiliary linear heads, shaped like a built network's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)
        self.aux = nn.ModuleList([nn.Linear(64, 10), nn.Linear(64, 10)])

    def forward(self, x: torch.Tensor):
        x = x.flatten(1)
        logits = self.fc(x)
        if self.training:
            return NetworkOutput(logits, tuple(head(x) for head in self.aux))
        return logits


def quiet(**options) -> TrainConfig:
    return TrainConfig(**{"progress": False, "batch_size": 64, "epochs": 1, **options})


# ----------------------------------------------------------------------------- configuration


def test_config_round_trips_through_json() -> None:
    config = TrainConfig(epochs=3, schedule="paper", ema_decay=0.99, grad_clip=2.0, workers=2, label_smoothing=0.1)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TrainConfig().momentum == 0.9 and TrainConfig().aux_weight == 0.3


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"schedule": "step"}, "unknown schedule 'step'"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"batch_size": 0}, "batch size"),
        ({"amp_dtype": "int8"}, "amp_dtype"),
        ({"workers": "many"}, "workers"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"warmup_epochs": -1.0}, "warmup_epochs"),
        ({"decay_factor": 1.5}, "decay_factor"),
        ({"grad_clip": 0.0}, "grad_clip"),
    ],
)
def test_bad_config_is_a_one_line_user_error(options, fragment) -> None:
    with pytest.raises(UserError, match=fragment):
        TrainConfig(**options)
    with pytest.raises(UserError, match="unknown training settings"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})


# ----------------------------------------------------------------------------- schedules


def test_paper_schedule_decays_four_percent_every_eight_epochs() -> None:
    schedule = LRSchedule("paper", steps_per_epoch=10, epochs=40)
    assert [schedule(epoch * 10) for epoch in (0, 7, 8, 15, 16, 39)] == pytest.approx(
        [1.0, 1.0, 0.96, 0.96, 0.96**2, 0.96**4]
    )
    assert schedule(79) == 1.0 and schedule(80) == pytest.approx(0.96)


def test_cosine_schedule_with_warmup_and_constant() -> None:
    cosine = LRSchedule("cosine", steps_per_epoch=10, epochs=12, warmup_epochs=2)
    assert [cosine(s) for s in (0, 9, 19)] == pytest.approx([0.05, 0.5, 1.0])
    assert cosine(20) == pytest.approx(1.0)
    assert cosine(70) == pytest.approx(0.5)  # halfway through the 100 steps after warm-up
    assert cosine(119) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert LRSchedule("constant", 10, 5)(37) == 1.0


def test_trainer_follows_the_paper_schedule(digits) -> None:
    config = quiet(epochs=3, schedule="paper", decay_every=1, decay_factor=0.5, lr=0.08)
    result = train(small_cnn(), digits.train, digits.val, config)
    assert result.history["lr"].tolist() == pytest.approx([0.08, 0.04, 0.02])
    assert list(result.history["epoch"]) == [1, 2, 3]


# ----------------------------------------------------------------------------- losses


def _expected_loss(model: nn.Module, data: TensorDataset, aux_weight: float, smoothing: float) -> float:
    model.train()
    x, y = data.tensors
    with torch.no_grad():
        logits, aux = split_output(model(x))
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        loss = loss + sum(aux_weight * F.cross_entropy(a, y, label_smoothing=smoothing) for a in aux)
    return float(loss)


@pytest.mark.parametrize("aux_weight, smoothing", [(0.3, 0.0), (1.0, 0.2)])
def test_auxiliary_heads_and_label_smoothing_enter_the_training_loss(digits, aux_weight, smoothing) -> None:
    x, y = digits.train.tensors
    data = TensorDataset(x[:256], y[:256])  # 4 whole batches: every sample counts once
    model = WithAuxHeads()
    expected = _expected_loss(model, data, aux_weight, smoothing)
    config = quiet(lr=0.0, weight_decay=0.0, aux_weight=aux_weight, label_smoothing=smoothing)
    result = train(model, data, digits.val, config)
    assert result.final["train_loss"] == pytest.approx(expected, rel=1e-5)
    without_aux = _expected_loss(model, data, 0.0, smoothing)
    assert expected > without_aux + 0.1  # the auxiliary terms really are there
    # evaluation drops the auxiliary heads and uses plain cross-entropy
    model.eval()
    with torch.no_grad():
        val_loss = F.cross_entropy(model(digits.val.tensors[0]), digits.val.tensors[1])
    assert result.final["val_loss"] == pytest.approx(float(val_loss), rel=1e-5)


def test_torchvision_style_outputs_are_understood() -> None:
    from collections import namedtuple

    Outputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])
    a, b, c = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0)
    logits, aux = split_output(Outputs(a, b, c))
    assert logits is a and aux == (b, c)
    logits, aux = split_output(NetworkOutput(a, (b,)))
    assert logits is a and aux == (b,)
    with pytest.raises(TypeError):
        split_output([a])


# ----------------------------------------------------------------------------- evaluation, EMA, clipping


def test_evaluate_matches_a_direct_computation(digits) -> None:
    model = small_cnn(seed=3).eval()
    x, y = digits.val.tensors
    with torch.no_grad():
        logits = model(x)
    metrics = evaluate(model, digits.val, device="cpu", batch_size=50)
    assert metrics["count"] == 360
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert metrics["top1"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(1).float().mean()
    assert metrics["top5"] == pytest.approx(float(top5))
    assert 0 < metrics["top1"] < metrics["top5"] < 1


def test_top5_with_fewer_than_five_classes_is_top_k(digits) -> None:
    x, y = digits.val.tensors
    keep = y < 3
    data = TensorDataset(x[keep], y[keep])
    metrics = evaluate(small_cnn(classes=3), data, device="cpu")
    assert metrics["top5"] == 1.0 and metrics["top1"] < 1.0


def test_ema_tracks_the_weights_at_its_decay(digits) -> None:
    initial = small_cnn()
    start = {k: v.clone() for k, v in initial.state_dict().items()}
    fast = train(small_cnn(), digits.train, digits.val, quiet(ema_decay=1e-9, lr=0.05))
    for k, v in fast.model.state_dict().items():
        torch.testing.assert_close(fast.ema_model.state_dict()[k], v)
    slow = train(small_cnn(), digits.train, digits.val, quiet(ema_decay=1 - 1e-9, lr=0.05))
    # torch's EMA starts from the weights after the first step and then hardly moves
    ema_moved = float((slow.ema_model[0].weight.detach() - start["0.weight"]).norm())
    model_moved = float((slow.model[0].weight.detach() - start["0.weight"]).norm())
    assert 0 < ema_moved < 0.2 * model_moved
    assert not math.isnan(slow.final["ema_val_top1"]) and slow.final["ema_val_top1"] < slow.final["val_top1"]
    plain = train(small_cnn(), digits.train, digits.val, quiet())
    assert plain.ema_model is None and math.isnan(plain.final["ema_val_top1"])


def test_gradient_clipping_bounds_each_step(digits) -> None:
    model = small_cnn()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    config = quiet(lr=0.1, momentum=0.0, weight_decay=0.0, grad_clip=1e-3, schedule="constant")
    result = train(model, digits.train, digits.val, config)
    after = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    steps = len(digits.train) // 64
    moved = float((after - before).norm())
    assert 0 < moved <= 0.1 * 1e-3 * steps * (1 + 1e-4)


def test_channels_last_trains_like_contiguous_on_cpu(digits) -> None:
    config = quiet(lr=0.05, weight_decay=0.0)
    plain = train(small_cnn(), digits.train, digits.val, config)
    nhwc = train(small_cnn(), digits.train, digits.val, dataclasses.replace(config, channels_last=True))
    assert nhwc.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in plain.model.state_dict().items():
        torch.testing.assert_close(nhwc.model.state_dict()[key], value, rtol=1e-3, atol=1e-3)
    assert nhwc.final["val_top1"] == pytest.approx(plain.final["val_top1"], abs=0.01)


def test_compiled_training_matches_eager_and_saves_plain_weights(digits, tmp_path, monkeypatch) -> None:
    compiled, real_compile = [], torch.compile

    def compile_on_cpu(model: nn.Module) -> nn.Module:
        compiled.append(model)  # AOTAutograd without code generation: the training graphs, cheaply
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_on_cpu)  # what topo.train calls
    config = quiet(epochs=2, lr=0.05, ema_decay=0.9)
    eager = train(small_cnn(), digits.train, digits.val, config)
    assert not compiled
    config = dataclasses.replace(config, compile=True)
    result = train(small_cnn(), digits.train, digits.val, config, run_dir=tmp_path, name="cnn")
    assert compiled == [result.model] and not isinstance(result.model, torch._dynamo.eval_frame.OptimizedModule)
    assert result.final["val_top1"] > 0.8  # it trained: chance is 0.1
    pd.testing.assert_frame_equal(result.history.drop(columns=["epoch_time_s", "train_time_s"]),
                                  eager.history.drop(columns=["epoch_time_s", "train_time_s"]), rtol=1e-4)
    for key, value in eager.model.state_dict().items():  # BatchNorm statistics included
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)

    state = torch.load(tmp_path / "cnn.ckpt", weights_only=True)
    assert not [k for part in ("model", "ema") for k in state[part] if "_orig_mod." in k]
    plain = small_cnn(seed=1)
    plain.load_state_dict(state["model"])  # strict: an uncompiled network takes the weights as they are
    torch.testing.assert_close(plain.state_dict(), result.model.state_dict(), rtol=0, atol=0)
    # the finished compiled run resumes uncompiled to the same result, without training again
    again = train(small_cnn(seed=1), digits.train, digits.val, dataclasses.replace(config, compile=False),
                  run_dir=tmp_path, name="cnn")
    pd.testing.assert_frame_equal(again.history, result.history)
    torch.testing.assert_close(again.ema_model.state_dict(), result.ema_model.state_dict(), rtol=0, atol=0)


def test_every_compiled_training_compiles_past_the_recompile_limit(digits, monkeypatch) -> None:
    """Networks trained one after another (the construction's prefixes) each get compiled code."""
    graphs, real_compile = [], torch.compile

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=recording_backend))
    x, y = digits.train.tensors
    data = TensorDataset(x[:128], y[:128])
    compiled_trainings = 0
    with torch._dynamo.config.patch(recompile_limit=2):  # dynamo's own patch: monkeypatch's undo hides the setting
        for width in (4, 5, 6, 7):  # each width a new graph of the same forward function
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(width * 64, 10))
            before = len(graphs)
            train(model, data, digits.val, quiet(compile=True))
            compiled_trainings += len(graphs) > before
    assert compiled_trainings == 4


# ----------------------------------------------------------------------------- files and errors


def test_run_directory_gets_checkpoint_and_metrics(digits, tmp_path) -> None:
    config = quiet(epochs=2, ema_decay=0.9)
    result = train(small_cnn(), digits.train, digits.val, config, run_dir=tmp_path, name="cnn")
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "tensorboard")  # when it is installed
    assert written == ["cnn.ckpt", "cnn_metrics.csv"]
    csv = pd.read_csv(tmp_path / "cnn_metrics.csv")
    pd.testing.assert_frame_equal(csv, result.history, check_dtype=False)
    expected = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                "ema_val_top1", "ema_val_top5", "epoch_time_s"]
    assert list(csv.columns[: len(expected)]) == expected
    state = torch.load(tmp_path / "cnn.ckpt", weights_only=True)
    assert state["epoch"] == 2 and TrainConfig.from_dict(state["config"]) == config
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "rng"} <= set(state)
    assert result.throughput > 0 and result.train_time_s >= csv["train_time_s"].sum()
    # a finished run resumes to the same result without training again
    again = train(small_cnn(seed=9), digits.train, digits.val, config, run_dir=tmp_path, name="cnn")
    pd.testing.assert_frame_equal(again.history, result.history)
    torch.testing.assert_close(again.model.state_dict(), result.model.state_dict(), rtol=0, atol=0)
    with pytest.raises(UserError, match="lr=0.05, not 0.2"):
        train(small_cnn(), digits.train, digits.val, quiet(epochs=2, ema_decay=0.9, lr=0.2), run_dir=tmp_path, name="cnn")


class TurnsNaN(nn.Module):
    """``small_cnn`` whose training outputs become NaN after ``steps`` training steps."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.net, self.steps, self.calls = small_cnn(), steps, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls > self.steps:
                out = out * float("nan")
        return out


def test_a_diverging_epoch_stops_training_and_keeps_the_last_good_checkpoint(digits, tmp_path) -> None:
    steps = len(digits.train) // 64  # epoch 1 trains cleanly, epoch 2 turns NaN
    with pytest.raises(DivergenceError) as error:
        train(TurnsNaN(steps), digits.train, digits.val, quiet(epochs=3), run_dir=tmp_path, name="cnn")
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, UserError)
    assert message.startswith("cnn diverged in epoch 2 of 3: the training loss is nan and the validation loss is nan")
    assert f"the checkpoint of epoch 1 is kept in {tmp_path / 'cnn.ckpt'}" in message and "grad_clip" in message
    checkpoint = torch.load(tmp_path / "cnn.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    history = pd.read_csv(tmp_path / "cnn_metrics.csv")
    assert list(history["epoch"]) == [1] and history[["train_loss", "val_loss"]].notna().all().all()


def test_a_checkpoint_of_another_network_is_refused_in_one_line(digits, tmp_path) -> None:
    train(small_cnn(), digits.train, digits.val, quiet(), run_dir=tmp_path, name="cnn")
    wider = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))
    with pytest.raises(UserError) as error:
        train(wider, digits.train, digits.val, quiet(), run_dir=tmp_path, name="cnn")
    message = str(error.value)
    assert "\n" not in message and f"checkpoint {tmp_path / 'cnn.ckpt'} holds another network" in message


def test_torchrun_without_a_process_group_is_a_user_error(digits, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="not initialised"):
        train(small_cnn(), digits.train, digits.val, quiet())


def test_batch_size_larger_than_the_data_is_a_user_error(digits) -> None:
    x, y = digits.train.tensors
    with pytest.raises(UserError, match="exceeds the 10 training samples"):
        train(small_cnn(), TensorDataset(x[:10], y[:10]), digits.val, quiet(batch_size=64))


# ----------------------------------------------------------------------------- real training


@pytest.mark.slow
def test_small_googlenet_learns_digits(digits) -> None:
    torch.manual_seed(0)
    model = builders.googlenet(variant="small", in_channels=1, num_classes=10, width_mult=0.25)
    config = quiet(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0.3, label_smoothing=0.1, ema_decay=0.9)
    result = train(model, digits.train, digits.val, config)
    assert result.final["val_top1"] > 0.6  # chance is 0.1
    assert result.final["val_top5"] > 0.9
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]


@pytest.mark.gpu
def test_bf16_channels_last_training_on_cuda(digits) -> None:
    model = builders.googlenet(variant="small", in_channels=1, num_classes=10, width_mult=0.25)
    config = quiet(epochs=2, device="cuda", amp=True, channels_last=True, lr=0.1, ema_decay=0.9)
    result = train(model, digits.train, digits.val, config)
    assert next(result.model.parameters()).is_cuda
    assert result.final["val_top1"] > 0.3
    weight = next(p for p in result.model.parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_sgd_with_momentum_and_decay_on_weights_only() -> None:
    from topo.train.trainer import _TrainingState

    model = builders.googlenet(variant="small", num_classes=10, aux_logits=False, width_mult=0.125, in_channels=1)
    config = TrainConfig(epochs=2, weight_decay=5e-4, momentum=0.9)
    optimizer = _TrainingState.create(model, config, torch.device("cpu"), steps_per_epoch=3).optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    decay, no_decay = optimizer.param_groups
    assert decay["momentum"] == no_decay["momentum"] == 0.9
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) and no_decay["params"]


def test_resume_with_the_gradient_scaler_switched_on_or_off(tmp_path) -> None:
    """A run saved with a disabled scaler (CPU, bf16) resumes with float16 on CUDA (scaler on), and back."""
    from topo.common.writing import atomic_torch_save
    from topo.train.trainer import _TrainingState

    def state(enabled: bool, seed: int = 0) -> _TrainingState:
        created = _TrainingState.create(small_cnn(seed), TrainConfig(epochs=2), torch.device("cpu"), steps_per_epoch=3)
        return dataclasses.replace(created, scaler=torch.amp.GradScaler("cpu", enabled=enabled))

    def saved(training: _TrainingState, name: str) -> dict:
        atomic_torch_save(training.state_dict(), tmp_path / name)
        return torch.load(tmp_path / name, weights_only=True)

    off, on = state(False), state(True)
    on.scaler.load_state_dict({**on.scaler.state_dict(), "scale": 1024.0})  # as after some overflows
    from_off, from_on = saved(off, "off.ckpt"), saved(on, "on.ckpt")
    assert from_off["scaler"] == {}

    resumed = state(True, seed=1)
    resumed.load_state_dict(from_off)  # a fresh scaler, and everything else from the checkpoint
    assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == 65536.0
    torch.testing.assert_close(resumed.model.state_dict(), off.model.state_dict(), rtol=0, atol=0)
    assert resumed.scheduler.state_dict() == off.scheduler.state_dict()
    resumed.load_state_dict(from_on)  # an enabled scaler's state still loads
    assert resumed.scaler.get_scale() == 1024.0

    back = state(False)
    back.load_state_dict(from_on)
    assert not back.scaler.is_enabled() and back.scaler.state_dict() == {}


def test_tensorboard_logs_next_to_the_csv(digits, tmp_path) -> None:
    pytest.importorskip("torch.utils.tensorboard")
    config = TrainConfig(epochs=1, batch_size=128, workers=0, progress=False)
    model = builders.googlenet(variant="small", num_classes=10, aux_logits=False, width_mult=0.125, in_channels=1)
    train(model, Subset(digits.train, range(256)), Subset(digits.val, range(64)), config, run_dir=tmp_path, name="tb")
    assert list((tmp_path / "tensorboard" / "tb").iterdir())
