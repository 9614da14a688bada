"""SimpleCIL (Zhou et al., IJCV 2024, arXiv 2303.07338): a frozen pre-trained model and class prototypes.

Nothing is trained. When a class arrives, its prototype is the mean embedding of its
training images, taken with evaluation preprocessing (no train augmentation, backbone in
eval mode). The classifier is the cosine similarity between an image's embedding and every
seen class's prototype; the prediction is the arg-max. It is the must-beat baseline of the
pre-trained-model methods (their papers' tables list it beside L2P, EASE, TUNA), and it is
only as good as the backbone: give it pretrained weights (`--backbone
vit_base_patch16_224.augreg_in21k --pretrained`); on a randomly initialised backbone it is
a nearest-class-mean classifier on random features.

The prototype pass runs as one epoch of Lightning steps over the experience's data, so the
EdgeProfiler measures it as the method's training cost (forward passes only, no backward). The
prototypes (classes x embedding width, float64 buffers) are the classifier: the profiler counts them
in `total_params` and `stored_state_bytes` (`stored_state`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clbench.base import CLStrategy
from clbench.strategies._ptm import EASE_TABLE, MOS_TABLE
from clbench.models.backbones import PILOT_VIT_B16_IN21K, ptm_defaults
from clbench.models.freeze import eval_mode
from clbench.models.prototypes import ClassMeans
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo, Output, Phase


@register_strategy("simplecil")
class SimpleCIL(CLStrategy):
    """Frozen backbone; cosine classifier on per-class mean embeddings (prototypes)."""

    DEFAULTS = ptm_defaults(PILOT_VIT_B16_IN21K)  # PILOT's ViT-B/16-IN21K, 224 px, no normalisation; tiny ViT on tiny data
    # nothing is trained: the protocol is the backbone (DEFAULTS) and PILOT's class order (numpy seed 1993)
    PAPER_SETTINGS = {name: {"class_order": "paper"} for name in ("cifar100-20", "imagenet-r-10")}
    PUBLISHED = {
        "cifar100-20": {"metric": "final_avg_acc", "value": 0.8126, "source": EASE_TABLE},
        "imagenet-r-10": {"metric": "final_avg_acc", "value": 0.5455, "source": MOS_TABLE},
    }
    learns_by_gradient: ClassVar[bool] = False
    distributed_sums: ClassVar[tuple[str, ...]] = ("class_means.sums", "class_means.counts")  # DDP: summed over ranks

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.class_means = ClassMeans(self.num_classes, self.embedding_width())

    def make_head(self, in_features: int) -> nn.Module:
        return nn.Identity()  # the prototypes are the classifier

    def embedding_width(self) -> int:
        return self.backbone.num_features

    @property
    def prototypes(self) -> torch.Tensor:
        """Mean embedding of each class seen so far (rows of unseen classes are zero)."""
        return self.class_means.means.float()

    def stored_state(self) -> list[torch.Tensor]:
        """The prototypes: the classifier, held as buffers rather than parameters."""
        return [*super().stored_state(), *self.class_means.stored_state()]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's embedding, in eval mode (no dropout; BatchNorm statistics untouched)."""
        with eval_mode(self.backbone), torch.no_grad():
            return self.backbone(x)

    def forward(self, x: torch.Tensor) -> Output:
        features = self.embed(x)
        logits = F.normalize(features, dim=1) @ F.normalize(self.prototypes.to(features.dtype), dim=1).T
        return Output(logits, features)

    # ---- per experience: one pass over the data accumulates the new classes' embeddings
    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        return [Phase("prototypes", epochs=1)]

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        self.class_means.add(self.embed(batch.x), batch.y)
        return None

    def configure_optimizers(self):
        return None  # nothing is trained
