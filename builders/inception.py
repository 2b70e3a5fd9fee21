"""The Inception module (Szegedy et al. 2014, Figure 2b) and its convolution block.

Four branches read the same input and are concatenated along channels:

    branch1: 1x1                      (ch1x1)
    branch2: 1x1 reduce -> 3x3        (ch3x3red -> ch3x3)
    branch3: 1x1 reduce -> k x k      (ch5x5red -> ch5x5; k = 5 in the paper, 3 in torchvision)
    branch4: 3x3 max pool -> 1x1      (pool_proj)

With ``fused=True`` (the default) the three 1x1 convolutions that read the input
(branch1 and the two reductions) run as one convolution, ``fused1x1``, whose
output is split; ``branch2[0]`` and ``branch3[0]`` are then identities. The
result is the same; the parameters are the same, stacked. State dicts load in
either layout (torchvision's included): a load pre-hook converts them.

Max pooling on CPU runs in channels-last layout (:class:`MaxPool2d`), which is
several times faster there than PyTorch's NCHW kernel and gives identical results.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from builders.spec import InceptionSpec


class ConvBlock(nn.Module):
    """Convolution, optional BatchNorm, ReLU (torchvision's ``BasicConv2d`` with ``batchnorm=True, bias=False``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        *,
        batchnorm: bool = True,
        bias: bool = False,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps) if batchnorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools CPU tensors in channels-last layout.

    PyTorch's channels-last max-pool kernels on CPU are several times faster than
    the NCHW ones (forward and backward); converting there and back costs less than
    it saves. The result is identical, in the input's memory format. Under
    ``torch.compile`` the compiler generates its own pooling code, and a
    TorchScript trace may run on any device, so both trace the plain pooling.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and x.is_cpu
            and x.dim() == 4
            and not self.return_indices
            and not x.is_contiguous(memory_format=torch.channels_last)
        ):
            x = super().forward(x.contiguous(memory_format=torch.channels_last))
            return x.contiguous()
        return super().forward(x)


class Inception(nn.Module):
    """An Inception module built from an :class:`InceptionSpec`; a width of 0 drops its branch."""

    def __init__(
        self,
        spec: InceptionSpec,
        *,
        kernel5x5: int = 5,
        batchnorm: bool = True,
        bias: bool = False,
        bn_eps: float = 1e-3,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.fused = fused
        s, c = spec, spec.in_channels

        def conv(cin: int, cout: int, k: int) -> ConvBlock:
            return ConvBlock(cin, cout, k, batchnorm=batchnorm, bias=bias, bn_eps=bn_eps)

        def reduce(width: int) -> nn.Module:
            return nn.Identity() if fused else conv(c, width, 1)

        # (prefix of the unfused 1x1 block, width), in the order the fused output stacks them
        self._inputs_1x1 = (("branch1.", s.ch1x1), ("branch2.0.", s.ch3x3red), ("branch3.0.", s.ch5x5red))
        self._split_sizes = [w for _, w in self._inputs_1x1]
        width_1x1 = sum(self._split_sizes)
        self.fused1x1 = conv(c, width_1x1, 1) if fused and width_1x1 else None
        self.branch1 = conv(c, s.ch1x1, 1) if s.ch1x1 and not fused else None
        self.branch2 = nn.Sequential(reduce(s.ch3x3red), conv(s.ch3x3red, s.ch3x3, 3)) if s.ch3x3 else None
        self.branch3 = nn.Sequential(reduce(s.ch5x5red), conv(s.ch5x5red, s.ch5x5, kernel5x5)) if s.ch5x5 else None
        self.branch4 = (
            nn.Sequential(MaxPool2d(3, stride=1, padding=1, ceil_mode=True), conv(c, s.pool_proj, 1))
            if s.pool_proj
            else None
        )
        # the state-dict keys of one ConvBlock, used to convert between layouts
        bn_keys = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
        self._block_keys = ("conv.weight",) + (("conv.bias",) if bias else ()) + (bn_keys if batchnorm else ())
        self.register_load_state_dict_pre_hook(_convert_layout)

    @property
    def out_channels(self) -> int:
        return self.spec.out_channels

    def input_weights(self) -> dict[int, torch.Tensor | None]:
        """The weights ``(out, in, 1, 1)`` of the three 1x1 convolutions that read the module's input.

        Keyed by branch kernel: 1 is branch1, 3 and 5 the reductions in front of
        the 3x3 and the '5x5' branch; None where the branch is absent. In the
        fused layout they are views into ``fused1x1``'s weight, so writing into
        them (under ``torch.no_grad()``) changes the module.
        """
        if self.fused1x1 is not None:
            pieces = torch.split(self.fused1x1.conv.weight, self._split_sizes, dim=0)
            return {k: p if p.shape[0] else None for k, p in zip((1, 3, 5), pieces)}
        return {
            1: self.branch1.conv.weight if self.branch1 is not None else None,
            3: self.branch2[0].conv.weight if self.branch2 is not None else None,
            5: self.branch3[0].conv.weight if self.branch3 is not None else None,
        }

    def pool_weight(self) -> torch.Tensor | None:
        """The weight ``(pool_proj, in, 1, 1)`` of the pooling branch's 1x1 projection, or None."""
        return self.branch4[1].conv.weight if self.branch4 is not None else None

    def spatial_weight(self, kernel: int) -> torch.Tensor | None:
        """The weight of the k x k convolution of the 3x3 (``kernel=3``) or '5x5' (``kernel=5``) branch, or None."""
        branch = {3: self.branch2, 5: self.branch3}[kernel]
        return branch[1].conv.weight if branch is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x3 = x5 = x
        outputs = []
        if self.fused1x1 is not None:
            x1, x3, x5 = torch.split(self.fused1x1(x), self._split_sizes, dim=1)
            if self.spec.ch1x1:
                # torch.compile lays a concatenation with a slice among its inputs out NCHW, even for
                # channels-last inputs, and the next pooling then runs several times slower; a copy
                # (fused into the concatenation by the compiler) keeps the input's layout
                outputs.append(x1.clone() if torch.compiler.is_compiling() else x1)
        elif self.branch1 is not None:
            outputs.append(self.branch1(x))
        if self.branch2 is not None:
            outputs.append(self.branch2(x3))
        if self.branch3 is not None:
            outputs.append(self.branch3(x5))
        if self.branch4 is not None:
            outputs.append(self.branch4(x))
        return torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]


def _convert_layout(module: Inception, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: rewrite unfused 1x1 keys into ``fused1x1`` keys, or back, to match ``module``."""
    parts = [(prefix + p, w) for p, w in module._inputs_1x1 if w]
    fused_prefix = prefix + "fused1x1."
    if not parts:
        return
    if module.fused:
        sources = [p + k for p, _ in parts for k in module._block_keys]
        if not all(k in state_dict for k in sources):
            return
        for k in module._block_keys:
            tensors = [state_dict.pop(p + k) for p, _ in parts]
            state_dict[fused_prefix + k] = tensors[0] if k.endswith("num_batches_tracked") else torch.cat(tensors)
    else:
        if not all(fused_prefix + k in state_dict for k in module._block_keys):
            return
        for k in module._block_keys:
            tensor = state_dict.pop(fused_prefix + k)
            if k.endswith("num_batches_tracked"):
                pieces = [tensor.clone() for _ in parts]
            else:
                pieces = torch.split(tensor, [w for _, w in parts])
            for (p, _), piece in zip(parts, pieces):
                state_dict[p + k] = piece


def init_weights(module: nn.Module, *, batchnorm: bool) -> None:
    """Initialise every convolution, linear and BatchNorm layer in ``module`` in place.

    With BatchNorm, torchvision's GoogLeNet scheme: weights from a normal with std
    0.01 truncated to [-2, 2]. Without it (the paper's network), such small weights
    make the signal vanish through 22 layers, so weights are He-normal (fan-in,
    ReLU gain). Biases are 0; BatchNorm starts as the identity. Deterministic
    under ``torch.manual_seed``.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if batchnorm:
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
