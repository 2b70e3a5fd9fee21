"""The construction loop on the embedded digits: budget, determinism, resume, Hebbian initialisation."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import builders
from analysis import count_macs
from builders.spec import InceptionSpec, NetworkSpec, PoolSpec
from topo.construct.config import ConstructConfig, parse_skeleton, skeleton_plan
from topo.construct.loop import BuiltLayers, construct
from topo.data import make_loader
from topo.common.errors import UserError

pytestmark = pytest.mark.slow  # subprocesses or whole constructions: seconds each

SKELETON = "1,pool,1"


@pytest.fixture(scope="module")
def reference(digits):
    return builders.googlenet_spec("small", num_classes=10, width_mult=0.25, in_channels=1, input_size=8)


def _loader(dataset):
    return make_loader(dataset, batch_size=64, train=True, seed=0, workers=0, device="cpu", distributed=False)


def _construct(reference, digits, out_dir=None, on_layer=None, **options):
    config = ConstructConfig(skeleton=SKELETON, stats_batches=4, **options)
    return construct(reference, digits.train, config, input_hw=(8, 8), loader=_loader, out_dir=out_dir,
                     progress=False, on_layer=on_layer)


def test_parse_skeleton():
    assert parse_skeleton("2,pool,5,pool,2") == [2, "pool", 5, "pool", 2]
    assert parse_skeleton(" 1 , POOL , 3 ") == [1, "pool", 3]
    for bad in ("2,pol,5", "0,pool,1", "pool", "", "2,,1"):
        with pytest.raises(UserError, match="skeleton"):
            parse_skeleton(bad)


def test_skeleton_plan_names_modules_like_googlenet(reference):
    plan = skeleton_plan("2,pool,5,pool,2", reference)
    names = [p if isinstance(p, str) else p.name for p in plan]
    assert names == ["inception3a", "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
                     "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b"]
    pools = [p for p in plan if isinstance(p, PoolSpec)]
    ref_pools = [s for s in reference.stages if isinstance(s, PoolSpec)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(q.kernel_size, q.stride) for q in ref_pools]


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="init"):
        ConstructConfig(init="magic")
    with pytest.raises(UserError, match="window"):
        ConstructConfig(window=4)
    with pytest.raises(UserError, match="budget"):
        ConstructConfig(budget_macs=-5)


def test_construct_meets_budget_and_builds(reference, digits, tmp_path):
    result = _construct(reference, digits, out_dir=tmp_path)
    spec = result.spec
    assert isinstance(spec, NetworkSpec)
    modules = spec.inception_modules()
    assert [m.name for m in modules] == ["inception3a", "inception4a"]
    assert [layer.name for layer in spec.stages] == ["inception3a", "maxpool3", "inception4a"]
    # the budget defaults to the reference's cost at the same input size, and the result is within 5%
    ref_spec = NetworkSpec.from_dict({**reference.to_dict(), "stages": [s.to_dict() for s in reference.stages]})
    budget = count_macs(builders.build(ref_spec).eval(), (1, 1, 8, 8))
    total = count_macs(builders.build(spec).eval(), (1, 1, 8, 8))
    assert abs(total / budget - 1) <= 0.05
    # one record per module, with what was measured and decided
    assert len(result.records) == 2
    for rec in result.records:
        assert rec["observations"] > 0
        assert sum(int(v) for v in rec["kernel_counts"].values()) == rec["n_clusters"]
        assert InceptionSpec.from_dict(rec["spec"]).name == rec["name"]
        assert (tmp_path / f"{rec['name']}_stats.pt").is_file()
        clusters = json.loads((tmp_path / f"{rec['name']}_clusters.json").read_text())
        assert sorted(clusters["channel_order"]) == list(range(rec["in_channels"]))
    # the discovered network trains: a step lowers nothing to NaN and gives gradients everywhere
    net = builders.build(spec)
    x, y = next(iter(_loader(digits.train)))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_same_seed_same_topology(reference, digits, one_thread):
    a = _construct(reference, digits, seed=3)
    b = _construct(reference, digits, seed=3)
    assert a.spec.to_json() == b.spec.to_json()


def test_resume_continues_after_the_last_saved_module(reference, digits, tmp_path, monkeypatch, one_thread):
    import topo.construct.loop as construct_module

    full = _construct(reference, digits, out_dir=tmp_path / "full")
    # crash while choosing the second module's widths: only the first module is saved
    real, calls = construct_module.from_clusters, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(construct_module, "from_clusters", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _construct(reference, digits, out_dir=tmp_path / "part")
    saved = json.loads((tmp_path / "part" / "progress.json").read_text())
    assert [r["name"] for r in saved["records"]] == ["inception3a"]
    monkeypatch.setattr(construct_module, "from_clusters", real)
    resumed = _construct(reference, digits, out_dir=tmp_path / "part")
    assert resumed.spec.to_json() == full.spec.to_json()
    assert [r["name"] for r in resumed.records] == ["inception3a", "inception4a"]


def test_hebbian_init_puts_filters_on_cluster_members(reference, digits):
    from topo.construct.hebbian import hebbian_init_

    built = BuiltLayers()
    result = _construct(reference, digits, init="hebbian", on_layer=built)
    name = "inception3a"
    clustering, spec = built.clusterings[name], result.spec
    net = builders.build(spec)
    module = getattr(net, name)
    stats = built.stats[spec.stem[-1].name]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hebbian_init_(module, clustering, stats)
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "Hebbian initialisation changed no weight"
    ones = [c for c in clustering.clusters_ if c.kernel_size == 1]
    if ones and module.spec.ch1x1:
        weight = (module.fused1x1.conv.weight if module.fused1x1 is not None else module.branch1.conv.weight)
        first = weight[0, :, 0, 0].detach().numpy()
        members = {ch for ch, _, _ in ones[0].members}
        outside = [i for i in range(first.size) if i not in members]
        assert np.allclose(first[outside], 0)
        assert np.all(first[sorted(members)] > 0)


def test_record_layer_keeps_what_the_clustering_reads(reference, digits):
    """The layer at its window's reach, the pooled map (1x1 window) at offset (0, 0) only and at the layer's
    anchors; without a pooling branch no pooled map is recorded at all."""
    from topo.construct.loop import record_layer

    spec = dataclasses.replace(reference, stages=reference.stages[:4])  # the stem's first layers
    model = builders.build(spec).eval()
    config = ConstructConfig(skeleton=SKELETON, stats_batches=2, window=3)
    layer, pooled = record_layer(model, spec, _loader(digits.train), config, torch.device("cpu"), False)
    assert layer.max_offset == 2 and pooled.max_offset == 0 and pooled.offsets == [(0, 0)]
    last = spec.layers[-1].name  # logs and errors name what was recorded, not the probe
    assert (layer.name, pooled.name) == (last, f"{last}, 3x3 max-pooled")
    on_null = record_layer(model, spec, _loader(digits.train), config, torch.device("cpu"), False, null="noise")
    assert [s.name for s in on_null] == [f"{last} on the noise null", f"{last} on the noise null, 3x3 max-pooled"]
    assert pooled.positions_used == layer.positions_used and pooled.count == layer.count
    no_pool = dataclasses.replace(config, pool_branch=False)
    layer_only, none = record_layer(model, spec, _loader(digits.train), no_pool, torch.device("cpu"), False)
    assert none is None
    np.testing.assert_allclose(layer_only.cov(), layer.cov(), rtol=1e-12, atol=1e-14)


def _state(construction_dir):
    """The weights a construction left in ``construction_dir`` (its last prefix file)."""
    from topo.construct.files import read_prefix, read_progress
    from topo.construct.files import ConstructionFiles

    files = ConstructionFiles(construction_dir)
    modules = len(read_progress(files.progress)["records"])
    return read_prefix(files.prefix(modules), modules)


def test_carrying_the_prefix_outputs_changes_no_number(reference, digits, tmp_path, monkeypatch, one_thread):
    """Each step runs only the new layers on the carried outputs (`topo.construct.prefix`); running the whole prefix
    again at every step, as without them, gives the same records, clusters and weights, bit for bit. A
    global random state consumed in between changes nothing either: each module's init is seeded."""
    import topo.construct.loop as construct_module

    carried_layers = BuiltLayers()
    carried = _construct(reference, digits, out_dir=tmp_path / "carried", on_layer=carried_layers)
    monkeypatch.setattr(construct_module, "start_carrying", lambda *args, **kwargs: None)
    torch.manual_seed(12345)
    torch.rand(7)
    whole_layers = BuiltLayers()
    whole = _construct(reference, digits, out_dir=tmp_path / "whole", on_layer=whole_layers)
    assert carried.spec.to_json() == whole.spec.to_json()
    assert json.dumps(carried.records) == json.dumps(whole.records)
    for name in ("inception3a", "inception4a"):
        assert ((tmp_path / "carried" / f"{name}_clusters.json").read_text()
                == (tmp_path / "whole" / f"{name}_clusters.json").read_text())
    assert carried_layers.stats.keys() == whole_layers.stats.keys()
    for layer in carried_layers.stats:
        np.testing.assert_array_equal(carried_layers.stats[layer].cov(), whole_layers.stats[layer].cov())
        np.testing.assert_array_equal(carried_layers.stats[layer].thresholds, whole_layers.stats[layer].thresholds)
    a, b = _state(tmp_path / "carried"), _state(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
