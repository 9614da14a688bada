"""The frozen-base DETR family (P2IOD, CL-DETR, fine-tuning): the trainer, its detector and base.

The detector is a Config choice: `detector="tiny"` (`TinyDETR`, CPU-test size, the default) or
`detector="deformable_detr"` (Deformable DETR R50 through Hugging Face transformers, the papers'
detector: `clbench.models.detection.deformable_detr`; the `--paper-settings` of voc-*/coco-*
select it). The base (`base`) is where its pretrained weights come from:

| base | tiny | deformable_detr |
|---|---|---|
| `shapes-pretrain` (default) | pre-trained on a separate ShapesIOD pool, cached | refused |
| `coco` | refused | COCO-pretrained `SenseTime/deformable-detr` from the hub cache (`base_download=true` fetches it) |
| `imagenet` | refused | only the ResNet-50 (torchvision's ImageNet weights via timm's local cache) |
| `random` | random (mechanics tests) | random |
| a path | a TinyDETR state_dict | a weight file or `save_pretrained` folder |

`shapes-pretrain` (8 synthetic 64-px shapes) is refused on a stream of more than 8 classes
(voc-*, coco-*), and `coco` on an 80-class stream (a COCO-pretrained base has already learnt
every COCO class). The class head is never loaded: the stream's classes get a fresh one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from clbench.strategies._detection import DetectionStrategy
from torch import nn

from clbench.config import StrategyConfig, non_negative_numbers
from clbench.errors import UsageError
from clbench.models.detection.detr import (
    DetrOutput,
    SetLossWeights,
    TinyDETR,
    detections,
    mask_classes,
    normalised_targets,
    set_loss,
)
from clbench.models.detection.padding import valid_sizes_for
from clbench.types import ExperienceInfo


# --------------------------------------------------------------------------- the pretrained base
def cache_root() -> Path:
    return Path(os.environ.get("CLBENCH_CACHE") or "~/.cache/clbench").expanduser()


def pretrain_shapes_base(settings: dict[str, Any], cache_dir: str | os.PathLike | None = None,
                         verbose: bool = True) -> Path:
    """The path of a TinyDETR pre-trained on a separate ShapesIOD pool of all 8 shapes, training
    it first if no cached file has these settings.

    This stands in for the COCO- (or Objects365-) pretrained DETR the method starts from: a
    detector trained on *other* images that contain the benchmark's classes among others
    ("like COCO -> VOC"). It is trained jointly on every class, all parameters, with the set loss
    (AdamW lr 1e-3, wd 1e-4, clip 0.1); its class head is discarded when loaded
    (`load_base`), the rest (backbone, encoder, decoder, queries, box head) becomes the frozen
    base. The pool is generated with `settings["seed"]`, which must differ from the
    benchmark's seeds. Training is a plain loop outside the run's Trainer, like downloading
    pretrained weights: it is not part of any run's training cost. The file is keyed by the
    settings (`images`, `epochs`, `size`, `seed`, `batch_size`) and written atomically.
    Measured with the strategies' defaults (300 images, 40 epochs, batch 8): mAP50 0.57 on 100
    held-out images of the 8 shapes, 11.5 min on 2 busy shared cores (once per cache).
    """
    keys = ("images", "epochs", "size", "seed", "batch_size")
    settings = {k: settings[k] for k in keys}
    tag = hashlib.sha1(json.dumps({"model": "TinyDETR-v2", **settings}, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    path = root / f"tinydetr-shapes-{tag}.pt"
    if path.exists():
        return path
    from clbench.scenarios.shapes import generate_shapes

    from clbench.datasets import detection_collate

    pool = generate_shapes(settings["images"], size=settings["size"], num_classes=8, seed=settings["seed"])
    with torch.random.fork_rng():
        torch.manual_seed(settings["seed"])
        model = TinyDETR(num_classes=8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        order = torch.Generator().manual_seed(settings["seed"])
        model.train()
        for epoch in range(settings["epochs"]):
            perm = torch.randperm(len(pool), generator=order).tolist()
            total = 0.0
            for start in range(0, len(perm), settings["batch_size"]):
                batch = detection_collate([pool[i] for i in perm[start:start + settings["batch_size"]]])
                out = model(batch.x)
                loss = sum(set_loss(out, normalised_targets(batch.targets, batch.x.shape[-2:])).values())
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                optimizer.step()
                total += loss.item()
            if verbose and (epoch + 1) % 10 == 0:
                print(f"TinyDETR base pre-training: epoch {epoch + 1}/{settings['epochs']}, loss {total:.2f}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def load_base(model: nn.Module, path: str | os.PathLike, download: bool = False) -> None:
    """Load pretrained weights into `model`, except its class head (the stream's classes get a
    fresh head, as a COCO-pretrained DETR gets one for VOC). A TinyDETR reads a TinyDETR
    state_dict from `path`; a Deformable DETR reads "coco", "imagenet" or a path
    (`load_deformable_detr_weights`)."""
    if not isinstance(model, TinyDETR):
        from clbench.models.detection.deformable_detr import load_deformable_detr_weights

        return load_deformable_detr_weights(model, str(path), download=download)
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"base detector weights not found: {str(p)!r} (expected a TinyDETR state_dict saved with torch.save)")
    state = torch.load(p, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("class_head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("class_head.")]
    if missing or unexpected:
        raise UsageError(f"{str(p)!r} is not a TinyDETR of this size: missing {missing[:5]}, unexpected {unexpected[:5]}")


DETECTORS = ("tiny", "deformable_detr")
SHAPES_CLASSES = 8  # ShapesIOD's classes: what a shapes-pretrain base has learnt
COCO_CLASSES = 80


def base_problem(detector: str, base: str, num_classes: int) -> str | None:
    """Why `base` cannot be the pretrained base of `detector` on a stream of `num_classes` classes
    (None: it can)."""
    if base == "shapes-pretrain" and detector != "tiny":
        return (f"base='shapes-pretrain' is a TinyDETR base; detector={detector!r} expects base=coco, base=imagenet, "
                f"base=random or a weights path")
    if base == "shapes-pretrain" and num_classes > SHAPES_CLASSES:
        return (f"base='shapes-pretrain' (a 64-px TinyDETR pre-trained on {SHAPES_CLASSES} synthetic shapes) cannot "
                f"be the base of a {num_classes}-class stream (voc-*, coco-*); expected --paper-settings "
                f"(Deformable DETR) or detector=deformable_detr with base=coco, base=imagenet or a weights path")
    if base in ("coco", "imagenet") and detector == "tiny":
        return f"base={base!r} names Deformable DETR weights; expected detector=deformable_detr"
    if base == "coco" and num_classes == COCO_CLASSES:
        return ("base='coco' (the COCO-pretrained Deformable DETR) has learnt all 80 COCO classes, so it cannot be the "
                "base of an incremental COCO stream; pass base=FILE (a detector pretrained on other data: the P2IOD "
                "paper's COCO base is an Objects365-pretrained Co-DINO) or base=imagenet")
    return None


def make_detector(detector: str, num_classes: int, num_queries: int = 0) -> nn.Module:
    """A randomly initialised detector of the family (`num_queries` 0: its own default)."""
    if detector == "deformable_detr":
        from clbench.models.detection.deformable_detr import DeformableDETR

        return DeformableDETR(num_classes, num_queries=num_queries or 300)
    return TinyDETR(num_classes, **({"num_queries": num_queries} if num_queries else {}))


# --------------------------------------------------------------------------- strategies on a frozen base
@dataclass(frozen=True)
class FrozenBaseDetrConfig(StrategyConfig):
    """A frozen pretrained DETR (TinyDETR or Deformable DETR) with trained class (and box) heads."""

    optimizer: str = "adamw"
    lr: float = 1e-3  # class head (and prompts)
    box_lr: float = 1e-4  # box head
    weight_decay: float = 1e-4
    clip_grad: float = 0.1  # max gradient norm (0: off)
    detector: str = "tiny"  # "tiny" (TinyDETR) or "deformable_detr" (Deformable DETR R50, transformers)
    num_queries: int = 0  # object queries (0: the detector's own, 12 tiny, 300 Deformable DETR)
    # where the base's weights come from (see the module docstring): "shapes-pretrain" (tiny: pre-trained
    # on a separate ShapesIOD pool, cached), "coco" / "imagenet" (deformable_detr), "random" (a random
    # frozen base: mechanics tests only), or a path of the detector's weights
    base: str = "shapes-pretrain"
    base_download: bool = False  # base=coco: fetch the checkpoint from the Hugging Face hub if not cached
    base_images: int = 300
    base_epochs: int = 40
    base_seed: int = 10_000
    base_size: int = 64
    base_batch_size: int = 8  # 38 steps an epoch: DETR needs steps more than epochs
    freeze_old_rows: bool = True  # old classes' class-head rows are not trained
    # training-batch augmentation (`clbench.models.detection.augment.TRAIN_AUGMENTS`): "none", or
    # "detr_multiscale" (DETR's / Deformable DETR's flip, multi-scale resize and random crop; the
    # Deformable-DETR `PAPER_SETTINGS` turn it on)
    train_augment: str = "none"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        non_negative_numbers(self, "box_lr", "clip_grad", "num_queries")
        if self.detector not in DETECTORS:
            raise UsageError(f"detector={self.detector!r} is invalid; expected one of: {', '.join(DETECTORS)}")
        from clbench.models.detection.augment import TRAIN_AUGMENTS

        if self.train_augment not in TRAIN_AUGMENTS:
            raise UsageError(f"train_augment={self.train_augment!r} is invalid; expected one of: "
                             f"{', '.join(TRAIN_AUGMENTS)}")


class FrozenBaseDetrStrategy(DetectionStrategy):
    """A frozen pretrained DETR (`cfg.detector`) whose class head rows of the current classes (and of old
    classes unless `freeze_old_rows`) and whose box head (at `box_lr`) are trained.

    Rows of classes not trained in an experience have `requires_grad` off, so they get no
    gradient and, being outside the optimiser, no weight decay either: they stay exactly fixed.
    The frozen base stays in eval mode (BatchNorm statistics never move).
    """

    Config: ClassVar[type] = FrozenBaseDetrConfig
    detector_name: ClassVar[str] = "tiny_detr"  # the default detector's name; results record `model_name(cfg)`
    MODEL_NAMES: ClassVar[dict[str, str]] = {"tiny": "tiny_detr", "deformable_detr": "deformable_detr_r50"}

    @classmethod
    def model_name(cls, cfg) -> str:
        return cls.MODEL_NAMES.get(getattr(cfg, "detector", "tiny"), cls.detector_name)

    @classmethod
    def run_flag_settings(cls, cfg, pretrained: bool, weights: str | None, download: bool) -> dict:
        """`--weights FILE` -> `base=FILE` (a TinyDETR state_dict, or a Deformable DETR weight file /
        `save_pretrained` folder); `--pretrained` -> a pretrained base where the Config's is
        `random` (`shapes-pretrain` for TinyDETR, `coco` for Deformable DETR; a pretrained base
        already named stays); `--download` -> `base_download=true` (the `coco` checkpoint is
        fetched into the hub cache only then)."""
        out: dict = {}
        if weights:
            out["base"] = weights
        elif pretrained and cfg.base == "random":
            out["base"] = "shapes-pretrain" if cfg.detector == "tiny" else "coco"
        elif pretrained and cfg.base == "shapes-pretrain" and cfg.detector != "tiny":
            out["base"] = "coco"
        if download:
            out["base_download"] = True
        return out
    contract_overrides: ClassVar[dict[str, Any]] = {"base": "random"}

    @classmethod
    def model_weights(cls, cfg) -> list[str]:
        """The base's file or folder (Deformable DETR's `coco` / `imagenet` / path, a TinyDETR
        state_dict path); none for `random` and for `shapes-pretrain`, which is trained on demand."""
        if cfg.base in ("random", "shapes-pretrain"):
            return []
        if cfg.detector == "deformable_detr":
            from clbench.models.detection.deformable_detr import base_weights_file

            return [str(base_weights_file(cfg.base, cfg.base_download))]
        if cfg.base in ("coco", "imagenet"):
            return []  # refused with its reason when the detector is built (`base_problem`)
        path = Path(cfg.base).expanduser()
        if not path.is_file():
            raise UsageError(f"base detector weights not found: {str(path)!r} (expected a TinyDETR state_dict saved "
                             f"with torch.save)")
        return [str(path)]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_rows = torch.zeros(self.num_classes, dtype=torch.bool)  # class-head rows trained now

    def fresh_detector(self, num_classes: int) -> nn.Module:
        """The configured detector at its seeded random init."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return make_detector(self.cfg.detector, num_classes, self.cfg.num_queries)

    def build_detector(self, num_classes: int) -> nn.Module:
        cfg = self.cfg
        problem = base_problem(cfg.detector, cfg.base, num_classes)
        if problem is not None:
            raise UsageError(problem)
        detector = self.fresh_detector(num_classes)
        if cfg.base == "shapes-pretrain":
            load_base(detector, pretrain_shapes_base({"images": cfg.base_images, "epochs": cfg.base_epochs, "size": cfg.base_size,
                                                      "seed": cfg.base_seed, "batch_size": cfg.base_batch_size}))
        elif cfg.base != "random":
            load_base(detector, cfg.base, download=cfg.base_download)
        detector.requires_grad_(False)
        detector.eval()
        return detector

    @property
    def class_head(self) -> nn.Linear:
        return self.detector.class_head

    def head_modules(self) -> dict[str, nn.Module]:
        return {"class_head": self.detector.class_head, "box_head": self.detector.box_head}

    def train(self, mode: bool = True):
        super().train(mode)
        self.detector.eval()  # the base is frozen: its BatchNorm keeps the pretrained statistics
        return self

    # ----------------------------------------------------------- experience level
    def trained_classes(self, exp: ExperienceInfo) -> tuple[int, ...]:
        return exp.classes if self.cfg.freeze_old_rows else exp.seen_classes

    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        self.class_head.requires_grad_(True)
        self.detector.box_head.requires_grad_(self.cfg.box_lr > 0)  # Co-DINO's variant trains classifiers only
        self.trained_rows = torch.zeros(self.num_classes, dtype=torch.bool)
        self.trained_rows[list(self.trained_classes(exp))] = True

    def loss_weights(self) -> SetLossWeights:
        return SetLossWeights(alpha=self.cfg.focal_alpha, gamma=self.cfg.focal_gamma)

    def seen_loss(self, out: DetrOutput, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The set loss with logits of unseen classes masked."""
        masked = DetrOutput(mask_classes(out.logits, self.experience.seen_classes), out.boxes, out.states)
        return set_loss(masked, targets, self.loss_weights())

    # ----------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.class_head.parameters()), "lr": self.cfg.lr},
                {"params": list(self.detector.box_head.parameters()), "lr": self.cfg.box_lr}]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.parameter_groups() if g["lr"] > 0 for p in g["params"]]

    def optimizer_params(self) -> list[dict[str, Any]]:
        return [g for g in self.parameter_groups() if g["lr"] > 0]

    def training_step(self, batch, batch_idx: int):
        with self.untrained_rows_fixed():
            return super().training_step(batch, batch_idx)

    def total_loss(self, batch, batch_idx: int) -> torch.Tensor:
        # the training augmentation reshapes and re-pads the batch before any forward, so every loss
        # term, pseudo-label and teacher of the step sees the same augmented images
        return super().total_loss(self.training_batch(batch), batch_idx)

    def training_batch(self, batch):
        """The batch after the Config's `train_augment` (one fresh draw per image and step)."""
        from clbench.models.detection.augment import TRAIN_AUGMENTS, augment_batch

        return augment_batch(batch, TRAIN_AUGMENTS[self.cfg.train_augment])

    @contextlib.contextmanager
    def untrained_rows_fixed(self):
        """Class-head rows not trained now are written back after the step: one weight tensor holds
        every class, and weight decay (decoupled in AdamW, in the gradient for SGD/Adam) would
        still move rows whose loss gradient is zero."""
        fixed = ~self.trained_rows.to(self.class_head.weight.device)
        weight, bias = self.class_head.weight[fixed].clone(), self.class_head.bias[fixed].clone()
        try:
            yield
        finally:
            with torch.no_grad():
                self.class_head.weight[fixed] = weight
                self.class_head.bias[fixed] = bias

    def on_before_optimizer_step(self, optimizer) -> None:
        fixed = ~self.trained_rows.to(self.class_head.weight.device)
        for p in (self.class_head.weight, self.class_head.bias):
            if p.grad is not None:
                p.grad[fixed] = 0  # before clipping: the norm is that of what is actually trained
        if self.cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.clip_grad)

    # ----------------------------------------------------------- inference
    def seen(self) -> tuple[int, ...]:
        return self.experience.seen_classes if self.experience is not None else ()

    def inference_outputs(self, x: torch.Tensor) -> DetrOutput:
        return self.detector(x)

    @torch.no_grad()
    def predict_detections(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = self.inference_outputs(x)
        seen = self.seen()
        # boxes are normalised by each image's valid size: scaled back by it (a padded batch's
        # sizes are active while `detect` runs; unpadded: x's own size)
        sizes = valid_sizes_for(x)
        size = x.shape[-2:] if sizes is None else sizes
        return detections(mask_classes(out.logits[-1], seen) if seen else out.logits[-1], out.boxes[-1], size, seen)
