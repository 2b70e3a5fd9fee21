"""The Inception module: fused and unfused layouts agree, state dicts convert, width-0 branches."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from builders import Inception, InceptionSpec

SPEC = InceptionSpec(12, 8, 6, 10, 4, 6, 5, name="inc")


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Weights and BatchNorm statistics far from their initial values, so a mismatch would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                low = 0.5 if name.endswith("running_var") else -1.0
                t.copy_(torch.rand(t.shape, generator=g) * (1.5 - low) + low)


def _pair(spec: InceptionSpec, **options) -> tuple[Inception, Inception]:
    unfused = Inception(spec, fused=False, **options)
    _randomise(unfused)
    fused = Inception(spec, fused=True, **options)
    fused.load_state_dict(unfused.state_dict(), strict=True)
    return unfused, fused


@pytest.mark.parametrize("batchnorm, bias", [(True, False), (False, True)])
@pytest.mark.parametrize("training", [False, True])
def test_fused_equals_unfused(batchnorm, bias, training):
    unfused, fused = _pair(SPEC, batchnorm=batchnorm, bias=bias, kernel5x5=5)
    unfused.train(training), fused.train(training)
    x = torch.randn(2, 12, 7, 9, requires_grad=True)
    out_u, out_f = unfused(x), fused(x)
    assert out_u.shape == (2, SPEC.out_channels, 7, 9)
    torch.testing.assert_close(out_f, out_u, rtol=1e-5, atol=1e-5)
    # gradients agree as well (and in training mode BN running statistics moved alike: compared below)
    gu = torch.autograd.grad(out_u.square().sum(), x)[0]
    gf = torch.autograd.grad(out_f.square().sum(), x)[0]
    torch.testing.assert_close(gf, gu, rtol=1e-4, atol=1e-4)
    back = Inception(SPEC, fused=False, batchnorm=batchnorm, bias=bias)
    back.load_state_dict(fused.state_dict(), strict=True)  # fused -> unfused
    for key, value in unfused.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)


def test_layouts_have_the_expected_keys():
    unfused, fused = _pair(SPEC)
    u_keys, f_keys = set(unfused.state_dict()), set(fused.state_dict())
    assert {"branch1.conv.weight", "branch2.0.conv.weight", "branch3.0.bn.running_var"} <= u_keys
    assert not any(k.startswith("fused1x1") for k in u_keys)
    assert fused.state_dict()["fused1x1.conv.weight"].shape == (8 + 6 + 4, 12, 1, 1)
    assert not any(k.startswith(("branch1.", "branch2.0.", "branch3.0.")) for k in f_keys)
    assert u_keys - f_keys and {k for k in u_keys if "1." in k[:10]} & f_keys  # 3x3 / 5x5 / pool keys shared


@pytest.mark.parametrize(
    "widths",
    [
        (0, 6, 10, 4, 6, 5),  # no 1x1 branch
        (8, 0, 0, 4, 6, 5),  # no 3x3 branch
        (8, 6, 10, 0, 0, 0),  # no 5x5 branch and no pool branch
        (0, 0, 0, 0, 0, 5),  # pool branch only: no fused 1x1 at all
        (8, 0, 0, 0, 0, 0),  # 1x1 only
    ],
)
def test_width_zero_branches(widths):
    spec = InceptionSpec(12, *widths)
    unfused, fused = _pair(spec)
    unfused.eval(), fused.eval()
    x = torch.randn(1, 12, 5, 5)
    out = fused(x)
    assert out.shape == (1, spec.out_channels, 5, 5)
    torch.testing.assert_close(out, unfused(x), rtol=1e-5, atol=1e-5)
    params = sum(p.numel() for p in fused.parameters())
    assert params == sum(p.numel() for p in unfused.parameters())


def test_kernel5x5_sets_the_branch3_kernel():
    assert Inception(SPEC, kernel5x5=5).branch3[1].conv.kernel_size == (5, 5)
    assert Inception(SPEC, kernel5x5=3).branch3[1].conv.kernel_size == (3, 3)
    assert Inception(SPEC, batchnorm=False).branch2[1].bn is None


def test_channels_last_and_bf16_autocast():
    _, fused = _pair(SPEC)
    fused.eval()
    x = torch.randn(2, 12, 6, 6, generator=torch.Generator().manual_seed(0))
    ref = fused(x)
    cl = fused.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused(x)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: agreement to a few percent of the output's scale
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 0), (2, 2, 0)])
def test_channels_last_max_pool_equals_torch(kernel, stride, padding):
    from builders.inception import MaxPool2d

    x = torch.relu(torch.randn(2, 5, 9, 9)).requires_grad_()
    ours = MaxPool2d(kernel, stride, padding, ceil_mode=True)(x)
    ref = nn.MaxPool2d(kernel, stride, padding, ceil_mode=True)(x)
    assert torch.equal(ours, ref) and ours.is_contiguous()
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_compiled_max_pool_leaves_the_layout_to_the_compiler():
    """The channels-last round trip speeds up eager CPU pooling; traced, it only adds copies."""
    from builders.inception import MaxPool2d

    graphs = []

    def record_graph(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return graph.forward

    pool = MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
    x = torch.randn(2, 5, 9, 9)
    torch._dynamo.reset()
    try:
        out = torch.compile(pool, backend=record_graph)(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, nn.functional.max_pool2d(x, 3, 1, 1, ceil_mode=True))
    [graph] = graphs
    assert "contiguous" not in graph.code and "max_pool2d" in graph.code


@pytest.mark.slow
def test_compiled_channels_last_module_keeps_its_concatenation_channels_last():
    """Inductor lays out a concatenation with a slice among its inputs NCHW (the fused 1x1 output's
    branch1 part), which made the next pooling several times slower; the module must avoid it."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    spec = InceptionSpec(16, 8, 8, 16, 8, 8, 8)
    module = nn.Sequential(Inception(spec), Inception(InceptionSpec(spec.out_channels, 8, 8, 8, 8, 8, 8))).eval()
    module = module.to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out, code = run_and_get_code(torch.compile(module), x)
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(out, module(x), rtol=1e-4, atol=1e-5)
    nchw = f"({spec.out_channels * 36}, 36, 6, 1)"  # the first module's output, NCHW-contiguous
    assert "6, 6)" in "".join(code) and nchw not in "".join(code)
