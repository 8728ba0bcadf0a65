"""A small FrostNet-style network (Tae et al. 2020, "FrostNet: Towards Quantization-Aware Network
Architecture Search") built from Frost bottlenecks.

Frost bottleneck (as described for FrostNet; kernel k, expansion e, reduction r):

    s = ReLU(BN(conv1x1(x)))                 # squeeze: cin -> cin / r channels
    h = ReLU(BN(conv1x1(cat[x, s])))         # expand the input *and* its squeeze: (cin + cin/r) * e
    h = ReLU(BN(dwconv_kxk(h, stride)))      # depthwise
    y = BN(conv1x1(h))                       # linear projection
    y = x + y   if stride == 1 and cin == cout

It is quantization-friendly by design: no squeeze-excitation, ReLU instead of (hard-)swish, so every op is
a Conv/BN/ReLU/concat/add that integer backends run.

Simplified here: the stage configuration (kernel, width, e, r, stride) is a scaled-down guess in the spirit
of FrostNet-small for 28x28 (Fashion-MNIST) and 32x32 inputs, not the paper's searched ImageNet network
(which has a stride-2 stem, five stages and a 1280-wide head); the head is conv1x1 -> pool -> Linear; the
network was not searched by FrostNet's NAS here.
"""

from __future__ import annotations

import torch
from torch import nn

from .mobilenet import _make_divisible
from .registry import register_model


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class FrostBottleneck(nn.Module):
    """squeeze -> concat with the input -> expand -> depthwise -> project (+ residual); see module doc."""

    def __init__(self, cin: int, cout: int, kernel: int, expand: int, reduce: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2) or kernel % 2 == 0 or expand < 1 or reduce < 1:
            raise ValueError(f"FrostBottleneck: stride 1|2, odd kernel, expand >= 1, reduce >= 1; got "
                             f"stride={stride}, kernel={kernel}, expand={expand}, reduce={reduce}")
        squeezed = _make_divisible(cin / reduce)
        hidden = (cin + squeezed) * expand
        self.use_res = stride == 1 and cin == cout
        self.squeeze = _conv_bn(cin, squeezed, 1)
        self.expand = _conv_bn(cin + squeezed, hidden, 1)
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv_bn(hidden, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(torch.cat([x, self.squeeze(x)], dim=1))))
        return x + y if self.use_res else y


# (kernel, out channels, expansion e, reduction r, stride)
_SMALL = ((3, 16, 1, 2, 1), (5, 24, 3, 4, 2), (3, 24, 3, 4, 1), (5, 40, 3, 4, 2), (5, 40, 3, 4, 1),
          (5, 80, 3, 4, 2), (3, 96, 3, 2, 1))


class FrostNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, width_mult: float = 1.0, head: int = 256,
                 cfg: tuple[tuple[int, int, int, int, int], ...] = _SMALL) -> None:
        super().__init__()
        cin = _make_divisible(16 * width_mult)
        blocks: list[nn.Module] = [_conv_bn(in_chans, cin, 3, 1)]  # stride-1 stem for small images
        for k, c, e, r, s in cfg:
            cout = _make_divisible(c * width_mult)
            blocks.append(FrostBottleneck(cin, cout, k, e, r, s))
            cin = cout
        blocks.append(_conv_bn(cin, head, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model("frostnet_small", default_input=(1, 1, 28, 28))
def frostnet_small(num_classes: int = 10, in_chans: int = 1, width_mult: float = 1.0) -> FrostNet:
    return FrostNet(num_classes, in_chans, width_mult)


@register_model("frostnet_small_cifar", default_input=(1, 3, 32, 32))
def frostnet_small_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0) -> FrostNet:
    return FrostNet(num_classes, in_chans, width_mult)
