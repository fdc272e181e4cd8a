"""SSD300 with a VGG16 backbone, with and without BatchNorm, both built on torchvision's SSD
(`torchvision.models.detection.SSD`: default boxes, box coder, matcher, MultiBox loss with hard
negative mining, NMS), taking [0, 1] images and C + 1 classes (0 is the background).

ssd300_vgg16_bn (the Table 3 SSD here): BatchNorm after every convolution and no L2Norm on conv4_3,
the design of ScratchDet (Zhu et al., "ScratchDet: Training Single-Shot Object Detectors from
Scratch", CVPR 2019; github.com/KimSoybean/ScratchDet), which found that SSD trains from scratch
once BatchNorm is in its backbone and its detection head:
  - the backbone is torchvision's vgg16_bn (conv-BN-ReLU x 13) cut at conv4_3 as SSD300 cuts VGG16
    (pool3 with ceil_mode, pool5 3x3 stride 1), then fc6 (3x3, dilation 6) and fc7 (1x1), each
    conv-BN-ReLU;
  - the four extra blocks are SSD300's (1x1 then 3x3 convolutions), each convolution followed by
    BatchNorm (ScratchDet caffe/ssd_coco.py: use_batchnorm for all newly added layers);
  - each prediction convolution (3x3, no bias) is followed by BatchNorm (ScratchDet
    mmdetection/backbones/ssdbn_head.py);
  - no L2Norm + learned scale on conv4_3 (ScratchDet caffe/ssd_coco.py: normalizations all -1);
  - new layers start as torchvision's SSD and ScratchDet's head start them (Xavier uniform, biases
    0; BatchNorm weight 1, bias 0); inputs are ImageNet-normalised, as torchvision's vgg16_bn
    expects.
  Default boxes, matching and losses are torchvision's SSD300-VGG16 ones. The AdamP paper does not
  say which SSD it trained (its SSD rows are above torchvision's 25.1 AP, and one row trains from
  scratch); this is our reading, not the paper's model.

ssd300_vgg16: torchvision's ssd300_vgg16 unchanged (no normalisation layer; L2Norm and scale 20 on
conv4_3; 0-255 input scaling, as its VGG16 weights expect), for comparison.

With ImageNet weights (a local torchvision state dict; nothing is downloaded) only the last
`trainable_layers` of VGG's 5 stages train, as torchvision does for a pretrained backbone (its
default: 4); the frozen stages' BatchNorm layers become FrozenBatchNorm2d, so they keep their
ImageNet statistics too.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models import vgg
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDScoringHead
from torchvision.ops import FrozenBatchNorm2d

from projbench.errors import ConfigError
from projbench.models.weights import load_exactly, read_state_dict

SIZE = (300, 300)
FEATURE_CHANNELS = [512, 1024, 512, 256, 256, 256]  # conv4_3, fc7, conv8_2, conv9_2, conv10_2, conv11_2
VGG16_BN_FILE = "vgg16_bn-6c64b313.pth"
VGG16_FILE = "vgg16_features-amdegroot-88682ab5.pth"


def ssd300_default_boxes() -> DefaultBoxGenerator:
    """SSD300's default boxes for COCO, as torchvision's ssd300_vgg16 builds them (and the SSD
    paper's COCO setting: scales from 0.07, aspect ratios 2 everywhere and 3 in the middle maps)."""
    return DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                               scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300])


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, **conv_args) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False, **conv_args)
    nn.init.xavier_uniform_(conv.weight)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def vgg_stage_starts(features: nn.Sequential) -> list[int]:
    """Where each VGG stage in `features` starts (at 0, then after each of the first four
    max-pools), then its end: [0, ..., len]. Also for a `features` cut after conv4_3 (3 pools)."""
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    return [0] + [i + 1 for i in pools[:4]] + [len(features)]


def freeze_vgg_stages(features: nn.Sequential, trainable_layers: int) -> None:
    """Freeze all but the last `trainable_layers` of the VGG stages in `features` (torchvision's
    rule for a pretrained SSD backbone), BatchNorm included: it becomes FrozenBatchNorm2d."""
    if not 1 <= trainable_layers <= 5:
        raise ConfigError("task.model.trainable_backbone_layers", f"must be 1 to 5, got {trainable_layers}")
    for i in range(vgg_stage_starts(features)[5 - trainable_layers]):
        module = features[i]
        if isinstance(module, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            frozen.load_state_dict({k: v for k, v in module.state_dict().items() if k != "num_batches_tracked"})
            features[i] = frozen
        module.requires_grad_(False)


def vgg16_features(batch_norm: bool) -> nn.Sequential:
    """torchvision's VGG16 (-BN) `features` alone, initialised as torchvision's VGG initialises them
    (Kaiming normal, fan out; BatchNorm 1 and 0): its classifier (120M parameters) is never built."""
    features = vgg.make_layers(vgg.cfgs["D"], batch_norm=batch_norm)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def load_vgg_features(features: nn.Sequential, path: str | Path, expected: str) -> None:
    """The `features.*` tensors of a local torchvision VGG state dict into `features` (every
    layer must match; the classifier is ignored)."""
    state = {k.removeprefix("features."): v for k, v in read_state_dict(path, expected).items()
             if k.startswith("features.")}
    load_exactly(features, state, path, expected)


class VGG16BNFeatures(nn.Module):
    """[0, 1]-normalised images (B, 3, 300, 300) -> SSD300's six feature maps (38, 19, 10, 5, 3, 1
    pixels square), every convolution followed by BatchNorm (see the module docstring)."""

    def __init__(self, vgg_features: nn.Sequential):
        super().__init__()
        pools = [i for i, m in enumerate(vgg_features) if isinstance(m, nn.MaxPool2d)]
        vgg_features[pools[2]].ceil_mode = True  # 75 -> 38, as SSD300
        self.features = vgg_features[:pools[3]]  # conv1_1 .. conv4_3 (+ BN, ReLU)
        fc = [nn.MaxPool2d(kernel_size=3, stride=1, padding=1),  # SSD's pool5
              *conv_bn_relu(512, 1024, 3, padding=6, dilation=6),  # fc6, atrous
              *conv_bn_relu(1024, 1024, 1)]  # fc7
        blocks = [nn.Sequential(*vgg_features[pools[3]:pools[4]], *fc)]  # pool4, conv5_x, pool5, fc6, fc7
        for in_channels, middle, out_channels, conv_args in ((1024, 256, 512, {"stride": 2, "padding": 1}),
                                                             (512, 128, 256, {"stride": 2, "padding": 1}),
                                                             (256, 128, 256, {}), (256, 128, 256, {})):
            blocks.append(nn.Sequential(*conv_bn_relu(in_channels, middle, 1),
                                        *conv_bn_relu(middle, out_channels, 3, **conv_args)))
        self.extra = nn.ModuleList(blocks)
        self.out_channels = list(FEATURE_CHANNELS)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.features(x)
        maps = [x]
        for block in self.extra:
            x = block(x)
            maps.append(x)
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


def bn_predictors(in_channels: list[int], out_channels: list[int]) -> nn.ModuleList:
    """One 3x3 convolution (no bias) + BatchNorm per feature map."""
    layers = nn.ModuleList()
    for c_in, c_out in zip(in_channels, out_channels):
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        nn.init.xavier_uniform_(conv.weight)
        layers.append(nn.Sequential(conv, nn.BatchNorm2d(c_out)))
    return layers


class BatchNormSSDHead(nn.Module):
    """torchvision's SSDHead with every prediction convolution followed by BatchNorm (ScratchDet's
    SSDBNHead): class logits and box regressions of all default boxes, as SSD expects them."""

    def __init__(self, in_channels: list[int], num_anchors: list[int], num_classes: int):
        super().__init__()
        self.classification_head = SSDScoringHead(
            bn_predictors(in_channels, [a * num_classes for a in num_anchors]), num_classes)
        self.regression_head = SSDScoringHead(bn_predictors(in_channels, [a * 4 for a in num_anchors]), 4)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return {"bbox_regression": self.regression_head(x), "cls_logits": self.classification_head(x)}


def ssd300_vgg16_bn(num_classes: int, pretrained: str | Path | None = None, trainable_layers: int = 4,
                    detections_per_img: int = 200) -> SSD:
    """The BatchNorm SSD300 (module docstring); `num_classes` includes the background.
    `pretrained`: a local torchvision vgg16_bn state dict (vgg16_bn-6c64b313.pth) or None."""
    features = vgg16_features(batch_norm=True)
    if pretrained:
        load_vgg_features(features, pretrained, f"a torchvision vgg16_bn state dict (e.g. {VGG16_BN_FILE})")
        freeze_vgg_stages(features, trainable_layers)
    backbone = VGG16BNFeatures(features)
    boxes = ssd300_default_boxes()
    head = BatchNormSSDHead(backbone.out_channels, boxes.num_anchors_per_location(), num_classes)
    return SSD(backbone, boxes, SIZE, num_classes, head=head, detections_per_img=detections_per_img)


def load_vgg16_backbone(ssd: SSD, path: str | Path, trainable_layers: int) -> None:
    """A local torchvision VGG16 state dict into torchvision's SSD300-VGG16, whose backbone holds
    VGG's layers through conv4_3 in `backbone.features` and pool4 to conv5_3 in
    `backbone.extra[0]` (the rest of extra[0] is SSD's fc6 / fc7). Then the stages freeze as
    freeze_vgg_stages says. SSD's fc6 / fc7, extra layers and heads keep their initialisation,
    as torchvision's ssd300_vgg16 does."""
    features = vgg16_features(batch_norm=False)
    load_vgg_features(features, path, f"a torchvision VGG16 state dict (e.g. {VGG16_FILE})")
    extra = ssd.backbone.extra[0]
    tail = [m for m in extra if not isinstance(m, nn.Sequential)]  # pool4 .. conv5_3-ReLU; the Sequential is fc
    layers = list(ssd.backbone.features) + tail
    with torch.no_grad():
        for mine, theirs in zip(layers, features):
            for name, tensor in theirs.named_parameters():
                getattr(mine, name).copy_(tensor)
    freeze_vgg_stages(ssd.backbone.features, trainable_layers)


def ssd300_vgg16_plain(num_classes: int, pretrained: str | Path | None = None, trainable_layers: int = 4,
                       detections_per_img: int = 200) -> SSD:
    """torchvision's ssd300_vgg16, from scratch or with a local VGG16 state dict."""
    ssd = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes,
                       detections_per_img=detections_per_img)
    if pretrained:
        load_vgg16_backbone(ssd, pretrained, trainable_layers)
    return ssd


class SSDVariant(NamedTuple):
    build: Callable[..., SSD]
    min_batch: int  # images per device in training: BatchNorm needs 2 at SSD300's 1 x 1 feature map


SSD_VARIANTS = {"vgg16_bn": SSDVariant(ssd300_vgg16_bn, min_batch=2),
                "vgg16": SSDVariant(ssd300_vgg16_plain, min_batch=1)}
