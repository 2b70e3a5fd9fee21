"""Training starts from the weights the construction gave the discovered network."""
from __future__ import annotations

import json

import pytest
import torch

from topo.construct.config import ConstructConfig
from topo.run.config import RunConfig, load_data
from topo.run.stages import construct_stage, construction_state, initial_model, train_stage
from topo.run.rundir import RunDir
from topo.train.config import TrainConfig

pytestmark = pytest.mark.slow  # a construction and a short training: seconds


def _config(**options) -> RunConfig:
    construct = ConstructConfig(skeleton="1", init="hebbian", budget_macs="none", stats_batches=2, positions=None)
    train = TrainConfig(epochs=1, batch_size=64, device="cpu", workers=0, progress=False)
    return RunConfig(data="digits", controls=False, construct=construct, train=train, **options)


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    config = _config()
    run = RunDir(tmp_path_factory.mktemp("run"))
    run.write_config(config.to_dict())
    bundle = load_data(config)
    spec = construct_stage(config, bundle, run)
    return config, run, bundle, spec


def test_discovered_network_starts_from_the_construction(constructed, one_thread):
    config, run, _, spec = constructed
    state = construction_state(run)
    model = initial_model("discovered", spec, config, run)
    own = model.state_dict()
    module = spec.inception_modules()[0].name
    hebbian = [k for k in state if k.startswith(module) and k.endswith("weight")]
    assert hebbian and all(torch.equal(own[k], state[k]) for k in state if not k.startswith("fc."))
    fresh = initial_model("discovered", spec, RunConfig(**{**config.__dict__, "fresh_init": True}), run)
    assert any(not torch.equal(fresh.state_dict()[k], state[k]) for k in hebbian)
    reference = initial_model("reference", spec, config, run)  # the other arms never take them
    assert any(not torch.equal(reference.state_dict()[k], state[k]) for k in hebbian)


def test_training_begins_at_those_weights(constructed, one_thread, monkeypatch):
    """What train() receives as its model is the construction's network, before its first step."""
    config, run, bundle, spec = constructed
    state = construction_state(run)
    seen = {}
    import topo.run.stages as pipeline

    real_train = pipeline.train

    def spy(model, *args, **kwargs):
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train", spy)
    row = train_stage("discovered", spec, config, bundle, run)
    assert row["network"] == "discovered"
    assert all(torch.equal(seen[k], state[k]) for k in state if not k.startswith("fc."))
    assert json.loads(run.state_path.read_text())  # the stage was recorded
