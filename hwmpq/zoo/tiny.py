"""Tiny models sized for tests (milliseconds to build, profile and train)."""

from __future__ import annotations

from torch import nn

from .registry import register_model


class TinyResNet(nn.Module):
    """conv -> residual block -> depthwise + pointwise -> linear: every layer kind and a residual add."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.dw = nn.Conv2d(width, width, 3, 2, 1, groups=width, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU6()
        self.pw = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.relu4 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(x + self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.dw(x)))
        x = self.relu4(self.bn4(self.pw(x)))
        return self.fc(self.flatten(self.pool(x)))


@register_model("test_tiny", default_input=(1, 1, 8, 8))
def test_tiny(num_classes: int = 10, in_chans: int = 1) -> TinyResNet:
    return TinyResNet(num_classes, in_chans, width=8)


@register_model("test_small", default_input=(1, 1, 28, 28))
def test_small(num_classes: int = 10, in_chans: int = 1) -> TinyResNet:
    return TinyResNet(num_classes, in_chans, width=16)
