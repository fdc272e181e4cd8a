"""Models that timm / torchvision do not have, one module each."""

from projbench.models.centernet import CenterNet
from projbench.models.harmonic_cnn import HarmonicCNN
from projbench.models.transformer_xl import TransformerXL
from projbench.models.wide_resnet import WideResNet

__all__ = ["CenterNet", "HarmonicCNN", "TransformerXL", "WideResNet"]
