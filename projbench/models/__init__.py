"""Models that timm / torchvision do not have, one module each."""

from projbench.models.centernet import CenterNet
from projbench.models.harmonic_cnn import HarmonicCNN
from projbench.models.rebias import BagNet18, SimpleConvNet
from projbench.models.transformer_xl import TransformerXL
from projbench.models.wide_resnet import WideResNet

__all__ = ["BagNet18", "CenterNet", "HarmonicCNN", "SimpleConvNet", "TransformerXL", "WideResNet"]
