"""The networks of ReBias (Bahng et al., ICML 2020; github.com/clovaai/rebias), written from its
description and code: a network f to de-bias, a network g biased by design, and the pair.

Every network here returns `(logits, features)`: the HSIC objective compares the features, the
global-average-pooled activations before the classifier (`feature_pos='post'`, the upstream
default in main_biased_mnist.py and main_imagenet.py).

- SimpleConvNet (Biased-MNIST; upstream models/mnist_models.py): four conv-BN-ReLU layers of
  16, 32, 64, 128 channels with "same" padding, global average pooling and a linear classifier.
  f has 7x7 kernels, g 1x1 kernels, so g sees single pixels: colour, not shape.
- BagNet18 (9-class ImageNet; upstream models/imagenet_models.py `bagnet18`): a ResNet-18-like
  network whose convolutions are 1x1 except the 3x3 stem convolution and the first block's
  stride-2 3x3 convolution, all unpadded, so each position of the last feature map sees only a
  small patch of the image (5x5 pixels in this configuration: local texture and colour, not
  shape). Residual branches are cropped to the main branch's size; the stem's BatchNorm has
  momentum 0.001, as upstream.
- TimmFeatures: a timm classifier (ResNet-18 for f on ImageNet) as (logits, pooled features).

`build_network(arch, num_classes, **kwargs)` makes one by name: `simpleconvnet`, `bagnet18`, or
any timm model name.
"""

from __future__ import annotations

from typing import Sequence

import timm
import torch
from torch import nn

from projbench.models.init import init_conv_bn


class SimpleConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, kernel_size: int = 7, channels: Sequence[int] = (16, 32, 64, 128),
                 in_chans: int = 3):
        super().__init__()
        layers, width = [], in_chans
        for out in channels:
            # Conv bias kept (torch's default), as upstream.
            layers += [nn.Conv2d(width, out, kernel_size, padding=kernel_size // 2), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            width = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        init_conv_bn(self)  # BagNet's normal(0, sqrt(2 / (k * k * out))) is the same distribution

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x).mean((2, 3))
        return self.fc(features), features


class BagNetBlock(nn.Module):
    """conv(k x k, stride, no padding)-BN-ReLU, conv 1x1-BN, + the (projected) input cropped to
    the same size, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, kernel_size: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        # An unpadded k x k convolution shrinks the map; keep the top-left part of the shortcut.
        identity = identity[..., :out.shape[-2], :out.shape[-1]]
        return self.relu(out + identity)


class BagNet18(nn.Module):
    """Upstream `bagnet18`: blocks [2, 2, 2, 2] of 64, 128, 256, 512 channels at strides 2, 2, 2, 1;
    only the first block of the first stage has a 3x3 kernel (`kernel3=[1, 0, 0, 0]`)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, widths: Sequence[int] = (64, 128, 256, 512),
                 strides: Sequence[int] = (2, 2, 2, 1), blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, 1, bias=False), nn.Conv2d(64, 64, 3, bias=False),
                                  nn.BatchNorm2d(64, momentum=0.001), nn.ReLU(inplace=True))
        stages, width = [], 64
        for stage, (planes, stride, n) in enumerate(zip(widths, strides, blocks)):
            layers = []
            for i in range(n):
                kernel = 3 if stage == 0 and i == 0 else 1
                layers.append(BagNetBlock(width, planes, stride if i == 0 else 1, kernel))
                width = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(width, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.stages(self.stem(x)).mean((2, 3))
        return self.fc(features), features


class TimmFeatures(nn.Module):
    """A timm classifier returning (logits, its globally pooled pre-logit features)."""

    def __init__(self, arch: str, num_classes: int, **kwargs):
        super().__init__()
        self.net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.net.get_classifier()(features), features


class ReBiasPair(nn.Module):
    """f (the network to de-bias, the one evaluated) and g (biased by design), trained together:
    one forward runs both on the same batch and returns (f_logits, f_features, g_logits,
    g_features). Holding both in one module lets one optimizer, one checkpoint and one DDP
    wrapper cover them."""

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f = f
        self.g = g

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (*self.f(x), *self.g(x))


NETWORKS: dict[str, type[nn.Module]] = {"simpleconvnet": SimpleConvNet, "bagnet18": BagNet18}


def build_network(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """A network returning (logits, features): one of NETWORKS, else a timm model of that name."""
    if arch in NETWORKS:
        return NETWORKS[arch](num_classes=num_classes, **kwargs)
    return TimmFeatures(arch, num_classes, **kwargs)
