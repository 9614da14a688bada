"""GFL R50-FPN (clbench/models/detection/resnet_fpn.py + gfl.py): the papers' detector at its real
size with random weights, its frozen parts, the weight files, the 1x recipe in PAPER_SETTINGS,
and IOR's BatchNorm prior on frozen BatchNorm. Whole runs through the CLI at this size (IOR, ERD,
gfl_finetune on VOC and COCO fixtures) are in tests/test_real_detectors.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from clbench.errors import UsageError
from clbench.models.detection.gfl import GFL_R50_FPN_1X, GFLConfig, GFLResNet50FPN, build_gfl
from clbench.models.detection.resnet_fpn import ResNet50FPN, gfl_r50_fpn_parameter_count, read_backbone_weights
from clbench.registry import STRATEGIES

pytestmark = pytest.mark.usefixtures("one_thread")

PUBLISHED = {k: v for k, v in GFL_R50_FPN_1X.items() if k in GFLConfig.__dataclass_fields__}
R50 = GFLConfig(**{**PUBLISHED, "backbone_weights": "none"})


def count(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@pytest.fixture(scope="module")
def coco_r50():
    return GFLResNet50FPN(80, R50)


def test_parameter_count_is_mmdetections_gfl_r50_fpn(coco_r50):
    # the reference from the architecture: torchvision ResNet-50 without fc (23,508,032) + FPN with
    # P6/P7 on output (3,868,672) + GFL head, 4-conv GroupNorm towers, 80 classes, R = 16 (5,063,833)
    assert gfl_r50_fpn_parameter_count(80) == 23_508_032 + 3_868_672 + 5_063_833 == 32_440_537
    assert count(coco_r50.body.body) == 23_508_032
    assert count(coco_r50.body.fpn) == 3_868_672
    assert count(coco_r50) == 32_440_537
    assert abs(count(coco_r50) - 32.2e6) / 32.2e6 < 0.01  # the published "about 32.2M"
    # frozen_stages=1: the stem and layer1 (225,344 parameters) get no gradient
    frozen = count(coco_r50.body.body.conv1) + count(coco_r50.body.body.bn1) + count(coco_r50.body.body.layer1)
    assert frozen == 225_344 and count(coco_r50, trainable=True) == 32_440_537 - frozen


def test_architecture_is_the_papers(coco_r50):
    body = coco_r50.body
    norms = [m for m in body.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == 53 and not any(isinstance(m, nn.BatchNorm2d) for m in coco_r50.modules())
    assert all(p.requires_grad is False for p in body.body.layer1.parameters())
    assert all(p.requires_grad for p in body.body.layer2.parameters())
    towers = [m for m in coco_r50.cls_tower.modules() if isinstance(m, nn.Conv2d)]
    assert len(towers) == 4 and all(m.bias is None and m.kernel_size == (3, 3) for m in towers)
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 32
               for m in coco_r50.reg_tower.modules() if isinstance(m, nn.GroupNorm))
    assert coco_r50.cls_conv.out_channels == 80 and coco_r50.reg_conv.out_channels == 4 * 17
    # a forward at 128 x 96: five levels at strides 8..128, 256 channels
    coco_r50.eval()
    with torch.no_grad():
        out = coco_r50(torch.rand(1, 3, 128, 96))
    assert [tuple(f.shape[1:]) for f in out.cls_feats] == [(256, 16, 12), (256, 8, 6), (256, 4, 3), (256, 2, 2), (256, 1, 1)]
    assert out.level_strides == [8, 16, 32, 64, 128]
    assert out.cls_logits.shape == (1, 16 * 12 + 8 * 6 + 4 * 3 + 4 + 1, 80)


def test_frozen_batchnorm_statistics_do_not_move_in_train_mode():
    body = ResNet50FPN(32, 3)
    body.train()
    before = {k: v.clone() for k, v in body.state_dict().items() if "running" in k}
    body(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, body.state_dict()[k]) for k, v in before.items())


def test_p7_is_a_conv_of_p6_without_relu():
    body = ResNet50FPN(32, 5)
    p5 = torch.randn(1, 32, 4, 4)
    levels, names = body.fpn.extra_blocks([p5], [], ["p5"])
    assert names == ["p5", "p6", "p7"]
    assert torch.allclose(levels[2], body.fpn.extra_blocks.p7(body.fpn.extra_blocks.p6(p5)))


def test_weights_come_from_a_local_file_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UsageError, match="resnet50-0676ba61.pth") as e:
        read_backbone_weights("imagenet")
    assert "\n" not in str(e.value) and str(tmp_path / "hub" / "checkpoints") in str(e.value)
    with pytest.raises(UsageError, match="not found"):
        read_backbone_weights(str(tmp_path / "missing.pth"))
    # a torchvision ResNet-50 state dict in the hub cache is loaded (fc ignored)
    from torchvision.models import resnet50

    reference = resnet50(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    cfg = GFLConfig(detector="r50_fpn", fpn_channels=32, num_levels=3)
    model = build_gfl(0, cfg)
    assert isinstance(model, GFLResNet50FPN)
    assert torch.equal(model.body.body.layer3[2].conv2.weight, reference.layer3[2].conv2.weight)
    assert torch.equal(model.body.body.bn1.running_var, reference.bn1.running_var)
    torch.save({"other": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(UsageError, match="not a torchvision ResNet-50"):
        GFLResNet50FPN(0, dataclasses.replace(cfg, backbone_weights=str(tmp_path / "foreign.pth")))


def test_ior_batchnorm_prior_reads_frozen_batchnorm():
    from clbench.strategies.ior import batchnorm_prior

    model = GFLResNet50FPN(2, GFLConfig(detector="r50_fpn", backbone_weights="none", fpn_channels=32)).eval()
    x = torch.randn(2, 3, 64, 64)
    with batchnorm_prior(model) as terms:
        model(x, normalized=True)
    assert len(terms) == 53
    # the first term is the stem's bn1 on conv1's output, by hand
    z = model.body.body.conv1(x)
    bn = model.body.body.bn1
    expected = (torch.linalg.vector_norm(z.mean((0, 2, 3)) - bn.running_mean)
                + torch.linalg.vector_norm(z.var((0, 2, 3), unbiased=False) - bn.running_var))
    assert torch.allclose(terms[0], expected)


def test_paper_settings_give_the_r50_detector_and_the_1x_recipe():
    for name in ("ior", "erd", "gfl_finetune"):
        cls = STRATEGIES.get(name)
        for setting in ("coco-40+40", "coco-70+10"):
            s = cls.PAPER_SETTINGS[setting]
            assert s["detector"] == "r50_fpn" and s["backbone_weights"] == "imagenet"
            assert (s["fpn_channels"], s["tower_convs"], s["num_levels"], s["reg_max"]) == (256, 4, 5, 16)
            assert (s["optimizer"], s["lr"], s["momentum"], s["weight_decay"]) == ("sgd", 0.01, 0.9, 1e-4)
            assert (s["epochs"], s["lr_milestones"], s["warmup_iters"]) == (12, (8, 11), 500)
            assert s["batch_size"] * s["accumulate_grad_batches"] == 16 and s["flip"]
    assert STRATEGIES.get("gfl_finetune").PAPER_SETTINGS["coco-40+40-absent"] == STRATEGIES.get("gfl_finetune").PAPER_SETTINGS["coco-40+40"]
    with pytest.raises(UsageError, match="detector"):
        GFLConfig(detector="r101")
