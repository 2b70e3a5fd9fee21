"""Widths by training signal (topo.construct.slimming): the cost of a channel, the penalty's subgradient, the cut to
the budget, and slimming inside a run's construction (the data's, and a control's on its null)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import builders
from builders.cost import network_macs
from builders.spec import InceptionSpec
from topo.common.errors import SettingError
from topo.construct.config import ConstructConfig
from topo.construct.slimming import (
    branch_norms,
    channel_costs,
    kept_widths,
    penalty_step,
    scales_of,
    slim_threshold,
    slimmed,
)


def _spec(fused: bool = True):
    spec = builders.googlenet_spec("small", num_classes=10, width_mult=0.25, in_channels=3, input_size=32)
    return dataclasses.replace(spec, fused=fused)


def test_one_more_channel_costs_what_its_convolutions_read_at_each_position():
    """At h x w, a 1x1 output reads every input channel; a k x k output reads k^2 of its reduction's; a reduction
    reads every input channel and is read by k^2 positions of every output of its branch."""
    spec = InceptionSpec(48, 16, 24, 32, 8, 8, 8, name="m")
    hw, pixels = (6, 7), 42
    costs = channel_costs(spec, hw, kernel5x5=5)
    assert costs == {"ch1x1": pixels * 48, "ch3x3red": pixels * (48 + 9 * 32), "ch3x3": pixels * 9 * 24,
                     "ch5x5red": pixels * (48 + 25 * 8), "ch5x5": pixels * 25 * 8, "pool_proj": pixels * 48}
    no_5x5 = InceptionSpec(48, 16, 24, 32, 0, 0, 8, name="m")
    assert "ch5x5" not in channel_costs(no_5x5, hw) and "ch5x5red" not in channel_costs(no_5x5, hw)


@pytest.mark.parametrize("fused", [True, False])
def test_the_penalty_adds_strength_times_cost_times_sign_to_each_scales_gradient(fused):
    """Fused or not, the subgradient reaches the scale of every width with its channel cost (mean 1 over the
    network's widths), and nothing else changes."""
    spec = _spec(fused)
    torch.manual_seed(0)
    model = builders.build(spec)
    with torch.no_grad():  # scales of both signs
        for module in spec.inception_modules():
            for scale in branch_norms(getattr(model, module.name)).values():
                scale.copy_(torch.randn(scale.shape))
    out = model(torch.randn(2, 3, 32, 32))
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    penalty_step(spec, (32, 32), 0.5)(model)
    shapes = spec.input_shapes((32, 32))
    costs = {(m.name, f): c for m in spec.inception_modules() for f, c in channel_costs(m, shapes[m.name][1:]).items()}
    mean = np.mean(list(costs.values()))
    for module in spec.inception_modules():
        first = getattr(model, module.name)
        for field, scale in branch_norms(first).items():
            assert scale.numel() == getattr(module, field)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.grad, before[name])}
    assert changed and all(".bn.weight" in name for name in changed)
    m3a = spec.inception_modules()[0]
    norms = branch_norms(model.inception3a)
    grads = {f: _grad_of(model.inception3a, f, fused) for f in norms}
    olds = {f: _grad_of_before(before, m3a, f, fused) for f in norms}
    for field, scale in norms.items():
        expected = 0.5 * costs[("inception3a", field)] / mean * torch.sign(scale.detach())
        assert torch.allclose(grads[field] - olds[field], expected, rtol=1e-5, atol=1e-7)


def _grad_of(module, field: str, fused: bool) -> torch.Tensor:
    if fused and field in ("ch1x1", "ch3x3red", "ch5x5red"):
        pieces = torch.split(module.fused1x1.bn.weight.grad, module._split_sizes)
        return pieces[("ch1x1", "ch3x3red", "ch5x5red").index(field)]
    return branch_norms(module)[field].grad


def _grad_of_before(before: dict, spec: InceptionSpec, field: str, fused: bool) -> torch.Tensor:
    prefix = spec.name + "."
    if fused and field in ("ch1x1", "ch3x3red", "ch5x5red"):
        sizes = [spec.ch1x1, spec.ch3x3red, spec.ch5x5red]
        return torch.split(before[prefix + "fused1x1.bn.weight"], sizes)[("ch1x1", "ch3x3red", "ch5x5red").index(field)]
    block = {"ch1x1": "branch1", "ch3x3red": "branch2.0", "ch5x5red": "branch3.0", "ch3x3": "branch2.1",
             "ch5x5": "branch3.1", "pool_proj": "branch4.1"}[field]
    return before[f"{prefix}{block}.bn.weight"]


def test_the_cut_keeps_the_most_channels_that_fit_and_a_reduction_for_every_kept_branch():
    spec = _spec()
    torch.manual_seed(1)
    scales = scales_of(builders.build(spec), spec)
    rng = np.random.default_rng(0)
    scales = {key: rng.random(len(value)) for key, value in scales.items()}
    scales[("inception3a", "ch5x5red")][:] = 0.0  # its outputs kept, its reduction all below any cut
    full = network_macs(spec, (32, 32))
    budget = 0.4 * full
    cut = slimmed(spec, scales, budget, (32, 32))
    cost = network_macs(cut, (32, 32))
    assert cost <= budget
    threshold = slim_threshold(spec, scales, budget, (32, 32))
    assert kept_widths(spec, scales, threshold) == cut
    levels = np.unique(np.concatenate(list(scales.values())))
    lower = levels[levels < threshold].max()
    assert network_macs(kept_widths(spec, scales, float(lower)), (32, 32)) > budget  # one level more does not fit
    first = cut.inception_modules()[0]
    assert (first.ch5x5 > 0) == (first.ch5x5red > 0)
    if first.ch5x5:
        assert first.ch5x5red == 1
    for before, after in zip(spec.inception_modules(), cut.inception_modules()):
        assert all(a <= b for a, b in zip(after.widths, before.widths))
    with pytest.raises(Exception, match="below the slimmest network"):
        slimmed(spec, scales, 1000, (32, 32))


def test_slimming_needs_a_budget_and_sensible_numbers():
    with pytest.raises(SettingError, match="budget"):
        ConstructConfig(slim_epochs=1, budget_macs="none")
    for bad in ({"slim_epochs": -1}, {"slim_over": 0.5}, {"slim_penalty": 0.0}):
        with pytest.raises(SettingError):
            ConstructConfig(**bad)


@pytest.mark.slow
def test_a_run_construction_slims_to_its_budget_and_a_control_slims_on_its_null(tmp_path, one_thread, monkeypatch):
    """Slimming after a real construction (patches, two modules): the network fits the budget and its widths are
    the trained scales' (not the clusters'); a strong penalty shrinks the scales more than a weak one (the same
    training otherwise); a control's slimming trains on its null."""
    from topo.controls.nulls import NullDataset
    from topo.run import stages
    from topo.run.config import RunConfig, load_data
    from topo.train.config import TrainConfig

    config = RunConfig(data="patches", construct=ConstructConfig(skeleton="2", seed=2, stats_batches=2, slim_epochs=1),
                       train=TrainConfig(progress=False, workers=0, seed=2, batch_size=64))
    bundle = load_data(config)
    plain = stages.run_construction(config, bundle, dataclasses.replace(config.construct, slim_epochs=0),
                                    tmp_path / "plain")
    seen = []
    real_train = stages.train

    def spy(model, train_data, val_data, cfg, **kw):
        result = real_train(model, train_data, val_data, cfg, **kw)
        scale = float(np.mean([s.mean() for s in scales_of(result.model, _over(plain.spec)).values()]))
        seen.append((type(train_data), kw.get("after_backward") is not None, scale))
        return result

    monkeypatch.setattr(stages, "train", spy)
    slim = stages.run_construction(config, bundle, config.construct, tmp_path / "slim")
    budget = network_macs(dataclasses.replace(stages.reference_spec(config, bundle), input_size=20), (20, 20))
    assert network_macs(slim.spec, (20, 20)) <= budget
    assert [m.widths for m in slim.spec.inception_modules()] != [m.widths for m in plain.spec.inception_modules()]
    stages.run_construction(config, bundle, dataclasses.replace(config.construct, slim_penalty=1.0),
                            tmp_path / "strong")
    (_, _, weak_scale), (_, _, strong_scale) = seen[-2], seen[-1]
    assert strong_scale < weak_scale
    seen.clear()
    stages.run_construction(config, bundle, dataclasses.replace(config.construct, seed=7), tmp_path / "null",
                            null="shuffled")
    assert seen and seen[-1][0] is NullDataset and seen[-1][1]


def _over(spec):
    from topo.construct.budget import scale_network

    return scale_network(spec, 2.0, None)
