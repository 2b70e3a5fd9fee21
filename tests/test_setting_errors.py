"""A setting's error: library code names the setting (the dataclass field), the command line adds its flag."""
from __future__ import annotations

import dataclasses

import pytest

from topo.cli.main import main
from topo.common.errors import SettingError
from topo.construct.config import ConstructConfig
from topo.controls.control import ControlConfig
from topo.run.config import RunConfig
from topo.run.study import StudyConfig
from topo.train.config import TrainConfig

BAD = [
    (ConstructConfig, {"window": 4}), (ConstructConfig, {"init": "magic"}), (ConstructConfig, {"budget_split": "x"}),
    (ConstructConfig, {"decoder": "threshold"}), (ConstructConfig, {"max_units_per_cluster": 0.5}),
    (ConstructConfig, {"epochs_per_layer": -1}), (ConstructConfig, {"budget_macs": -5}),
    (TrainConfig, {"momentum": 1.5}), (TrainConfig, {"weight_decay": -1.0}), (TrainConfig, {"decay_factor": 5.0}),
    (TrainConfig, {"grad_clip": 0.0}), (TrainConfig, {"ema_decay": 2.0}), (TrainConfig, {"schedule": "x"}),
    (RunConfig, {"aux_heads": "all"}), (ControlConfig, {"real_seeds": 1}), (StudyConfig, {"seeds": 0}),
    (StudyConfig, {"margin": -1.0}),
]


@pytest.mark.parametrize("cls, bad", BAD, ids=lambda v: getattr(v, "__name__", None) or ",".join(v))
def test_the_library_names_the_setting_and_no_flag(cls, bad):
    with pytest.raises(SettingError) as caught:
        cls(**bad)
    assert caught.value.setting in {f.name for f in dataclasses.fields(cls)}
    assert caught.value.setting in bad or bad.get("decoder") == "threshold"
    assert "--" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize("argv, flag", [
    (["--momentum", "-1"], "(--momentum)"),
    (["construct", "--decoder", "threshold"], "(--decoder)"),
    (["--decay-factor", "5"], "(--decay-factor)"),
])
def test_the_command_line_adds_the_flag(argv, flag, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(flag), err
    assert not (tmp_path / "out").exists()
