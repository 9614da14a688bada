"""GFL detectors (Generalized Focal Loss, Li et al., NeurIPS 2020) for incremental detection: TinyGFL
and GFL R50-FPN, one head, assignment, loss and inference (`GFL`), two feature bodies.

`GFLConfig.detector` picks the body: "tiny" (TinyGFL, below; the CPU default and the `shapes-*`
detector) or "r50_fpn" (`GFLResNet50FPN`, the IOR and ERD papers' detector, mmdetection's
`gfl_r50_fpn_1x_coco`: torchvision's ResNet-50 with ImageNet weights from a local file, frozen stem
and first stage, frozen BatchNorm statistics, FPN P3-P7 at 256 channels; see
`clbench.models.detection.resnet_fpn`). With the published head (`fpn_channels=256,
tower_convs=4, num_levels=5, reg_max=16`, `GFL_R50_FPN_1X`) and 80 classes it has 32,440,537
parameters, the count of mmdetection's model (ResNet-50 without fc 23,508,032 + FPN 3,868,672 +
head 5,063,833), tested.

The dense detector the incremental-detection protocol needs (IOR and its baselines need per-location sigmoid
class logits, a distributional box branch, a cls tower to RoIAlign from and BatchNorm in the backbone):

- **TinyGFL's backbone**: four BatchNorm CNN stages (16-32-64-96 channels at strides 4/8/16/32, each two
  `Conv2dNormActivation`s), the last three feeding torchvision's `FeaturePyramidNetwork` (strides
  8/16/32, 64 channels); `num_levels=5` adds torchvision's `LastLevelP6P7` (strides 64/128; a ReLU
  before P7, which GFL R50-FPN's extra levels do not have). Images in [0, 1] are normalised inside (ImageNet mean/std); `forward(...,
  normalized=True)` takes inputs already in that space (what IOR's inversion optimises).
- **Head**: two towers of `tower_convs` conv3x3 + GroupNorm(32) + ReLU shared over levels; the cls
  tower feeds a conv with one sigmoid logit per class (joint class / IoU-quality score, trained by
  QFL); the reg tower feeds a conv with `4·(R+1)` logits, a softmax distribution over each side's
  distance to the anchor centre in units of the level's stride (DFL + GIoU), times a learnt scale per
  level. No centerness branch.
- **Assignment: ATSS** (Zhang et al., CVPR 2020), as GFL uses: one square anchor of
  `anchor_scale · stride` per location (octave scale 8); per GT the `atss_topk` anchors per level
  whose centres are closest to the GT centre are candidates; those with IoU >= mean + std of the candidates' IoUs and
  the anchor centre inside the GT are positives (an anchor claimed twice goes to the larger IoU).
  We implement ATSS rather than reuse torchvision FCOS' centre sampling, so the assignment is GFL's.
- **Losses** (mmdetection's GFL head): QFL (beta 2) over every location and class, normalised by the
  number of positives; GIoU (weight 2) and DFL (weight 0.25, mean over the 4 sides) on positives,
  each weighted by the positive's largest predicted class score (detached) and normalised by the sum
  of those weights. The QFL target of a positive is the IoU of its decoded (detached) box with its GT.
- **Inference**: per level the `candidates_per_level` best (location, class) scores above
  `score_thresh`, decoded, clipped, class-wise NMS (`torchvision.ops.batched_nms`, IoU 0.6), at most
  `max_detections` per image. Logits of classes outside `classes` are masked first.
- **Incremental classifier**: `grow_classes(n)` appends output channels to the class conv and keeps
  the old rows; a state dict with another class count resizes it on load (resume, teachers).
- **Response distillation** (shared by ERD and IOR): the confidences an old detector's locations
  are selected by (`class_confidence`, `box_confidence`) and the two distances at the selected
  locations (`squared_logit_gaps` on raw class logits; `box_distillation_at`, a temperature KL of
  the side distributions after class-wise NMS); each method selects and normalises on its own.

Boxes are xyxy in pixels; the anchor centre of cell (i, j) at stride s is ((j + 0.5)s, (i + 0.5)s)
(mmdetection uses offset 0; with square anchors this only shifts the grid by half a stride).

Reused from torch/torchvision: `Conv2dNormActivation`, `FeaturePyramidNetwork`, `LastLevelP6P7`,
`box_iou`, `generalized_box_iou_loss`, `batched_nms`; the strategies use `roi_align`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import (
    FeaturePyramidNetwork,
    batched_nms,
    box_iou,
    generalized_box_iou_loss,
)
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation

from clbench.config import StrategyConfig, non_negative_integers, positive_integers
from clbench.datasets import DetectionBatch, Target
from clbench.models.detection.padding import valid_sizes_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRIOR_PROBABILITY = 0.01  # initial class score, as RetinaNet/GFL initialise the class-conv bias
DETECTORS = ("tiny", "r50_fpn")
# The papers' detector and its mmdetection 1x recipe (configs/gfl/gfl_r50_fpn_1x_coco.py, which the
# IOR and ERD codes start from), the shared part of ior / erd / gfl_finetune PAPER_SETTINGS: GFL
# R50-FPN (ImageNet ResNet-50, 256-channel FPN P3-P7, 4-conv towers, R = 16), SGD 0.01 momentum 0.9
# wd 1e-4, 12 epochs with x0.1 at epochs 8 and 11, a 500-step linear warm-up from 0.001 x lr,
# random horizontal flip, 16 images per step as 2 per batch x 8 accumulated batches (the papers'
# 8 GPUs x 2; under DDP on N devices set accumulate_grad_batches=8/N).
GFL_R50_FPN_1X = {
    "detector": "r50_fpn", "backbone_weights": "imagenet", "frozen_stages": 1,
    "fpn_channels": 256, "tower_convs": 4, "num_levels": 5, "reg_max": 16,
    "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
    "epochs": 12, "lr_schedule": "multistep", "lr_milestones": (8, 11), "warmup_iters": 500, "warmup_ratio": 0.001,
    "batch_size": 2, "accumulate_grad_batches": 8, "flip": True, "inference_batch": 8,
}


@dataclass(frozen=True)
class GFLConfig(StrategyConfig):
    """TinyGFL's architecture, loss and inference settings plus the optimiser (tiny CPU defaults;
    the published R50-FPN values are in each strategy's PAPER_SETTINGS / docstring)."""

    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    backbone_channels: tuple[int, ...] = (16, 32, 64, 96)  # four stages, strides 4/8/16/32
    fpn_channels: int = 64  # paper: 256
    num_levels: int = 3  # 3 (strides 8-32) or 5 (+ P6, P7: strides 8-128, the paper's)
    tower_convs: int = 2  # paper: 4
    reg_max: int = 8  # R (paper: 16): each side distance is a distribution over 0..R strides
    # ATSS anchor side = anchor_scale x stride (GFL's octave scale 8). On grids of a few cells (a
    # 32 px canvas) anchors that all contain an object tie in IoU and may all miss ATSS's mean + std
    # threshold; on 64 px ShapesIOD images every object gets positives (about 5 each)
    anchor_scale: float = 8.0
    atss_topk: int = 9
    qfl_beta: float = 2.0
    giou_weight: float = 2.0
    dfl_weight: float = 0.25
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    max_detections: int = 100
    candidates_per_level: int = 1000
    flip: bool = True  # random horizontal flip of training images (p 0.5)
    # the detector: "tiny" (TinyGFL, the CPU default) or "r50_fpn" (GFLResNet50FPN, the papers'
    # ResNet-50 + FPN; set fpn_channels=256, tower_convs=4, num_levels=5, reg_max=16 for the
    # published head, as --paper-settings does); backbone_channels is TinyGFL's only
    detector: str = "tiny"
    # r50_fpn: "imagenet" (torch.hub's cache: $TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth),
    # "none" (random init, tests) or a torchvision ResNet-50 state_dict file
    backbone_weights: str = "imagenet"
    download_weights: bool = False  # r50_fpn: fetch the ImageNet file into torch.hub's cache when missing
    frozen_stages: int = 1  # r50_fpn: stem + this many ResNet stages get no gradient (mmdetection's)
    bn_affine_trainable: bool = True  # r50_fpn: BN scale/shift of unfrozen stages train (mmdetection's requires_grad=True)
    # gradient accumulation: one optimiser step per this many batches (losses / k), so batch_size 2 x 8
    # reproduces the papers' 8 GPUs x 2 images; under DDP on N devices use 8 / N
    accumulate_grad_batches: int = 1
    # linear warm-up over the first warmup_iters optimiser steps of every task, from warmup_ratio x lr
    # (mmdetection's 1x schedule: 500 iterations from 0.001 x lr)
    warmup_iters: int = 0
    warmup_ratio: float = 0.001
    inference_batch: int = 0  # detect at most this many images per forward (0: the whole batch; R50 at 800 px: 8)

    def __post_init__(self):
        super().__post_init__()
        from clbench.errors import UsageError

        if self.detector not in DETECTORS:
            raise UsageError(f"detector={self.detector!r} is invalid; expected one of: {', '.join(DETECTORS)}")
        positive_integers(self, "accumulate_grad_batches")
        non_negative_integers(self, "warmup_iters", "inference_batch")
        if not 0 < self.warmup_ratio <= 1:
            raise UsageError(f"warmup_ratio={self.warmup_ratio} is invalid; expected a number in (0, 1]")
        if not -1 <= self.frozen_stages <= 4:
            raise UsageError(f"frozen_stages={self.frozen_stages} is invalid; expected -1 (nothing frozen) to 4")
        if self.num_levels not in (3, 5):
            raise UsageError(f"num_levels={self.num_levels} is invalid; expected 3 or 5")
        if len(self.backbone_channels) != 4:
            raise UsageError(f"backbone_channels={self.backbone_channels} is invalid; expected 4 stage widths")
        positive_integers(self, "reg_max")


# --------------------------------------------------------------------------- model
@dataclass
class GFLOutput:
    """One forward pass. Per-location tensors are flattened level by level (level 0 first, row-major)."""

    cls_feats: list[torch.Tensor]  # per level [B, C, H_l, W_l]: the cls tower's output (IOR's RoIAlign input)
    cls_logits: torch.Tensor  # [B, L, K] one sigmoid logit per class
    reg_logits: torch.Tensor  # [B, L, 4, R + 1] side-distance distributions (left, top, right, bottom)
    centers: torch.Tensor  # [L, 2] anchor centres (x, y) in pixels
    strides: torch.Tensor  # [L]
    levels: torch.Tensor  # [L] FPN level of each location
    image_size: tuple[int, int]  # (H, W) of the (padded) input
    # long [B, 2] (height, width) of each image's valid area in a padded batch; None: every image fills the input
    image_sizes: torch.Tensor | None = None

    def sizes(self) -> torch.Tensor:
        """`[B, 2]` (height, width) of every image's valid area."""
        if self.image_sizes is not None:
            return self.image_sizes.to(self.centers.device)
        return torch.tensor([list(self.image_size)], device=self.centers.device).expand(self.cls_logits.shape[0], 2)

    def valid_locations(self) -> torch.Tensor | None:
        """bool `[B, L]`: locations whose cell starts inside the image's valid area (mmdetection's
        anchor valid flags: column j of stride s is valid while j < ceil(width / s)); None when
        unpadded (all valid)."""
        if self.image_sizes is None:
            return None
        sizes = self.sizes().to(self.centers.dtype)
        start = self.centers - self.strides[:, None] / 2  # [L, 2] (x, y) of each cell's top-left corner
        return (start[None, :, 0] < sizes[:, None, 1]) & (start[None, :, 1] < sizes[:, None, 0])

    @property
    def level_strides(self) -> list[int]:
        return [int(2 ** (3 + level)) for level in range(len(self.cls_feats))]

    def boxes(self, reg_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded boxes [B, L, 4] (xyxy pixels): centre -/+ expected side distances x stride."""
        reg = self.reg_logits if reg_logits is None else reg_logits
        return distances_to_boxes(expected_distance(reg) * self.strides[None, :, None], self.centers)


class GFL(nn.Module):
    """The GFL head, its losses and inference on top of a feature body a subclass builds.

    A subclass builds its backbone and neck, then calls `_build_head()`, and implements
    `features(z)`: normalised images -> the FPN levels (stride 8 first, each `fpn_channels` wide).
    `TinyGFL` (the tiny BatchNorm CNN) and `GFLResNet50FPN` (the papers' R50-FPN) share everything else."""

    cfg: GFLConfig

    def _build_head(self) -> None:
        """Towers, class conv (no classes yet), reg conv, per-level scales and the normalisation."""
        cfg = self.cfg
        self.reg_max = cfg.reg_max
        c = cfg.fpn_channels
        gn_block = lambda: Conv2dNormActivation(c, c, 3, norm_layer=lambda ch: nn.GroupNorm(min(32, ch), ch))  # noqa: E731
        self.cls_tower = nn.Sequential(*[gn_block() for _ in range(cfg.tower_convs)])
        self.reg_tower = nn.Sequential(*[gn_block() for _ in range(cfg.tower_convs)])
        self.cls_conv = self._class_conv(self._initial_classes)
        self.reg_conv = nn.Conv2d(c, 4 * (cfg.reg_max + 1), 3, padding=1)
        self.level_scales = nn.Parameter(torch.ones(cfg.num_levels))
        for tower in (self.cls_tower, self.reg_tower):
            for m in tower.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
        nn.init.normal_(self.reg_conv.weight, std=0.01)
        nn.init.zeros_(self.reg_conv.bias)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._grid_cache: dict = {}

    def features(self, z: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


    def _class_conv(self, n: int) -> nn.Conv2d:
        with warnings.catch_warnings():  # the classifier starts with no classes
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            conv = nn.Conv2d(self.cfg.fpn_channels, n, 3, padding=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(conv.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        return conv

    @property
    def num_classes(self) -> int:
        return self.cls_conv.out_channels

    def grow_classes(self, n: int) -> None:
        """Give the class conv `n` output channels: old rows copied, new rows freshly initialised."""
        old = self.cls_conv
        if n == old.out_channels:
            return
        if n < old.out_channels:
            raise ValueError(f"the classifier has {old.out_channels} classes; it cannot shrink to {n}")
        new = self._class_conv(n).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.out_channels] = old.weight
            new.bias[: old.out_channels] = old.bias
        new.weight.requires_grad_(old.weight.requires_grad)
        new.bias.requires_grad_(old.bias.requires_grad)
        self.cls_conv = new

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint (or teacher) with another class count: take its shape before loading
        saved = state_dict.get(prefix + "cls_conv.weight")
        if saved is not None and saved.shape[0] != self.num_classes:
            self.cls_conv = self._class_conv(saved.shape[0]).to(self.reg_conv.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, normalized: bool = False, image_sizes: torch.Tensor | None = None) -> GFLOutput:
        """`image_sizes` (`[B, 2]` height, width): the valid area of each image of a padded batch
        (default: the active padded batch's, if `x` is it; else the whole input). Padding is
        expected to be 0 after normalisation (`clbench.datasets.PAD_VALUE`)."""
        sizes = valid_sizes_for(x, image_sizes)
        feats = self.features(x if normalized else self.normalize(x))
        cls_feats = [self.cls_tower(f) for f in feats]
        cls, reg = [], []
        for level, f in enumerate(feats):
            b, _, h, w = f.shape
            logits = self.cls_conv(cls_feats[level]) if self.num_classes else f.new_zeros(b, 0, h, w)
            cls.append(logits.flatten(2).transpose(1, 2))
            reg.append((self.level_scales[level] * self.reg_conv(self.reg_tower(f))).flatten(2).transpose(1, 2))
        centers, strides, levels = self._grid([tuple(f.shape[-2:]) for f in feats], x.device)
        reg_logits = torch.cat(reg, 1)
        return GFLOutput(cls_feats, torch.cat(cls, 1), reg_logits.view(*reg_logits.shape[:2], 4, self.reg_max + 1),
                         centers, strides, levels, tuple(x.shape[-2:]),
                         None if sizes is None else sizes.to(x.device))

    def _grid(self, shapes: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (tuple(shapes), str(device))
        if key not in self._grid_cache:
            centers, strides, levels = [], [], []
            for level, (h, w) in enumerate(shapes):
                s = 2 ** (3 + level)
                ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
                centers.append(torch.stack([xs, ys], -1).reshape(-1, 2).float().add(0.5).mul(s))
                strides.append(torch.full((h * w,), float(s), device=device))
                levels.append(torch.full((h * w,), level, dtype=torch.long, device=device))
            self._grid_cache[key] = (torch.cat(centers), torch.cat(strides), torch.cat(levels))
        return self._grid_cache[key]

    def anchors(self, out: GFLOutput) -> torch.Tensor:
        """ATSS anchors [L, 4]: squares of side anchor_scale x stride at every location."""
        half = (self.cfg.anchor_scale * out.strides / 2)[:, None]
        return torch.cat([out.centers - half, out.centers + half], 1)

    # ----------------------------------------------------------- training
    def loss(self, out: GFLOutput, targets: Sequence[Target], channels: Sequence[int] | None = None) -> "GFLLoss":
        """The GFL loss of `out` against `targets`, on the class `channels` only (default: all).

        Targets must only hold classes in `channels` (label c is trained on channel c); ignored
        boxes are never targets, and their assigned locations count neither as positives nor as
        negatives."""
        return gfl_loss(out, self.anchors(out), targets, channels, self.cfg)

    # ----------------------------------------------------------- inference
    @torch.no_grad()
    def detect(self, x: torch.Tensor, classes: Sequence[int] | None = None,
               image_sizes: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        return postprocess(self(x, image_sizes=image_sizes), classes, self.cfg)


class TinyGFL(GFL):
    def __init__(self, num_classes: int, cfg: GFLConfig = GFLConfig()):
        super().__init__()
        self.cfg = cfg
        self._initial_classes = num_classes
        widths = cfg.backbone_channels
        bn_block = lambda i, o, s: Conv2dNormActivation(i, o, 3, stride=s, norm_layer=nn.BatchNorm2d)  # noqa: E731
        # the first stage reaches stride 4 (a stride-2 stem), the others halve the resolution once
        self.stages = nn.ModuleList(
            nn.Sequential(bn_block(i, o, 2), bn_block(o, o, 2 if i == 3 else 1)) for i, o in zip((3, *widths[:-1]), widths)
        )
        c = cfg.fpn_channels
        extra = LastLevelP6P7(c, c) if cfg.num_levels == 5 else None
        self.fpn = FeaturePyramidNetwork(list(widths[1:]), c, extra_blocks=extra)
        self._build_head()

    def features(self, z: torch.Tensor) -> list[torch.Tensor]:
        stage_outputs = []
        for stage in self.stages:
            z = stage(z)
            stage_outputs.append(z)
        return list(self.fpn({str(i): f for i, f in enumerate(stage_outputs[1:])}).values())


class GFLResNet50FPN(GFL):
    """GFL R50-FPN (the IOR and ERD papers' detector, mmdetection's `gfl_r50_fpn_1x_coco`): the
    ResNet-50 + FPN P3-P7 body of `clbench.models.detection.resnet_fpn` (frozen stem and first
    stage, frozen BatchNorm statistics, ImageNet weights from a local file) under the same GFL head,
    ATSS assignment, losses and inference as TinyGFL. With `fpn_channels=256, tower_convs=4,
    num_levels=5, reg_max=16` and 80 classes it has 32,440,537 parameters, mmdetection's count
    (`resnet_fpn.gfl_r50_fpn_parameter_count`)."""

    def __init__(self, num_classes: int, cfg: GFLConfig = GFLConfig(detector="r50_fpn"), weights: str | None = None,
                 download: bool | None = None):
        super().__init__()
        from clbench.models.detection.resnet_fpn import ResNet50FPN, read_backbone_weights

        self.cfg = cfg
        self._initial_classes = num_classes
        self.body = ResNet50FPN(cfg.fpn_channels, cfg.num_levels, cfg.frozen_stages, cfg.bn_affine_trainable)
        spec = cfg.backbone_weights if weights is None else weights
        state, source = read_backbone_weights(spec, cfg.download_weights if download is None else download)
        if state is not None:
            self.body.load_backbone(state, source)
        self.weights_source = source
        self._build_head()

    def features(self, z: torch.Tensor) -> list[torch.Tensor]:
        return self.body(z)


def build_gfl(num_classes: int, cfg: GFLConfig) -> GFL:
    """The detector `cfg.detector` names: TinyGFL or GFLResNet50FPN."""
    return GFLResNet50FPN(num_classes, cfg) if cfg.detector == "r50_fpn" else TinyGFL(num_classes, cfg)


# --------------------------------------------------------------------------- box coding
def expected_distance(reg_logits: torch.Tensor) -> torch.Tensor:
    """[..., 4, R + 1] logits -> [..., 4] expected distances (in strides) under their softmax."""
    bins = torch.arange(reg_logits.shape[-1], dtype=reg_logits.dtype, device=reg_logits.device)
    return (reg_logits.softmax(-1) * bins).sum(-1)


def distances_to_boxes(distances: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(left, top, right, bottom) distances [..., 4] from centres [..., 2] -> xyxy boxes."""
    return torch.cat([centers - distances[..., :2], centers + distances[..., 2:]], -1)


def boxes_to_distances(boxes: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """xyxy boxes [..., 4] -> (left, top, right, bottom) distances from centres [..., 2]."""
    return torch.cat([centers - boxes[..., :2], boxes[..., 2:] - centers], -1)


# --------------------------------------------------------------------------- assignment
def atss_assign(anchors: torch.Tensor, levels: torch.Tensor, gt_boxes: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """ATSS for one image: the index of the GT box each anchor is positive for, -1 for background. [L]"""
    valid = torch.ones(1, len(gt_boxes), dtype=torch.bool, device=anchors.device)
    return atss_assign_batch(anchors, levels, gt_boxes[None], valid, topk)[0]


def atss_assign_batch(anchors: torch.Tensor, levels: torch.Tensor, gt_boxes: torch.Tensor, valid: torch.Tensor,
                      topk: int = 9, anchor_valid: torch.Tensor | None = None) -> torch.Tensor:
    """ATSS over a batch of GT boxes padded to [B, M, 4] (`valid` [B, M] marks real ones). [B, L]

    `anchor_valid` (bool [B, L]): anchors of each image that take part (a padded batch's anchors
    outside an image's valid area are neither candidates nor positives, as mmdetection filters
    anchors by their valid flags before assigning); None: all."""
    batch, num_gt = valid.shape
    num = anchors.shape[0]
    if num_gt == 0:
        return torch.full((batch, num), -1, dtype=torch.long, device=anchors.device)
    ious = box_iou(anchors, gt_boxes.reshape(-1, 4)).view(num, batch, num_gt).transpose(0, 1)  # [B, L, M]
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    distances = torch.cdist(anchor_centers.expand(batch, -1, -1), gt_centers)  # [B, L, M]
    if anchor_valid is not None:
        distances = distances.masked_fill(~anchor_valid[:, :, None], float("inf"))
    candidates = []
    for level in levels.unique():
        at_level = torch.nonzero(levels == level).squeeze(1)
        k = min(topk, len(at_level))
        nearest = distances[:, at_level].topk(k, dim=1, largest=False).indices  # [B, k, M]
        candidates.append(at_level[nearest])
    candidates = torch.cat(candidates, 1)  # [B, sum k, M]
    candidate_ious = ious.gather(1, candidates)
    threshold = candidate_ious.mean(1) + candidate_ious.std(1)  # per GT (unbiased std, as mmdetection)
    is_candidate = torch.zeros_like(ious, dtype=torch.bool).scatter_(1, candidates, True)
    lt = anchor_centers[None, :, None, :] - gt_boxes[:, None, :, :2]
    rb = gt_boxes[:, None, :, 2:] - anchor_centers[None, :, None, :]
    inside = torch.cat([lt, rb], -1).min(-1).values > 0.01
    positive = is_candidate & inside & (ious >= threshold[:, None, :]) & valid[:, None, :]
    if anchor_valid is not None:
        positive &= anchor_valid[:, :, None]
    best_iou, best_gt = torch.where(positive, ious, torch.full_like(ious, -1.0)).max(2)
    return torch.where(best_iou > -1, best_gt, torch.full_like(best_gt, -1))


# --------------------------------------------------------------------------- losses
def quality_focal_loss(logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """QFL per element [N, K]: BCE(sigmoid(z), y) |y - sigmoid(z)|^beta with y = quality at the
    positive's class and 0 elsewhere (`labels` -1 for background)."""
    target = torch.zeros_like(logits)
    pos = labels >= 0
    target[pos, labels[pos]] = quality[pos].to(logits.dtype)
    p = logits.sigmoid()
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * (target - p).abs().pow(beta)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL [n]: CE to the two bins around the continuous target, weighted by closeness."""
    left = target.long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    return F.cross_entropy(logits, left, reduction="none") * w_left + F.cross_entropy(logits, right, reduction="none") * w_right


@dataclass
class GFLLoss:
    terms: dict[str, torch.Tensor]  # {"qfl", "giou", "dfl"}, weighted
    quality_error: torch.Tensor  # detached: mean over levels with positives of mean |q - sigmoid(z)| (0 if none)
    num_positives: int


def pad_targets(targets: Sequence[Target], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes [B, M, 4], labels [B, M], ignore [B, M] and valid [B, M], padded to the most boxes."""
    m = max([len(t["labels"]) for t in targets] + [1])  # one invalid slot when no image has a box
    boxes = torch.zeros(len(targets), m, 4, device=device)
    labels = torch.zeros(len(targets), m, dtype=torch.long, device=device)
    ignore = torch.zeros(len(targets), m, dtype=torch.bool, device=device)
    valid = torch.zeros(len(targets), m, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        boxes[b, :n], labels[b, :n], ignore[b, :n], valid[b, :n] = t["boxes"], t["labels"], t["ignore"], True
    return boxes, labels, ignore, valid


def gfl_loss(out: GFLOutput, anchors: torch.Tensor, targets: Sequence[Target], channels: Sequence[int] | None,
             cfg: GFLConfig) -> GFLLoss:
    device = out.cls_logits.device
    channels = list(range(out.cls_logits.shape[-1])) if channels is None else [int(c) for c in channels]
    channel_index = torch.as_tensor(channels, dtype=torch.long, device=device)
    logits = out.cls_logits.index_select(-1, channel_index)  # [B, L, |channels|]
    boxes = out.boxes()  # [B, L, 4]
    gt, gt_labels, gt_ignore, valid = pad_targets(targets, device)
    unknown = set(gt_labels[valid & ~gt_ignore].tolist()) - set(channels)
    if unknown:
        raise ValueError(f"targets hold classes {sorted(unknown)} outside the trained channels {channels}")
    position = torch.full((max(channels + gt_labels.flatten().tolist() + [0]) + 1,), -1, dtype=torch.long, device=device)
    position[channel_index] = torch.arange(len(channels), device=device)
    inside = out.valid_locations()  # [B, L] or None: locations in a padded batch's padding take no part
    assigned = atss_assign_batch(anchors, out.levels, gt, valid, cfg.atss_topk, inside)  # [B, L]
    matched = assigned.clamp(min=0)
    hit = assigned >= 0
    to_ignore = hit & gt_ignore.gather(1, matched)  # ignored boxes: neither positive nor negative
    positive = hit & ~to_ignore
    labels = torch.where(positive, position[gt_labels.gather(1, matched)], torch.full_like(assigned, -1))
    bi, li = torch.nonzero(positive, as_tuple=True)
    matched_boxes = gt[bi, matched[bi, li]]
    quality = torch.zeros(assigned.shape, device=device)
    if len(bi):  # IoU of each positive's decoded box with its GT, image by image (aligned pairs)
        pred = boxes[bi, li].detach()
        quality[bi, li] = torch.cat([box_iou(pred[bi == b], matched_boxes[bi == b]).diagonal()
                                     for b in bi.unique()]).clamp(min=0)
    num_pos = len(bi)
    qfl = quality_focal_loss(logits, labels, quality, cfg.qfl_beta).sum(-1)
    counted = ~to_ignore if inside is None else ~to_ignore & inside
    qfl = (qfl * counted).sum() / max(num_pos, 1)
    if num_pos:
        weight = logits[bi, li].detach().sigmoid().max(-1).values
        norm = weight.sum().clamp(min=1e-6)
        giou = (generalized_box_iou_loss(boxes[bi, li], matched_boxes, reduction="none") * weight).sum() / norm
        target_dist = boxes_to_distances(matched_boxes, out.centers[li]) / out.strides[li, None]
        target_dist = target_dist.clamp(min=0, max=cfg.reg_max - 0.01)
        dfl = distribution_focal_loss(out.reg_logits[bi, li].reshape(-1, cfg.reg_max + 1), target_dist.reshape(-1))
        dfl = (dfl.view(-1, 4) * weight[:, None]).sum() / (4 * norm)
        error = (quality[bi, li] - logits[bi, li, labels[bi, li]].detach().sigmoid()).abs()
        level = out.levels[li]
        quality_error = torch.stack([error[level == lv].mean() for lv in level.unique()]).mean()
    else:  # keep the graph connected: zero gradients, not missing ones
        giou = dfl = out.reg_logits.sum() * 0.0
        quality_error = torch.zeros((), device=device)
    terms = {"qfl": qfl, "giou": cfg.giou_weight * giou, "dfl": cfg.dfl_weight * dfl}
    return GFLLoss(terms, quality_error, num_pos)


# --------------------------------------------------------------------------- response distillation
# The old detector's responses distilled into the new one at locations the old detector picks (ERD
# and IOR, which inherits ERD's code): how a method *selects* the locations is its own business;
# the confidences it selects by and the distances it distils live here once.
def class_confidence(cls_logits: torch.Tensor) -> torch.Tensor:
    """Per location the largest class probability over the given channels. [B, L, K] -> [B, L]"""
    return cls_logits.sigmoid().max(-1).values


def box_confidence(reg_logits: torch.Tensor) -> torch.Tensor:
    """Per location the largest raw box logit over all sides and bins (how peaked its most
    confident side distribution is; what the ERD code ranks box responses by). [B, L, 4, R + 1] -> [B, L]"""
    return reg_logits.flatten(2).max(-1).values


def squared_logit_gaps(new_logits: torch.Tensor, old_logits: torch.Tensor,
                       locations: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per image `(z_new - z_old)^2` of the raw logits at its `locations`, on the channels given
    (the old classes'). [(n_b, K)]"""
    return [(new_logits[b, loc] - old_logits[b, loc]).pow(2) for b, loc in enumerate(locations)]


def box_distillation_at(new: GFLOutput, old: GFLOutput, old_classes: torch.Tensor, candidates: Sequence[torch.Tensor],
                        temperature: float, nms_iou: float) -> list[torch.Tensor]:
    """Per image `sum_i sum_side w_i T^2 mean_bins KL(softmax(d_old/T) || softmax(d_new/T))` over its
    `candidates` kept by class-wise NMS (IoU `nms_iou`) of the old model's decoded boxes, each
    scored by the old model's best old-class probability and labelled with that class;
    `w_i` = the new model's best old-class score, detached (a location the new model already
    treats as background distils less). The caller normalises over sides and images."""
    old_boxes = old.boxes()
    values = []
    for b, candidate in enumerate(candidates):
        score, label = old.cls_logits[b, candidate][:, old_classes].sigmoid().max(-1)
        keep = candidate[batched_nms(old_boxes[b, candidate], score, label, nms_iou)]
        weight = new.cls_logits[b, keep][:, old_classes].detach().sigmoid().max(-1).values
        log_p_new = F.log_softmax(new.reg_logits[b, keep] / temperature, -1)
        p_old = F.softmax(old.reg_logits[b, keep] / temperature, -1)
        kl = F.kl_div(log_p_new, p_old, reduction="none").mean(-1)  # [n, 4]
        values.append((weight[:, None] * kl).sum() * temperature**2)
    return values


# --------------------------------------------------------------------------- inference
def class_mask(num_classes: int, classes: Sequence[int] | None, device) -> torch.Tensor:
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    if classes is None:
        mask[:] = True
    else:
        idx = [c for c in classes if c < num_classes]
        mask[torch.as_tensor(idx, dtype=torch.long, device=device)] = True
    return mask


def postprocess(out: GFLOutput, classes: Sequence[int] | None, cfg: GFLConfig) -> list[dict[str, torch.Tensor]]:
    """Per image {"boxes", "scores", "labels"}: GFL's test rule with logits of other classes masked."""
    num_classes = out.cls_logits.shape[-1]
    scores = out.cls_logits.sigmoid().masked_fill(~class_mask(num_classes, classes, out.cls_logits.device), 0.0)
    boxes = out.boxes()
    # clipped to each image's own valid area (the whole input when unpadded), as mmdetection clips
    # to img_shape, the resized image before padding
    sizes = out.sizes().to(boxes.dtype)
    boxes = torch.minimum(boxes.clamp(min=0), sizes[:, None, [1, 0, 1, 0]])
    results = []
    for b in range(scores.shape[0]):
        kept_boxes, kept_scores, kept_labels = [], [], []
        for level in range(len(out.cls_feats)):
            at_level = torch.nonzero(out.levels == level).squeeze(1)
            s = scores[b, at_level].flatten()
            candidates = torch.nonzero(s > cfg.score_thresh).squeeze(1)
            if len(candidates) > cfg.candidates_per_level:
                candidates = candidates[s[candidates].topk(cfg.candidates_per_level).indices]
            loc, cls = at_level[candidates // max(num_classes, 1)], candidates % max(num_classes, 1)
            kept_boxes.append(boxes[b, loc])
            kept_scores.append(s[candidates])
            kept_labels.append(cls)
        bx, sc, lb = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels)
        keep = batched_nms(bx, sc, lb, cfg.nms_thresh)[: cfg.max_detections]
        results.append({"boxes": bx[keep], "scores": sc[keep], "labels": lb[keep]})
    return results


# --------------------------------------------------------------------------- augmentation
def hflip_batch(batch: DetectionBatch, p: float = 0.5, generator: torch.Generator | None = None) -> DetectionBatch:
    """Each image (and its boxes) flipped horizontally with probability `p`; in a padded batch
    only the image's valid area is flipped (its padding stays at the right)."""
    flip = torch.rand(len(batch), generator=generator) < p
    if not bool(flip.any()):
        return batch
    sizes = getattr(batch, "image_sizes", None)
    x = batch.x.clone()
    if sizes is None or bool((sizes[:, 1] == x.shape[-1]).all()):
        x[flip.to(x.device)] = x[flip.to(x.device)].flip(-1)
        widths = [x.shape[-1]] * len(batch)
    else:
        widths = sizes[:, 1].tolist()
        for b in torch.nonzero(flip).flatten().tolist():
            x[b, :, :, :widths[b]] = x[b, :, :, :widths[b]].flip(-1)
    targets = []
    for t, f, width in zip(batch.targets, flip.tolist(), widths):
        if f:
            boxes = t["boxes"].clone()
            boxes[:, 0], boxes[:, 2] = width - t["boxes"][:, 2], width - t["boxes"][:, 0]
            t = {**t, "boxes": boxes}
        targets.append(t)
    return DetectionBatch(x, targets, image_sizes=sizes)
