"""CenterNet (projbench/models/centernet.py): output shapes with deformable and plain up-sampling,
the deformable convolution's start, training targets, a decode round trip from perfect outputs,
the flip test, the loss (and that it trains), ImageNet initialisation from a local file, and (with
CUDA) the deformable convolution on the GPU in mixed precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from projbench.errors import ConfigError
from projbench.models.centernet import (HEAD_OUTPUTS, CenterNet, ModulatedDeformConv, centernet_decode,
                                        centernet_loss, centernet_targets, flip_test_decode, stack_targets)

NUM_CLASSES = 3


def perfect_outputs(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Network outputs that match stacked targets: the heatmap's logits, size and offset at the centres."""
    heatmap = targets["heatmap"]
    b, _, h, w = heatmap.shape

    def at_centres(values: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(b, 2, h * w)
        for i in range(b):
            m = targets["mask"][i]
            dense[i, :, targets["index"][i][m]] = values[i][m].T
        return dense.view(b, 2, h, w)

    return {"heatmap": torch.logit(heatmap.clamp(1e-4, 1 - 1e-4)), "size": at_centres(targets["size"]),
            "offset": at_centres(targets["offset"])}


@pytest.mark.parametrize("deformable", [True, False])
def test_outputs_have_the_stride_4_shapes(deformable):
    model = CenterNet(NUM_CLASSES, deformable=deformable).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 96))
    assert CenterNet.stride == model.stride == 4
    assert set(out) == {"heatmap", "size", "offset"}
    assert out["heatmap"].shape == (2, NUM_CLASSES, 32, 24)
    assert out["size"].shape == out["offset"].shape == (2, 2, 32, 24)
    # the heatmap's bias is the prior sigmoid(-2.19) ~ 0.1; size and offset start near 0
    assert torch.allclose(model.heads["heatmap"][-1].bias, torch.tensor(-2.19))
    assert out["size"].abs().max() < 0.1 and out["offset"].abs().max() < 0.1
    deformable_convs = [m for m in model.modules() if isinstance(m, torchvision.ops.DeformConv2d)]
    assert len(deformable_convs) == (3 if deformable else 0)


def test_deformable_convolution_starts_as_the_plain_grid_at_half_weight():
    torch.manual_seed(0)
    layer = ModulatedDeformConv(8, 16)
    x = torch.randn(2, 8, 10, 12)
    # offsets 0 and masks sigmoid(0) = 0.5 (resnet_dcn.py's DCN init_offset), bias 0
    expected = 0.5 * F.conv2d(x, layer.conv.weight, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    bound = 1 / (8 * 9) ** 0.5
    assert layer.conv.weight.abs().max() <= bound and layer.conv.weight.std() > bound / 3
    # the offsets are learnt: a step moves the sampling points
    layer(x).square().sum().backward()
    assert layer.offset_mask.weight.grad.abs().sum() > 0


def test_one_box_gives_a_unit_peak_and_its_size_and_offset():
    # input box (10, 18)-(50, 42): output units (2.5, 4.5)-(12.5, 10.5), centre (7.5, 7.5), size 10 x 6
    t = centernet_targets(torch.tensor([[10.0, 18.0, 50.0, 42.0]]), torch.tensor([2]), NUM_CLASSES, (16, 20),
                          max_objects=8)
    assert t["heatmap"].shape == (NUM_CLASSES, 16, 20)
    assert t["heatmap"][2, 7, 7] == 1.0 and t["heatmap"].max() == 1.0
    assert (t["heatmap"] == 1).sum() == 1 and t["heatmap"][:2].sum() == 0
    assert 0 < t["heatmap"][2, 7, 8] < 1 and t["heatmap"][2, 7, 8] == t["heatmap"][2, 8, 7]  # a round Gaussian
    assert t["mask"].tolist() == [True] + [False] * 7
    assert t["index"][0] == 7 * 20 + 7 and t["index"].dtype == torch.long
    assert torch.allclose(t["size"][0], torch.tensor([10.0, 6.0]))
    assert torch.allclose(t["offset"][0], torch.tensor([0.5, 0.5]))
    assert t["size"][1:].abs().sum() == 0 and t["offset"][1:].abs().sum() == 0


def test_zero_size_boxes_are_skipped_and_objects_capped():
    boxes = torch.tensor([[8.0, 8.0, 8.0, 40.0],      # no width
                          [8.0, 8.0, 40.0, 9.0],      # 1 pixel high: 0.25 output units, kept
                          [100.0, 100.0, 140.0, 140.0],  # outside a 64 x 64 input: clipped to nothing
                          [0.0, 0.0, 32.0, 32.0]])
    t = centernet_targets(boxes, torch.tensor([0, 1, 2, 0]), NUM_CLASSES, 16, max_objects=4)
    assert t["mask"].sum() == 2
    assert t["heatmap"][2].sum() == 0  # the clipped-away box draws nothing
    assert torch.allclose(t["size"][:2], torch.tensor([[8.0, 0.25], [8.0, 8.0]]))
    capped = centernet_targets(boxes, torch.tensor([0, 1, 2, 0]), NUM_CLASSES, 16, max_objects=1)
    assert capped["mask"].tolist() == [True] and capped["heatmap"][0].sum() == 0  # only the first kept box
    empty = centernet_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), NUM_CLASSES, 16)
    assert empty["mask"].sum() == 0 and empty["heatmap"].sum() == 0


def test_decoding_perfect_outputs_recovers_the_boxes_and_labels():
    images = [(torch.tensor([[4.0, 6.0, 30.0, 28.0], [70.0, 60.0, 120.0, 100.0], [20.0, 80.0, 44.0, 120.0]]),
               torch.tensor([0, 2, 1])),
              (torch.tensor([[40.0, 40.0, 90.0, 72.0]]), torch.tensor([1]))]
    targets = stack_targets([centernet_targets(b, l, NUM_CLASSES, (32, 32), max_objects=16) for b, l in images])
    assert targets["heatmap"].shape == (2, NUM_CLASSES, 32, 32) and targets["mask"].shape == (2, 16)
    detections = centernet_decode(perfect_outputs(targets), k=10)
    assert len(detections) == 2
    for det, (boxes, labels) in zip(detections, images):
        assert det["boxes"].shape == (10, 4) and det["scores"].shape == det["labels"].shape == (10,)
        assert det["labels"].dtype == torch.long and bool((det["scores"][:-1] >= det["scores"][1:]).all())
        n = len(boxes)
        top = det["boxes"][:n]
        order = [int((top - box).abs().sum(1).argmin()) for box in boxes]
        assert sorted(order) == list(range(n))
        assert torch.allclose(top[order], boxes, atol=1.0)
        assert det["labels"][:n][order].tolist() == labels.tolist()
        assert bool((det["scores"][:n] > 0.99).all()) and bool((det["scores"][n:] < 0.99).all())


def test_flip_test_merges_mirrored_outputs_as_centernet_does():
    boxes, labels = torch.tensor([[4.0, 6.0, 30.0, 28.0], [70.0, 60.0, 110.0, 100.0]]), torch.tensor([0, 2])
    targets = stack_targets([centernet_targets(boxes, labels, NUM_CLASSES, (32, 32), max_objects=8)])
    outputs = perfect_outputs(targets)
    mirrored = {k: v.flip(-1) for k, v in outputs.items()}
    # the outputs of the mirror image, flipped back, agree with the image's: the same detections
    plain, merged = centernet_decode(outputs, k=5)[0], flip_test_decode(outputs, mirrored, k=5)[0]
    for key in ("boxes", "scores", "labels"):
        assert torch.allclose(plain[key].float(), merged[key].float(), atol=1e-5)
    # scores and sizes are averaged with the mirror's; offsets are the image's own
    halved = dict(mirrored, heatmap=torch.full_like(outputs["heatmap"], -30.0), size=mirrored["size"] * 3,
                  offset=mirrored["offset"] + 5)
    merged = flip_test_decode(outputs, halved, k=2)[0]
    top = plain["boxes"][:2]
    widths = (top[:, 2:] - top[:, :2]) * 2
    centres = (top[:, 2:] + top[:, :2]) / 2
    assert torch.allclose(merged["scores"], plain["scores"][:2] / 2, atol=1e-4)
    expected = torch.cat([centres - widths / 2, centres + widths / 2], 1)
    assert torch.allclose(merged["boxes"][merged["boxes"][:, 0].argsort()], expected[expected[:, 0].argsort()],
                          atol=1e-3), "sizes x (1 + 3) / 2, centres where they were"


def test_loss_is_small_for_perfect_outputs_and_overfits_a_batch():
    torch.manual_seed(0)
    boxes = [torch.tensor([[4.0, 8.0, 36.0, 40.0], [30.0, 20.0, 60.0, 56.0]]), torch.tensor([[10.0, 10.0, 50.0, 30.0]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    targets = stack_targets([centernet_targets(b, l, NUM_CLASSES, 16, max_objects=8) for b, l in zip(boxes, labels)])
    zero = {"heatmap": torch.zeros(2, NUM_CLASSES, 16, 16), "size": torch.zeros(2, 2, 16, 16),
            "offset": torch.zeros(2, 2, 16, 16)}
    perfect_total, perfect = centernet_loss(perfect_outputs(targets), targets)
    zero_total, zeroed = centernet_loss(zero, targets)
    assert set(perfect) == {"heatmap", "size", "offset"} and all(v.dim() == 0 for v in perfect.values())
    assert perfect["heatmap"] < 0.01 * zeroed["heatmap"]
    assert perfect["size"] < 1e-5 and perfect["offset"] < 1e-5 and zeroed["size"] > 1
    assert torch.isclose(zero_total, zeroed["heatmap"] + 0.1 * zeroed["size"] + zeroed["offset"])

    model = CenterNet(NUM_CLASSES, deformable=False)  # this checks the loss; plain up-sampling is faster on a CPU
    images = torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss, _ = centernet_loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5


def test_pretrained_loads_a_local_torchvision_state_dict(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = CenterNet(NUM_CLASSES, pretrained=str(path))
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "no_fc.pth")
    CenterNet(NUM_CLASSES, pretrained=str(tmp_path / "no_fc.pth"))  # fc is not needed


@pytest.mark.parametrize("content", ["wrong_keys", "other_resnet", "not_a_state_dict", "missing"])
def test_unusable_pretrained_file_is_a_config_error(tmp_path, content):
    path = tmp_path / f"{content}.pth"
    if content == "wrong_keys":
        torch.save({"features.0.weight": torch.zeros(3)}, path)
    elif content == "other_resnet":
        torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    elif content == "not_a_state_dict":
        path.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="task.model.pretrained") as error:
        CenterNet(NUM_CLASSES, pretrained=str(path))
    assert str(path) in str(error.value)


def test_unknown_backbone_or_stage_count_is_a_config_error():
    with pytest.raises(ConfigError, match="task.model.backbone"):
        CenterNet(NUM_CLASSES, backbone="vgg16")
    with pytest.raises(ConfigError, match="task.model.deconv_channels"):
        CenterNet(NUM_CLASSES, deconv_channels=(64, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True])
def test_deformable_up_sampling_agrees_with_the_cpu_and_trains_in_bf16_on_cuda(channels_last):
    torch.manual_seed(0)
    model = CenterNet(NUM_CLASSES).eval()
    for stage in model.upsample:  # offsets and masks away from their zero start
        torch.nn.init.normal_(stage[0].offset_mask.weight, std=0.01)
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = model(images)
        gpu, gpu_images = model.cuda(), images.cuda()
        if channels_last:
            gpu = gpu.to(memory_format=torch.channels_last)
            gpu_images = gpu_images.to(memory_format=torch.channels_last)
        got = gpu(gpu_images)
    for name in HEAD_OUTPUTS:
        assert torch.allclose(got[name].cpu(), expected[name], rtol=1e-3, atol=1e-3), name
    boxes = [torch.tensor([[4.0, 8.0, 60.0, 70.0]]), torch.tensor([[30.0, 20.0, 120.0, 100.0]])]
    targets = stack_targets([centernet_targets(b, torch.tensor([1]), NUM_CLASSES, 32) for b in boxes])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = centernet_loss(gpu.train()(gpu_images), {k: v.cuda() for k, v in targets.items()})
    loss.backward()
    assert torch.isfinite(loss)
    assert all(stage[0].offset_mask.weight.grad.abs().sum() > 0 for stage in gpu.upsample)
