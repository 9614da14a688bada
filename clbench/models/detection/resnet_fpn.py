"""ResNet-50 + FPN (P3-P7): the feature body of the GFL R50-FPN detector of the IOR and ERD papers.

As mmdetection's GFL R50-FPN 1x config (`configs/gfl/gfl_r50_fpn_1x_coco.py`, the config both
official codes start from):

- **Backbone**: torchvision's `resnet50` (ResNet v1.5: stride on the 3x3 conv, mmdetection's
  `style='pytorch'`), without `avgpool` and `fc`; C3, C4, C5 (strides 8/16/32, 512/1024/2048
  channels) feed the neck. `frozen_stages=1`: stem (conv1 + bn1) and the first stage (`layer1`)
  get no gradient. `norm_eval=True`: every BatchNorm is a `FrozenBatchNorm2d` (running statistics
  fixed, never updated, train or eval). mmdetection's `norm_cfg=dict(type='BN', requires_grad=True)`
  keeps the BN scale and shift of stages 2-4 trainable; here they are `nn.Parameter`s of a
  `FrozenBatchNorm2d` subclass (`FrozenStatisticsBatchNorm2d`), trainable in stages 2-4 and frozen
  in the frozen stages (`bn_affine_trainable=False` freezes them everywhere, torchvision's
  detection convention).
- **Neck**: torchvision's `FeaturePyramidNetwork` on C3-C5 (1x1 laterals and 3x3 outputs, 256
  channels, with bias: mmdetection's FPN without norm) plus P6 = conv3x3/2(P5) and P7 =
  conv3x3/2(P6) (mmdetection's `add_extra_convs='on_output'`, `relu_before_extra_convs=False`: no
  ReLU between P6 and P7, unlike torchvision's RetinaNet `LastLevelP6P7`). Convs initialised as
  mmdetection's FPN (Xavier uniform, zero bias).
- **Weights**: ImageNet (torchvision's `ResNet50_Weights.IMAGENET1K_V1`, the file mmdetection's
  `torchvision://resnet50` names) read from torch.hub's checkpoint folder
  (`$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth`) or a given file; never downloaded unless
  asked (`download=True`); a missing file is a one-line `UsageError` naming it.

Parameters (80 classes, reg_max 16, 4-conv towers): ResNet-50 without fc 23,508,032 + FPN
3,868,672 + head 5,063,833 = 32,440,537 (`gfl_r50_fpn_parameter_count`), the count of
mmdetection's GFL R50-FPN built from its config.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from clbench.errors import UsageError

C3_C5_CHANNELS = (512, 1024, 2048)


class FrozenStatisticsBatchNorm2d(FrozenBatchNorm2d):
    """A `FrozenBatchNorm2d` (fixed running statistics, in train mode too) whose scale and shift are
    `nn.Parameter`s (trainable unless their `requires_grad` is turned off): mmdetection's BN with
    `requires_grad=True, norm_eval=True`."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        for name in ("weight", "bias"):
            value = self._buffers.pop(name)
            setattr(self, name, nn.Parameter(value))


class P6P7OnOutput(ExtraFPNBlock):
    """mmdetection's `add_extra_convs='on_output'`: P6 = conv3x3/2(P5), P7 = conv3x3/2(P6), no ReLU between."""

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, results, x, names):
        p6 = self.p6(results[-1])
        return [*results, p6, self.p7(p6)], [*names, "p6", "p7"]


class ResNet50FPN(nn.Module):
    """Normalised images -> FPN levels P3..P(2+num_levels) (strides 8, 16, ..., `channels` wide)."""

    def __init__(self, channels: int = 256, num_levels: int = 5, frozen_stages: int = 1, bn_affine_trainable: bool = True):
        super().__init__()
        from torchvision.models import resnet50

        norm = FrozenStatisticsBatchNorm2d if bn_affine_trainable else FrozenBatchNorm2d
        body = resnet50(weights=None, norm_layer=norm)
        del body.fc, body.avgpool
        self.body = body
        self.frozen_stages = frozen_stages
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        extra = P6P7OnOutput(channels) if num_levels == 5 else None
        self.fpn = FeaturePyramidNetwork(list(C3_C5_CHANNELS), channels, extra_blocks=extra)
        for m in self.fpn.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and the first `frozen_stages` stages (mmdetection's `frozen_stages`)."""
        b = self.body
        return ([b.conv1, b.bn1] if self.frozen_stages >= 0 else []) + \
            [getattr(b, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        b = self.body
        z = b.maxpool(b.relu(b.bn1(b.conv1(z))))
        c2 = b.layer1(z)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return list(self.fpn(OrderedDict([("c3", c3), ("c4", c4), ("c5", c5)])).values())

    def load_backbone(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a torchvision ResNet-50 state dict (its `fc.*` ignored) into the backbone; a file
        that does not hold one is a `UsageError` naming `source`."""
        state = {k.removeprefix("module.").removeprefix("backbone.").removeprefix("body."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        expected = set(self.body.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise UsageError(f"backbone weights {source} are not a torchvision ResNet-50 state_dict "
                             f"({len(missing)} of its {len(expected)} tensors missing, e.g. {missing[0]!r})")
        self.body.load_state_dict({k: v for k, v in state.items() if k in expected or k.endswith("num_batches_tracked")},
                                  strict=False)


def imagenet_weights_path() -> tuple[Path, str]:
    """Where torch.hub keeps torchvision's ImageNet ResNet-50 (IMAGENET1K_V1) and its URL."""
    from torchvision.models import ResNet50_Weights

    url = ResNet50_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def backbone_weights_file(spec: str, download: bool = False) -> Path | None:
    """The local file `backbone_weights` names (None for "none"): "imagenet" is torch.hub's cached
    copy, fetched first only with `download`; a path must exist. A missing file is a one-line
    `UsageError` naming it and how to get it, raised before any data is read (the runner asks
    through `GFLStrategy.model_weights`)."""
    if spec == "none":
        return None
    if spec == "imagenet":
        path, url = imagenet_weights_path()
        if not path.is_file():
            if not download:
                raise UsageError(f"ImageNet ResNet-50 weights for GFL R50-FPN not found: {path} (torchvision's {url}); "
                                 f"fetch them with --download (or `clbench download` ahead of time), put the file "
                                 f"there, or pass --weights FILE")
            torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"backbone weights file not found: {path}; expected a torchvision ResNet-50 state_dict "
                         f"(or backbone_weights=imagenet / none)")
    return path


def read_backbone_weights(spec: str, download: bool = False) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(state dict or None, where it came from) for `backbone_weights`: "none" (random init),
    "imagenet" (torch.hub's cache, downloaded only with `download`) or a file path."""
    path = backbone_weights_file(spec, download)
    if path is None:
        return None, "none"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a text file, a truncated download
        raise UsageError(f"backbone weights file {path} is not a readable checkpoint ({type(e).__name__})") from None
    for nested in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
            break
    if not isinstance(state, dict):
        raise UsageError(f"backbone weights file {path} holds no state_dict")
    return state, str(path)


def gfl_r50_fpn_parameter_count(num_classes: int = 80, reg_max: int = 16, channels: int = 256, tower_convs: int = 4,
                                num_levels: int = 5) -> int:
    """The parameters of mmdetection's GFL R50-FPN counted from its architecture (every BN scale
    and shift counted, frozen or not): ResNet-50 without fc + FPN + GFL head."""
    resnet50_without_fc = 25_557_032 - (2048 * 1000 + 1000)  # torchvision's resnet50 minus its fc
    conv = lambda i, o, k, bias=True: i * o * k * k + (o if bias else 0)  # noqa: E731
    fpn = sum(conv(c, channels, 1) + conv(channels, channels, 3) for c in C3_C5_CHANNELS)
    fpn += (num_levels - 3) * conv(channels, channels, 3)  # P6, P7 on output
    tower = 2 * tower_convs * (conv(channels, channels, 3, bias=False) + 2 * channels)  # conv + GroupNorm affine
    head = tower + conv(channels, num_classes, 3) + conv(channels, 4 * (reg_max + 1), 3) + num_levels
    return resnet50_without_fc + fpn + head
