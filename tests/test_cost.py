"""Cost accounting: Table 1 numbers follow from the widths; FlopCounterMode-based counts."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn

import analysis
import builders
from builders import InceptionSpec


def _inception_weights(c, n1, r3, n3, r5, n5, pp, k=5):
    """Weights of an Inception module, written out by hand (independent of the code under test)."""
    return c * n1 + c * r3 + 9 * r3 * n3 + c * r5 + k * k * r5 * n5 + c * pp


@pytest.fixture(scope="module")
def paper_costs():
    spec = builders.googlenet_spec("paper", aux_logits=False)
    with torch.device("meta"):
        model = builders.build(spec)
    return analysis.cost_table(model, (3, 224, 224))


@pytest.mark.parametrize(
    "name, in_ch, widths, hw, printed_k, printed_m",
    [
        ("inception3a", 192, (64, 96, 128, 16, 32, 32), 28, 159, 128),
        ("inception3b", 256, (128, 128, 192, 32, 96, 64), 28, 380, 304),
        ("inception4e", 528, (256, 160, 320, 32, 128, 128), 14, 840, 170),
        ("inception5b", 832, (384, 192, 384, 48, 128, 128), 7, 1388, 71),
    ],
)
def test_table1_module_costs(paper_costs, name, in_ch, widths, hw, printed_k, printed_m):
    weights = _inception_weights(in_ch, *widths)
    biases = sum(widths)
    row = paper_costs.loc[name]
    assert row["params"] == weights + biases
    assert row["macs"] == weights * hw * hw  # a 1x1 or 'same' conv costs its weights once per output position
    assert row["output"] == (widths[0] + widths[2] + widths[4] + widths[5], hw, hw)
    # these rows of the printed table follow from the widths to within 2 % (K = 1024, M = 10^6)
    assert weights / 1024 == pytest.approx(printed_k, rel=0.02)
    assert weights * hw * hw / 1e6 == pytest.approx(printed_m, rel=0.02)


def test_table1_3a_exact_formula(paper_costs):
    assert _inception_weights(192, 64, 96, 128, 16, 32, 32) == 163_328  # 159.5K
    assert paper_costs.loc["inception3a", "macs"] == 128_049_152


def test_total_row_and_aux_rows():
    model = builders.googlenet("torchvision", width_mult=0.25, num_classes=10)
    table = analysis.cost_table(model, (3, 64, 64))
    assert table.loc["total", "params"] == sum(p.numel() for p in model.parameters())
    executed = table.drop(index=["total"])["macs"].dropna()
    assert executed.sum() == table.loc["total", "macs"] == analysis.count_macs(model, (3, 64, 64))
    assert pd.isna(table.loc["aux1", "macs"]) and table.loc["aux1", "params"] > 0  # not run in eval mode
    assert model.training  # cost_table restores the mode


def test_count_macs_matches_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    assert analysis.count_macs(model, (3, 5, 5)) == 8 * 27 * 25 + 200 * 4
    assert analysis.count_macs(model, (2, 3, 5, 5)) == 2 * (8 * 27 * 25 + 200 * 4)


def test_torchvision_googlenet_is_about_one_and_a_half_gigamacs():
    with torch.device("meta"):
        ours = builders.googlenet("torchvision", aux_logits=False)
    import torchvision

    with torch.device("meta"):
        theirs = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    macs = analysis.count_macs(ours, (3, 224, 224))
    assert macs == analysis.count_macs(theirs, (3, 224, 224))
    assert macs == pytest.approx(1.5e9, rel=0.01)  # torchvision's documented 1.498 GFLOPS (multiply-adds)


def test_inception_macs_and_params():
    spec = InceptionSpec(192, 64, 96, 128, 16, 32, 32)
    assert analysis.inception_params(spec) == 163_328
    assert analysis.inception_macs(spec, 28, 28) == 163_328 * 28 * 28
    k3 = _inception_weights(192, 64, 96, 128, 16, 32, 32, k=3)
    assert analysis.inception_macs(spec, 4, 6, kernel5x5=3) == k3 * 24
    assert analysis.inception_params(spec, bias=True, batchnorm=True) == 163_328 + 3 * 368
    assert analysis.inception_macs(InceptionSpec(16, 0, 0, 0, 0, 0, 8), 3, 3) == 16 * 8 * 9


def test_reduction_factor():
    assert analysis.reduction_factor(480, 128, 32) == pytest.approx(13.04, abs=0.01)
    assert analysis.reduction_factor(192, 32, 16, k=5) == pytest.approx(25 * 192 * 32 / (192 * 16 + 25 * 16 * 32))
    with pytest.raises(ValueError):
        analysis.reduction_factor(0, 1, 1)


def test_googlenet_table_layout():
    text = analysis.googlenet_table("paper")
    lines = text.splitlines()
    header = lines[0]
    for column in ["#1x1", "#3x3 reduce", "#3x3", "#5x5 reduce", "#5x5", "pool proj", "params", "ops"]:
        assert column in header
    row_3a = next(line for line in lines if line.startswith("| inception3a"))
    assert "| 160K" in row_3a and "128M" in row_3a and "159K" in row_3a  # computed (with biases) vs printed
    assert "lrn" not in text
    conv_row = next(line for line in lines if line.startswith("| conv3"))
    assert "112K" in conv_row and "360M" in conv_row  # conv2 (3x3 reduce) merged into the 3x3 row
    small = analysis.googlenet_table("small", width_mult=0.25, input_size=32)
    assert "params (paper)" not in small and "inception5b" in small


def test_paper_comparison_flags_the_rows_that_disagree():
    table = analysis.paper_comparison()
    ratio = table["params / printed"]
    assert ratio["conv1"] > 3  # 7x7x3x64 = 9408 weights, printed 2.7K
    assert ratio["inception4c"] == pytest.approx(509_440 / (463 * 1024))
    assert abs(ratio["inception3a"] - 1) < 0.01
