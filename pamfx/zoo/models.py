"""Small single-task networks for demos, tests and benchmarks (docs/design.md §8).

Every builder takes ``num_outputs`` (logits of one task), the input's channels and side, and a
``width`` multiplier so that the K networks of a merge may differ in width.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pamfx.errors import InputError


def _w(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class LeNet5(nn.Module):
    """LeNet-5: two 5×5 convs with max pooling, then three fully connected layers."""

    def __init__(self, num_outputs: int, in_channels: int = 1, input_size: int = 28, width: float = 1.0):
        super().__init__()
        c1, c2, f1, f2 = _w(6, width), _w(16, width), _w(120, width), _w(84, width)
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((input_size // 2) - 4) // 2
        if side < 1:
            raise InputError(f"LeNet5 needs input_size >= 10, got {input_size}")
        self.fc1 = nn.Linear(c2 * side * side, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class VGGSmall(nn.Module):
    """A VGG-style net: conv-BN-ReLU blocks with max pooling, flatten of a 2×2 map, two FC layers."""

    def __init__(self, num_outputs: int, in_channels: int = 1, input_size: int = 32, width: float = 1.0):
        super().__init__()
        c = _w(16, width)
        cfg = [c, c, "M", 2 * c, 2 * c, "M", 4 * c, "M"]
        layers: list[nn.Module] = []
        cin = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn(cin, int(item)) + [nn.ReLU(inplace=True)]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        hidden = _w(64, width)
        self.classifier = nn.Sequential(
            nn.Linear(cin * 4, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, num_outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(x.view(x.size(0), -1))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1×1 conv + BN downsample shortcut when stride or width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNetSmall(nn.Module):
    """A ResNet-style net: stem, identity blocks, a downsampling block, global average pool, FC."""

    def __init__(self, num_outputs: int, in_channels: int = 1, input_size: int = 32, width: float = 1.0):
        super().__init__()
        c = _w(16, width)
        self.stem = nn.Sequential(*_conv_bn(in_channels, c), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(c, c), BasicBlock(c, c))
        self.layer2 = nn.Sequential(BasicBlock(c, 2 * c, stride=2), BasicBlock(2 * c, 2 * c))
        self.fc = nn.Linear(2 * c, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, 3×3 depthwise, 1×1 linear projection, residual if shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            *_conv_bn(cin, hidden, 1), nn.ReLU6(),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
            *_conv_bn(hidden, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style net: inverted residuals with depthwise convs, Hardswish head conv."""

    def __init__(self, num_outputs: int, in_channels: int = 1, input_size: int = 32, width: float = 1.0):
        super().__init__()
        c = _w(8, width)
        self.stem = nn.Sequential(*_conv_bn(in_channels, c, 3, 2), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(c, c, 1, 2),
            InvertedResidual(c, 2 * c, 2, 3),
            InvertedResidual(2 * c, 2 * c, 1, 3),
        )
        self.last = nn.Sequential(*_conv_bn(2 * c, 8 * c, 1), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * c, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.last(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "lenet5": LeNet5,
    "vgg": VGGSmall,
    "resnet": ResNetSmall,
    "mobilenetv2": MobileNetV2Small,
}


def build_model(name: str, num_outputs: int, in_channels: int = 1, input_size: int = 28, width: float = 1.0) -> nn.Module:
    """Build a zoo model by name (one of `MODELS`)."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_outputs, in_channels=in_channels, input_size=input_size, width=width)
