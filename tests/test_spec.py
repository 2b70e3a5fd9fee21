"""Specs: JSON round trips, validation errors, prefixes, shapes."""
from __future__ import annotations

import dataclasses
import json

import pytest

import builders
from builders import AuxHeadSpec, ConvSpec, HeadSpec, InceptionSpec, LRNSpec, NetworkSpec, PoolSpec
from topo.common.errors import SpecError, UserError

VARIANTS = ["paper", "torchvision", "small"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("aux", [True, False])
def test_shipped_specs_round_trip_json(variant, aux):
    spec = builders.googlenet_spec(variant, num_classes=10, aux_logits=aux)
    text = spec.to_json()
    again = NetworkSpec.from_json(text)
    assert again == spec
    assert again.to_json() == text
    assert NetworkSpec.from_dict(json.loads(text)) == spec
    assert len(spec.aux_heads) == (2 if aux else 0)


def test_layer_specs_round_trip():
    for layer in [
        ConvSpec("c", 8, 3, stride=2, padding=0),
        PoolSpec("p", 3, 2, mode="avg", ceil_mode=False),
        LRNSpec("n", size=3),
        InceptionSpec(16, 8, 4, 8, 0, 0, 4, name="i"),
    ]:
        assert builders.layer_from_dict(json.loads(layer.to_json())) == layer
        assert type(layer).from_json(layer.to_json()) == layer


def _small_spec(**overrides) -> NetworkSpec:
    base = dict(
        stem=[ConvSpec("conv1", 16, 3)],
        stages=[InceptionSpec(16, 8, 4, 8, 2, 4, 4, name="inc1"), PoolSpec("pool1", 3, 2)],
        head=HeadSpec(num_classes=5),
        input_size=8,
    )
    base.update(overrides)
    return NetworkSpec(**base)


def test_inception_out_channels_and_widths():
    spec = InceptionSpec(192, 64, 96, 128, 16, 32, 32, name="inception3a")
    assert spec.out_channels == 256
    assert spec.widths == (64, 96, 128, 16, 32, 32)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(ch1x1=-1), "ch1x1"),
        (dict(pool_proj=-4), "pool_proj"),
        (dict(ch3x3red=0), "ch3x3red"),  # reduction 0 with a 3x3 branch
        (dict(ch5x5=0), "ch5x5red"),  # a dangling reduction
        (dict(ch1x1=0, ch3x3red=0, ch3x3=0, ch5x5red=0, ch5x5=0, pool_proj=0), "all branch widths 0"),
        (dict(in_channels=0), "in_channels"),
        (dict(ch3x3=2.5), "ch3x3"),
    ],
)
def test_invalid_inception_spec_names_field(kwargs, field):
    widths = dict(in_channels=16, ch1x1=8, ch3x3red=4, ch3x3=8, ch5x5red=2, ch5x5=4, pool_proj=4)
    with pytest.raises(SpecError, match=field) as info:
        InceptionSpec(**{**widths, **kwargs})
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert "\n" not in str(info.value)


def test_width_zero_branches_are_valid():
    assert InceptionSpec(16, 0, 4, 8, 0, 0, 0).out_channels == 8
    assert InceptionSpec(16, 0, 0, 0, 0, 0, 4).out_channels == 4


def test_unknown_layer_type_is_rejected():
    data = _small_spec().to_dict()
    data["stages"][1]["type"] = "dilated"
    with pytest.raises(SpecError, match=r"stages\[1\].type = 'dilated'"):
        NetworkSpec.from_dict(data)


@pytest.mark.parametrize(
    "path, key",
    [(("stages", 0), "ch3x3"), ((), "stem"), (("head",), "num_classes"), (("stem", 0), "type")],
)
def test_missing_key_is_rejected(path, key):
    data = _small_spec().to_dict()
    target = data
    for p in path:
        target = target[p]
    if key == "num_classes":
        target.clear()  # head keys all have defaults: an empty head is valid
        assert NetworkSpec.from_dict(data).head == HeadSpec()
        return
    del target[key]
    with pytest.raises(SpecError, match=f"missing key '{key}'"):
        NetworkSpec.from_dict(data)


def test_unknown_key_is_rejected():
    data = _small_spec().to_dict()
    data["stages"][0]["ch7x7"] = 3
    with pytest.raises(SpecError, match="unknown key 'ch7x7'"):
        NetworkSpec.from_dict(data)


def test_channel_mismatch_is_rejected():
    with pytest.raises(SpecError, match=r"in_channels = 17 but the previous layer gives 16"):
        _small_spec(stages=[InceptionSpec(17, 8, 4, 8, 2, 4, 4, name="inc1")])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (lambda: dict(stem=[ConvSpec("conv1", -3, 3)]), "out_channels"),
        (lambda: dict(norm="groupnorm"), "norm"),
        (lambda: dict(kernel5x5=4), "kernel5x5"),
        (lambda: dict(in_channels=1, transform_input=True), "transform_input"),
        (lambda: dict(stem=[ConvSpec("conv1", 16, 3), LRNSpec("lrn1")]), "norm"),
        (lambda: dict(stem=[ConvSpec("conv1", 16, 3), ConvSpec("conv1", 16, 3)]), "used twice"),
        (lambda: dict(stem=[ConvSpec("fc", 16, 3)]), "reserved"),
        (lambda: dict(stem=[ConvSpec("training", 16, 3)]), "clashes"),
        (lambda: dict(stem=[ConvSpec("conv-1", 16, 3)]), "name"),
        (lambda: dict(stem=[ConvSpec("", 16, 3)]), "no name"),
        (lambda: dict(head=HeadSpec(num_classes=0)), "num_classes"),
        (lambda: dict(head=HeadSpec(dropout=1.5)), "dropout"),
        (lambda: dict(stem=[ConvSpec("conv1", 16, 3, stride=4)], input_size=2), "empty output"),
    ],
)
def test_invalid_network_spec_names_field(overrides, field):
    # the bad value may be caught by the layer spec itself or by the network spec
    with pytest.raises(SpecError, match=field) as info:
        _small_spec(**overrides())
    assert "\n" not in str(info.value)


def test_paper_aux_head_needs_large_enough_maps():
    with pytest.raises(SpecError, match="pool_size = 5"):
        builders.googlenet_spec("paper", input_size=64)


def test_every_prefix_of_stages_is_valid_and_builds():
    spec = builders.googlenet_spec("small", width_mult=0.25, aux_logits=True, input_size=8)
    import torch

    for n in range(len(spec.stages) + 1):
        prefix = dataclasses.replace(spec, stages=list(spec.stages[:n]))
        names = {layer.name for layer in prefix.layers}
        assert [a.after for a in prefix.attached_aux_heads()] == [a.after for a in spec.aux_heads if a.after in names]
        if n in (0, 3, len(spec.stages)):  # building every prefix is slow; a few are enough
            model = builders.build(prefix).eval()
            assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 1000)
            assert model.fc.in_features == prefix.out_channels


def test_appending_an_inception_module_checks_channels():
    spec = builders.googlenet_spec("small", width_mult=0.25)
    new = InceptionSpec(spec.out_channels, 16, 8, 16, 8, 8, 8, name="inception6a")
    grown = dataclasses.replace(spec, stages=[*spec.stages, new])
    assert grown.out_channels == 48 and grown.inception_modules()[-1] == new
    with pytest.raises(SpecError, match="in_channels"):
        dataclasses.replace(spec, stages=[*spec.stages, dataclasses.replace(new, in_channels=8)])


def test_feature_shapes_follow_pytorch_pooling():
    spec = builders.googlenet_spec("torchvision")
    shapes = spec.feature_shapes(224)
    assert shapes["conv1"] == (64, 112, 112)
    assert shapes["maxpool1"] == (64, 56, 56)  # ceil mode
    assert shapes["inception3b"] == (480, 28, 28)
    assert shapes["inception4e"] == (832, 14, 14)
    assert shapes["inception5b"] == (1024, 7, 7)
    assert spec.input_shapes(224)["inception3a"] == (192, 28, 28)
    assert spec.output_shape(224) == (1024, 7, 7) == spec.output_shape()
    small = builders.googlenet_spec("small", in_channels=1, input_size=8)
    assert small.output_shape() == (1024, 2, 2)
    assert [m.name for m in small.inception_modules()][::4] == ["inception3a", "inception4c", "inception5b"]


def test_pool_out_size_matches_torch():
    import torch
    import torch.nn.functional as F

    for size in range(1, 20):
        for k, s, p, ceil in [(3, 2, 0, True), (2, 2, 0, True), (3, 2, 1, False), (3, 2, 1, True), (5, 3, 0, False)]:
            if size + 2 * p < k:
                continue
            ref = F.max_pool2d(torch.zeros(1, 1, size, size), k, s, p, ceil_mode=ceil).shape[-1]
            assert PoolSpec("p", k, s, p, ceil_mode=ceil).out_size(size) == ref, (size, k, s, p, ceil)


def test_malformed_json_is_a_spec_error():
    with pytest.raises(SpecError, match="malformed"):
        NetworkSpec.from_json("{not json")
    with pytest.raises(SpecError, match="not a JSON object"):
        NetworkSpec.from_json("[1, 2]")


def test_aux_head_spec_validation():
    with pytest.raises(SpecError, match="pool"):
        AuxHeadSpec("aux1", "inc1", pool="max")
    spec = _small_spec(aux_heads=[AuxHeadSpec("aux1", "inc1", pool_size=2)])
    assert spec.attached_aux_heads() == spec.aux_heads
    assert NetworkSpec.from_json(spec.to_json()) == spec
