"""SSD300 (projbench/models/ssd.py): the BatchNorm variant's layers and ImageNet initialisation
from a local vgg16_bn state dict, the plain torchvision variant's VGG16 loading, and (with CUDA)
a mixed-precision training step."""

from __future__ import annotations

import pytest
import torch

from projbench.errors import ConfigError
from projbench.models.ssd import load_vgg16_backbone, ssd300_vgg16_bn, ssd300_vgg16_plain, vgg16_features


def _vgg16_state(batch_norm: bool) -> dict:
    """A torchvision VGG16 (-BN) state dict's `features.*` entries (its classifier is ignored)."""
    return {f"features.{k}": v for k, v in vgg16_features(batch_norm).state_dict().items()}


def test_plain_ssd_backbone_loads_from_a_local_vgg16_state_dict(tmp_path):
    state = {**_vgg16_state(batch_norm=False), "classifier.0.weight": torch.zeros(2, 2)}  # the classifier is ignored
    path = tmp_path / "vgg16_features.pth"
    torch.save(state, path)
    ssd = ssd300_vgg16_plain(4, pretrained=path, trainable_layers=4)
    assert torch.equal(ssd.backbone.features[0].weight, state["features.0.weight"])     # conv1_1
    assert torch.equal(ssd.backbone.features[21].weight, state["features.21.weight"])   # conv4_3
    assert torch.equal(ssd.backbone.extra[0][5].weight, state["features.28.weight"])    # conv5_3
    frozen = [name for name, p in ssd.named_parameters() if not p.requires_grad]
    assert frozen == ["backbone.features.0.weight", "backbone.features.0.bias",
                      "backbone.features.2.weight", "backbone.features.2.bias"], "the first VGG stage freezes"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ssd.modules())
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    torch.save(_vgg16_state(batch_norm=True), tmp_path / "vgg16_bn.pth")
    for bad, message in ((tmp_path / "missing.pth", "missing.pth: not found"),
                         (tmp_path / "resnet.pth", "resnet.pth: does not fit: expected a torchvision VGG16"),
                         (tmp_path / "vgg16_bn.pth", "vgg16_bn.pth: does not fit: expected a torchvision VGG16")):
        with pytest.raises(ConfigError, match=f"task.model.pretrained: .*{message}"):
            load_vgg16_backbone(ssd, bad, trainable_layers=4)


def test_batchnorm_ssd_normalises_every_convolution_and_loads_vgg16_bn(tmp_path):
    ssd = ssd300_vgg16_bn(4)
    norms = [m for m in ssd.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in ssd.modules() if isinstance(m, torch.nn.Conv2d)]
    # 13 VGG16 convolutions + fc6 + fc7 + 4 x 2 extra layers + 6 x 2 prediction convolutions
    assert len(norms) == len(convs) == 13 + 2 + 8 + 12 == 35
    assert not any("scale_weight" in name for name, _ in ssd.named_parameters()), "no L2Norm on conv4_3"
    assert [m.bias for m in ssd.head.modules() if isinstance(m, torch.nn.Conv2d)] == [None] * 12

    state = _vgg16_state(batch_norm=True)
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2)
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    loaded = ssd300_vgg16_bn(4, pretrained=path, trainable_layers=4)
    assert torch.equal(loaded.backbone.features[0].weight, state["features.0.weight"])          # conv1_1
    assert torch.equal(loaded.backbone.features[31].running_var, state["features.31.running_var"])  # conv4_3's BN
    assert torch.equal(loaded.backbone.extra[0][1].weight, state["features.34.weight"])         # conv5_1
    frozen = [name for name, p in loaded.named_parameters() if not p.requires_grad]
    assert frozen == ["backbone.features.0.weight", "backbone.features.0.bias",
                      "backbone.features.3.weight", "backbone.features.3.bias"], "the first VGG stage freezes"
    assert [type(loaded.backbone.features[i]).__name__ for i in (1, 4, 8)] == [
        "FrozenBatchNorm2d", "FrozenBatchNorm2d", "BatchNorm2d"], "its BatchNorm keeps ImageNet statistics"
    torch.save(_vgg16_state(batch_norm=False), tmp_path / "vgg16.pth")
    with pytest.raises(ConfigError, match="pretrained: .*vgg16.pth: does not fit: expected a torchvision vgg16_bn"):
        ssd300_vgg16_bn(4, pretrained=tmp_path / "vgg16.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batchnorm_ssd_trains_on_cuda_in_bf16_and_channels_last():
    torch.manual_seed(0)
    ssd = ssd300_vgg16_bn(4).cuda().to(memory_format=torch.channels_last)
    images = [torch.rand(3, 300, 300, device="cuda") for _ in range(2)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 150.0, 200.0]], device="cuda"),
                "labels": torch.tensor([2], device="cuda")}] * 2
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = ssd(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in ssd.parameters() if p.grad is not None)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        (detections,) = ssd.eval()(images[:1])
    assert detections["boxes"].shape[1:] == (4,)
