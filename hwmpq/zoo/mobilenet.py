"""MobileNetV2 (Sandler et al. 2018): inverted residuals with depthwise convolutions.

``cifar_stem`` (default for inputs <= 64 px) keeps the first strides at 1, as CIFAR ports do."""

from __future__ import annotations

from torch import nn

from .registry import register_model


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_bn_act(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [conv_bn_act(cin, hidden, 1, 1)] if expand != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expand t, channels c, repeats n, stride s) from the paper's Table 2
_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, width_mult: float, cifar_stem: bool) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers = [conv_bn_act(in_chans, cin, 3, 1 if cifar_stem else 2)]
        for i, (t, c, n, s) in enumerate(_CFG):
            cout = _make_divisible(c * width_mult)
            if cifar_stem and i == 1:
                s = 1
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
        layers.append(conv_bn_act(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))


@register_model("mobilenetv2", default_input=(1, 3, 32, 32))
def mobilenetv2(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                cifar_stem: bool = True) -> MobileNetV2:
    return MobileNetV2(num_classes, in_chans, width_mult, cifar_stem)


@register_model("mobilenetv2_050", default_input=(1, 3, 32, 32))
def mobilenetv2_050(num_classes: int = 10, in_chans: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes, in_chans, 0.5, cifar_stem=True)
