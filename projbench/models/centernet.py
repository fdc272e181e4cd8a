"""CenterNet ("Objects as Points", Zhou, Wang and Krähenbühl, 2019), ResNet variant: the detector
of the AdamP paper's COCO experiments (Table 3).

An object is the peak of a per-class heatmap at its box centre, with its size and the sub-pixel
offset of the centre regressed at that peak:

    images (B, 3, H, W), H and W multiples of 32
      -> a torchvision ResNet without its pooling and fc (stride 32)
      -> 3 x [conv3x3-BN-ReLU, ConvTranspose2d 4x4 stride 2-BN-ReLU] (stride 4)
      -> three conv3x3-ReLU-conv1x1 heads: heatmap logits (C), size (w, h), offset (dx, dy)

The up-sampling path is the authors' "resdcn" network (github.com/xingyizhou/CenterNet,
src/lib/models/networks/resnet_dcn.py), whose ResNet-18 is the 28.1 AP of their paper and model
zoo: each stage's 3x3 convolution is a modulated deformable convolution (DCNv2: a plain 3x3
convolution predicts 2 x 9 sampling offsets and 9 sigmoid-ed modulation masks, both starting at
zero, so a fresh layer samples the plain 3x3 grid at half weight), here
torchvision.ops.DeformConv2d. `deformable=False` puts a plain 3x3 convolution there instead (the
alternative left commented out in that file). Either is followed by BatchNorm, so its weight is
scale-invariant; the offset / mask convolution is not.

As the authors' code (resnet_dcn.py, ctdet.py, losses.py, decode.py): bilinear initialisation of
the transposed convolutions, heatmap bias -2.19 (a prior of 0.1), Gaussian targets of CornerNet's
radius, a penalty-reduced focal loss plus L1 on size and offset at the centres, 3x3 max-pool peak
decoding, and its flip test (detectors/ctdet.py). Sizes and offsets are in output-stride units;
boxes in and out are xyxy in input pixels.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from projbench.errors import ConfigError
from projbench.models.weights import load_exactly, read_state_dict

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HEAD_OUTPUTS = ("heatmap", "size", "offset")


def load_resnet_weights(resnet: nn.Module, path: str | Path) -> None:
    """A local torchvision ResNet state dict into `resnet`; its fc weights are ignored."""
    expected = f"a torchvision {type(resnet).__name__} state dict (e.g. resnet18-f37072fd.pth)"
    state = {k: v for k, v in read_state_dict(path, expected).items() if not k.startswith("fc.")}
    backbone = nn.Sequential(OrderedDict((name, m) for name, m in resnet.named_children() if name != "fc"))
    load_exactly(backbone, state, path, expected)


def bilinear_(up: nn.ConvTranspose2d) -> None:
    """The CenterNet code's fill_up_weights: a bilinear upsampling kernel in output channel 0 of
    every input channel; the other output channels keep their random initialisation."""
    size = up.weight.shape[-1]
    f = math.ceil(size / 2)
    c = (2 * f - 1 - f % 2) / (2 * f)
    line = 1 - (torch.arange(size) / f - c).abs()
    with torch.no_grad():
        up.weight[:, 0] = line[:, None] * line[None, :]


class ModulatedDeformConv(nn.Module):
    """A 3x3 modulated deformable convolution (DCNv2) as resnet_dcn.py's DCN: a plain convolution
    of the input predicts the sampling offsets (2 per kernel tap) and modulation masks (1 per tap,
    through a sigmoid). As there, that convolution starts at zero (offsets 0, masks 0.5), the
    deformable weight is uniform in +-1/sqrt(fan_in) (DeformConv2d's default is the same bound) and
    its bias starts at 0."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        taps = kernel_size * kernel_size
        padding = kernel_size // 2
        self.offset_mask = nn.Conv2d(in_channels, 3 * taps, kernel_size, padding=padding)
        self.conv = DeformConv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.taps = taps
        with torch.no_grad():
            self.offset_mask.weight.zero_()
            self.offset_mask.bias.zero_()
            self.conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = self.offset_mask(x).split([2 * self.taps, self.taps], dim=1)
        return self.conv(x, offset, mask.sigmoid())


def upsample_stage(in_channels: int, out_channels: int, deformable: bool = True) -> nn.Sequential:
    """[3x3 (deformable) conv-BN-ReLU, ConvTranspose2d 4x4 stride 2 (bilinear start)-BN-ReLU]."""
    conv = (ModulatedDeformConv(in_channels, out_channels) if deformable
            else nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))
    up = nn.ConvTranspose2d(out_channels, out_channels, 4, stride=2, padding=1, bias=False)
    bilinear_(up)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
                         up, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def head(in_channels: int, hidden: int, out_channels: int, bias: float | None) -> nn.Sequential:
    """conv3x3-ReLU-conv1x1. `bias` sets the last bias (the heatmap's prior); without it, as the
    reference's regression heads, all weights are N(0, 0.001) and the biases 0."""
    layers = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                           nn.Conv2d(hidden, out_channels, 1))
    with torch.no_grad():
        if bias is not None:
            layers[-1].bias.fill_(bias)
        else:
            for conv in (layers[0], layers[2]):
                nn.init.normal_(conv.weight, std=0.001)
                nn.init.zeros_(conv.bias)
    return layers


class CenterNet(nn.Module):
    """Normalised images (B, 3, H, W) -> {"heatmap": logits (B, C, H/4, W/4), "size", "offset":
    (B, 2, H/4, W/4)}."""

    stride: int = 4  # output stride: the backbone's 32 undone by three x2 upsamplings

    def __init__(self, num_classes: int, backbone: str = "resnet18", pretrained: str | None = None,
                 head_channels: int = 64, deconv_channels: tuple[int, ...] = (256, 128, 64),
                 deformable: bool = True):
        super().__init__()
        if backbone not in RESNETS:
            raise ConfigError("task.model.backbone", f"expected one of {', '.join(RESNETS)}, got {backbone!r}")
        if len(deconv_channels) != 3:
            raise ConfigError("task.model.deconv_channels", f"expected 3 upsampling stages (stride 32 -> "
                                                            f"{self.stride}), got {list(deconv_channels)}")
        resnet = getattr(torchvision.models, backbone)(weights=None)
        if pretrained:
            load_resnet_weights(resnet, pretrained)
        self.backbone = nn.Sequential(OrderedDict((name, module) for name, module in resnet.named_children()
                                                  if name not in ("avgpool", "fc")))
        widths = [resnet.fc.in_features, *deconv_channels]
        self.upsample = nn.Sequential(*(upsample_stage(widths[i], widths[i + 1], deformable)
                                        for i in range(len(deconv_channels))))
        self.heads = nn.ModuleDict({
            "heatmap": head(widths[-1], head_channels, num_classes, bias=-2.19),
            "size": head(widths[-1], head_channels, 2, bias=None),
            "offset": head(widths[-1], head_channels, 2, bias=None)})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.upsample(self.backbone(images))
        return {name: self.heads[name](features) for name in HEAD_OUTPUTS}


# -- training targets -----------------------------------------------------------------------------
def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CornerNet's radius (as in the CenterNet code, quirks included: each root is halved rather
    than divided by 2a): how far a corner may move with the box still overlapping by `min_overlap`."""
    b1, c1 = height + width, width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def draw_gaussian(heatmap: Tensor, x: int, y: int, radius: int) -> None:
    """max() a Gaussian of sigma (2 radius + 1) / 6, 1 at (x, y), into `heatmap` (h, w), in place."""
    sigma = (2 * radius + 1) / 6
    offsets = torch.arange(-radius, radius + 1, dtype=heatmap.dtype)
    gaussian = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2))
    gaussian[gaussian < torch.finfo(gaussian.dtype).eps] = 0
    h, w = heatmap.shape
    top, bottom, left, right = min(y, radius), min(h - y, radius + 1), min(x, radius), min(w - x, radius + 1)
    window = heatmap[y - top:y + bottom, x - left:x + right]
    torch.maximum(window, gaussian[radius - top:radius + bottom, radius - left:radius + right], out=window)


def centernet_targets(boxes: Tensor, labels: Tensor, num_classes: int, out_size: int | tuple[int, int],
                      stride: int = 4, max_objects: int = 128) -> dict[str, Tensor]:
    """One image's training targets. `boxes` (N, 4) xyxy in input pixels, `labels` (N,) in 0..C-1;
    `out_size` the output map's (h, w) (an int: square). Boxes are mapped to the output map and
    clipped to it; those left without width or height are skipped, and past `max_objects` kept
    ones the rest are dropped (heatmap included), as the reference. Returns heatmap (C, h, w),
    and padded to `max_objects`: index (y * w + x of the centre cell), size (w, h) and offset
    (centre - cell) in output units, mask (True for a real object)."""
    h, w = (out_size, out_size) if isinstance(out_size, int) else out_size
    boxes = boxes.detach().float().cpu().reshape(-1, 4) / stride
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    sizes = boxes[:, 2:] - boxes[:, :2]
    keep = (sizes > 0).all(dim=1).nonzero().flatten()[:max_objects]
    boxes, sizes, labels = boxes[keep], sizes[keep], labels.detach().cpu().long()[keep]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    cells = centres.long()  # centres are >= 0: truncation is floor
    heatmap = torch.zeros(num_classes, h, w)
    for (bw, bh), (x, y), label in zip(sizes.tolist(), cells.tolist(), labels.tolist()):
        draw_gaussian(heatmap[label], x, y, max(0, int(gaussian_radius(math.ceil(bh), math.ceil(bw)))))
    n = len(keep)
    index = torch.zeros(max_objects, dtype=torch.long)
    size, offset = torch.zeros(max_objects, 2), torch.zeros(max_objects, 2)
    mask = torch.zeros(max_objects, dtype=torch.bool)
    index[:n], size[:n], offset[:n], mask[:n] = cells[:, 1] * w + cells[:, 0], sizes, centres - cells, True
    return {"heatmap": heatmap, "index": index, "size": size, "offset": offset, "mask": mask}


def stack_targets(targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-image targets of `centernet_targets` -> one dict, each value stacked along a batch dim."""
    return {key: torch.stack([t[key] for t in targets]) for key in targets[0]}


# -- loss and decoding --------------------------------------------------------------------------
def gather_at(feature: Tensor, index: Tensor) -> Tensor:
    """(B, C, H, W) feature at the flat positions `index` (B, K) -> (B, K, C)."""
    flat = feature.flatten(2)
    return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)


def focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Penalty-reduced pixel-wise focal loss (alpha 2, beta 4) summed, over max(objects, 1)."""
    pred = logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1)
    pos = torch.log(pred) * (1 - pred) ** 2
    neg = torch.log(1 - pred) * pred ** 2 * (1 - target) ** 4
    return -torch.where(positive, pos, neg).sum() / positive.sum().clamp(min=1)


def masked_l1(output: Tensor, index: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L1 between `output` at the centres and `target`, over the real objects' coordinates (the
    reference's RegL1Loss: summed, divided by 2 x objects + 1e-4)."""
    weight = mask[..., None].expand_as(target).float()
    return ((gather_at(output.float(), index) - target).abs() * weight).sum() / (weight.sum() + 1e-4)


def centernet_loss(outputs: dict[str, Tensor], targets: dict[str, Tensor], size_weight: float = 0.1,
                   offset_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Focal heatmap loss + size_weight x L1 size + offset_weight x L1 offset, in float32, with no
    host sync. `targets`: `stack_targets` of `centernet_targets`. Returns (total, the three terms)."""
    parts = {"heatmap": focal_loss(outputs["heatmap"], targets["heatmap"]),
             "size": masked_l1(outputs["size"], targets["index"], targets["size"], targets["mask"]),
             "offset": masked_l1(outputs["offset"], targets["index"], targets["offset"], targets["mask"])}
    total = parts["heatmap"] + size_weight * parts["size"] + offset_weight * parts["offset"]
    return total, parts


@torch.no_grad()
def centernet_decode(outputs: dict[str, Tensor], k: int = 100, stride: int = 4) -> list[dict[str, Tensor]]:
    """The top-k heatmap peaks (3x3 local maxima, over classes and positions) of every image as
    detections: boxes (k, 4) xyxy in input pixels, scores (k,) sigmoid probabilities, labels (k,)."""
    return decode_peaks(outputs["heatmap"].float().sigmoid(), outputs["size"], outputs["offset"], k, stride)


@torch.no_grad()
def flip_test_decode(outputs: dict[str, Tensor], mirrored: dict[str, Tensor], k: int = 100,
                     stride: int = 4) -> list[dict[str, Tensor]]:
    """CenterNet's flip test (detectors/ctdet.py): `mirrored` are the outputs for the horizontally
    flipped images; flipped back, their heatmap probabilities and sizes are averaged with the
    unflipped ones, and the offsets are the unflipped ones'. Then decoded as centernet_decode."""
    heat = (outputs["heatmap"].float().sigmoid() + mirrored["heatmap"].float().sigmoid().flip(-1)) / 2
    size = (outputs["size"].float() + mirrored["size"].float().flip(-1)) / 2
    return decode_peaks(heat, size, outputs["offset"], k, stride)


def decode_peaks(heat: Tensor, size: Tensor, offset: Tensor, k: int, stride: int) -> list[dict[str, Tensor]]:
    """Detections from heatmap probabilities (B, C, h, w) and size / offset maps (B, 2, h, w)."""
    b, c, h, w = heat.shape
    heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, flat = heat.flatten(1).topk(min(k, c * h * w), dim=1)
    labels, position = flat // (h * w), flat % (h * w)
    centre = torch.stack([position % w, position // w], dim=2).float() + gather_at(offset.float(), position)
    half = gather_at(size.float(), position) / 2
    boxes = torch.cat([centre - half, centre + half], dim=2) * stride
    return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i]} for i in range(b)]
