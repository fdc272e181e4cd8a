"""Wide-ResNet for 32x32 inputs (Zagoruyko & Komodakis 2016), the network of adversarial training
on CIFAR-10: WRN-34-10 in Madry et al.'s MadryLab/cifar10_challenge (model.py: 5 residual units a
stage, filters 16/160/320/640) and in locuslab/robust_overfitting (train_cifar.py,
wideresnet.py). timm's wide_resnet50_2 is the ImageNet bottleneck design, so it is written here.

Pre-activation basic blocks: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut; where a block
changes the width or stride, its shortcut is a 1x1 convolution of the pre-activated input.
depth = 6 n + 4 for n blocks a group; the groups are 16 w, 32 w and 64 w channels wide at
strides 1, 2, 2. Convolutions are initialised He-normal (fan-out), BatchNorm to (1, 0), the
classifier's bias to 0, as robust_overfitting's wideresnet.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from projbench.models.init import init_conv_bn


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                         if in_planes != out_planes or stride != 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, width: int = 10, num_classes: int = 10, dropout: float = 0.0,
                 in_chans: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6 n + 4 with n >= 1 (10, 16, 22, 28, 34, ...); got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be >= 1; got {width}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        groups, in_planes = [], widths[0]
        for out_planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
                      for i in range(n)]
            groups.append(nn.Sequential(*blocks))
            in_planes = out_planes
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.groups(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
