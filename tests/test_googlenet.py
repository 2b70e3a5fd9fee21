"""GoogLeNet variants: torchvision equivalence, forward/backward, aux heads, compile-friendliness."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import builders
from builders import NetworkOutput
from topo.common.errors import SpecError

TORCHVISION_NAMES = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                     "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                     "inception5a", "inception5b", "aux1", "aux2", "avgpool", "dropout", "fc"]  # fmt: skip


@pytest.fixture(scope="module")
def torchvision_model() -> nn.Module:
    """torchvision's GoogLeNet with weights and BN statistics moved away from init, so logits are O(1)."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, transform_input=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("fused", [True, False])
def test_torchvision_state_dict_loads_strictly_and_gives_same_logits(torchvision_model, fused):
    model = builders.googlenet("torchvision", transform_input=True, fused=fused).eval()
    model.load_state_dict(torchvision_model.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = torchvision_model(x), model(x)
    assert ref.abs().mean() > 0.1  # a real comparison, not of two near-zero tensors
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    if not fused:  # same module tree: the state dicts have the same keys and shapes
        ours = {k: v.shape for k, v in model.state_dict().items()}
        assert ours == {k: v.shape for k, v in torchvision_model.state_dict().items()}
        back = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
        back.load_state_dict(model.state_dict(), strict=True)


def test_fused_state_dict_loads_into_torchvision_layout_via_unfused_model(torchvision_model):
    fused = builders.googlenet("torchvision", transform_input=True).eval()
    fused.load_state_dict(torchvision_model.state_dict())
    unfused = builders.googlenet("torchvision", transform_input=True, fused=False).eval()
    unfused.load_state_dict(fused.state_dict(), strict=True)
    torchvision_model.load_state_dict(unfused.state_dict(), strict=True)


def test_module_names_follow_torchvision():
    model = builders.googlenet("torchvision")
    assert [name for name, _ in model.named_children()] == TORCHVISION_NAMES
    assert isinstance(model.spec, builders.NetworkSpec)
    paper = builders.googlenet("paper")
    assert [n for n, _ in paper.named_children()][:7] == ["conv1", "maxpool1", "lrn1", "conv2", "conv3", "lrn2", "maxpool2"]
    assert paper.inception3a.branch3[1].conv.kernel_size == (5, 5)
    assert paper.conv1.conv.bias is not None and paper.conv1.bn is None
    assert paper.maxpool4.kernel_size == 3 and builders.googlenet("torchvision").maxpool4.kernel_size == 2
    assert paper.dropout.p == 0.4 and paper.aux1.dropout.p == 0.7


def _forward_backward(model: nn.Module, x: torch.Tensor, n_aux: int) -> None:
    model.train()
    out = model(x)
    if n_aux:
        assert isinstance(out, NetworkOutput) and len(out.aux_logits) == n_aux
        loss = out.logits.logsumexp(1).mean() + 0.3 * sum(a.logsumexp(1).mean() for a in out.aux_logits)
    else:
        assert isinstance(out, torch.Tensor)
        loss = out.logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (x.shape[0], model.spec.head.num_classes)


@pytest.mark.parametrize(
    "variant, shape, options, n_aux",
    [
        ("paper", (1, 3, 224, 224), dict(width_mult=0.25), 2),  # the paper's aux pooling needs 224x224; no BN
        ("torchvision", (2, 3, 64, 64), dict(width_mult=0.25, transform_input=True), 2),
        ("small", (2, 1, 8, 8), dict(in_channels=1, width_mult=0.25, input_size=8), 0),
        ("small", (2, 3, 32, 32), dict(width_mult=0.25), 0),
        ("small", (2, 3, 32, 32), dict(width_mult=0.25, aux_logits=True, fused=False), 2),
    ],
)
def test_forward_backward_every_variant(variant, shape, options, n_aux):
    torch.manual_seed(0)
    model = builders.googlenet(variant, num_classes=10, **options)
    _forward_backward(model, torch.randn(shape), n_aux)


def test_full_width_small_variant_on_digits_size():
    model = builders.googlenet("small", num_classes=10, in_channels=1, input_size=8)
    _forward_backward(model, torch.randn(2, 1, 8, 8), 0)


def test_init_is_deterministic_under_seed():
    torch.manual_seed(3)
    a = builders.googlenet("small", width_mult=0.25).state_dict()
    torch.manual_seed(3)
    b = builders.googlenet("small", width_mult=0.25).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = a["inception3a.fused1x1.conv.weight"]
    assert 0.005 < w.std() < 0.015  # torchvision's std 0.01 for BatchNorm variants


def test_width_mult_rounds_to_multiples_of_eight():
    assert builders.scale_width(16, 0.25) == 8  # min 8
    assert builders.scale_width(208, 0.25) == 56  # 52 rounds half-up to 56
    assert builders.scale_width(0, 0.25) == 0
    assert builders.scale_width(24, 1.0) == 24
    spec = builders.googlenet_spec("small", width_mult=0.25)
    widths = [w for m in spec.inception_modules() for w in m.widths]
    assert all(w % 8 == 0 and w >= 8 for w in widths)
    assert spec.inception_modules()[0].widths == (16, 24, 32, 8, 8, 8)
    with pytest.raises(SpecError, match="variant 'resnet'"):
        builders.googlenet_spec("resnet")


@pytest.mark.slow
def test_no_graph_breaks_under_dynamo():
    torch._dynamo.reset()
    model = builders.googlenet("small", num_classes=10, width_mult=0.25, aux_logits=True).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


def test_channels_last_and_bf16_autocast_on_a_whole_network():
    torch.manual_seed(0)
    model = builders.googlenet("small", num_classes=10, width_mult=0.25, input_size=8).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
