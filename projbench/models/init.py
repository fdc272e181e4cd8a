"""Weight initialisation the CNNs here share."""

from __future__ import annotations

from torch import nn


def init_conv_bn(module: nn.Module) -> None:
    """He-normal (fan-out, ReLU) convolution weights and BatchNorm at weight 1, bias 0, over every
    submodule: how torchvision's ResNet and the upstream networks built here (ReBias's SimpleConvNet
    and BagNet18, robust_overfitting's Wide-ResNet) initialise. Biases of convolutions are left as
    they are."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
