"""ResNet-20 (CIFAR-style, He et al. 2016) and ResNet-18 (ImageNet layout, with a small-input stem option)."""

from __future__ import annotations

from torch import nn

from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths, blocks, num_classes: int, in_chans: int, imagenet_stem: bool) -> None:
        super().__init__()
        if imagenet_stem:
            stem = [nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
                    nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        self.stem = nn.Sequential(*stem)
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(*[BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1)
                                          for j in range(n)]))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


@register_model("resnet20", default_input=(1, 3, 32, 32))
def resnet20(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return ResNet((16, 32, 64), (3, 3, 3), num_classes, in_chans, imagenet_stem=False)


@register_model("resnet18", default_input=(1, 3, 224, 224))
def resnet18(num_classes: int = 1000, in_chans: int = 3, small_input: bool = False) -> ResNet:
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_chans, imagenet_stem=not small_input)
