"""iCaRL: Incremental Classifier and Representation Learning (Rebuffi et al., CVPR 2017; Mammoth implementation).

Experience t trains on its data joined with the stored exemplars.  Loss: binary
cross-entropy with logits over the seen classes; targets are one-hot for the current
experience's classes and sigmoid(old-model logits) for past classes, the old model being
a frozen copy taken at the start of the experience (+ Mammoth's explicit L2 term
wd_reg * sum(theta^2)).  At the end of each experience the memory is rebuilt,
class-balanced (budget / seen classes each, counts differing by at most one): old classes
keep the first exemplars of their herding order, new classes are chosen by herding on
penultimate features of their non-augmented images.  Prediction: nearest mean of
exemplars in feature space.  Class means are exact means (Mammoth's running halving of
batch means is not an exact mean). The class means (seen classes x feature width) are counted by
the profiler in `total_params` and `stored_state_bytes` (`stored_state`); the head, trained but not
used for prediction once the means exist, stays counted as a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from clbench.base import CLStrategy
from clbench.config import StrategyConfig, non_negative_integers, non_negative_numbers
from clbench.datasets import InMemoryDataset, concat, make_loader
from clbench.models.backbones import CIFAR_RESNET18
from clbench.models.buffers import ReservoirBuffer, herding_selection
from clbench.models.freeze import teacher_logits
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo


@dataclass(frozen=True)
class Config(StrategyConfig):
    buffer_size: int = 200
    wd_reg: float = 1e-5  # Mammoth adds wd_reg * sum of squared parameters to the loss

    def __post_init__(self):
        super().__post_init__()
        non_negative_integers(self, "buffer_size")
        non_negative_numbers(self, "wd_reg")


@register_strategy("icarl")
class ICaRL(CLStrategy):
    """iCaRL: BCE distillation from the previous model, herding exemplars, nearest-mean-of-exemplars prediction."""

    Config = Config
    DEFAULTS = {"cifar*": CIFAR_RESNET18, "tinyimagenet-*": CIFAR_RESNET18}  # Mammoth's ResNet-18 (3x3 stem)
    PAPER_SETTINGS = {  # DER paper's Mammoth runs, buffer 200 (Mammoth protocol: er.MAMMOTH_PROTOCOL)
        name: {"backbone": "resnet18_cifar", "pretrained": False, "class_order": "natural", "optimizer": "sgd",
               "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "constant", "batch_size": 32, "global_batch_size": 32,
               "buffer_size": 200, "wd_reg": 1e-5, **values}
        for name, values in (("cifar10-5", {"lr": 0.1, "epochs": 50}), ("tinyimagenet-10", {"lr": 0.03, "epochs": 100}))
    }
    PUBLISHED = {
        "cifar10-5": {"metric": "final_avg_acc", "value": 0.4902, "source": "DER paper (Buzzega et al. 2020), Table 2, "
                      "S-CIFAR-10 Class-IL, buffer 200", "note": "value recalled in the method notes, not re-read"},
        "tinyimagenet-10": {"metric": "final_avg_acc", "value": 0.0753, "source": "DER paper (Buzzega et al. 2020), "
                            "Table 2, S-Tiny-ImageNet Class-IL, buffer 200",
                            "note": "value recalled in the method notes, not re-read"},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer = ReservoirBuffer(self.cfg.buffer_size, seed=self.seed)  # used as a plain store, filled by herding
        self.old_model = None
        self.class_means: torch.Tensor | None = None

    # ---- experience level
    def on_experience_start(self, exp: ExperienceInfo) -> None:
        self.old_model = None if exp.is_first else self.frozen_copy()
        super().on_experience_start(exp)
        self.class_means = None  # stale once training moves the features

    def training_data(self, exp: ExperienceInfo, train_set: Dataset) -> Dataset:
        if self.buffer.is_empty:
            return train_set
        stored = self.buffer.all()
        return concat([train_set, InMemoryDataset(stored["x"], stored["y"], getattr(train_set, "transform", None))])

    # ---- batch level
    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.remember(self(batch.x))
        targets = F.one_hot(batch.y, out.logits.shape[1]).to(out.logits.dtype)
        if self.old_model is not None:
            past = len(self.experience.past_classes)
            targets[:, :past] = torch.sigmoid(teacher_logits(self.old_model, batch.x)[:, :past])
        losses = {"bce": F.binary_cross_entropy_with_logits(out.logits, targets)}
        if self.cfg.wd_reg:
            losses["wd"] = self.cfg.wd_reg * sum((p**2).sum() for p in self.trainable_parameters())
        return losses

    # ---- memory and class means
    def on_experience_end(self, exp: ExperienceInfo, train_set: Dataset) -> None:
        self.rebuild_memory(exp, train_set)
        self.class_means = self.exemplar_means(exp)
        super().on_experience_end(exp, train_set)

    @torch.no_grad()
    def rebuild_memory(self, exp: ExperienceInfo, train_set: Dataset) -> None:
        quotas = balanced_quotas(self.cfg.buffer_size, exp.seen_classes)
        old = self.buffer.all()
        xs, ys = [], []
        for c in exp.past_classes:  # herding order: keeping a prefix keeps a herding selection
            rows = old["x"][old["y"] == c][: quotas[c]]
            xs.append(rows), ys.append(torch.full((len(rows),), c, dtype=torch.long))
        data = _tensors(train_set)
        for c in exp.classes:
            x_c = data[0][data[1] == c]
            chosen = herding_selection(self.features(x_c), quotas[c])
            xs.append(x_c[chosen]), ys.append(torch.full((len(chosen),), c, dtype=torch.long))
        self.buffer.replace(x=torch.cat(xs), y=torch.cat(ys))

    @torch.no_grad()
    def exemplar_means(self, exp: ExperienceInfo) -> torch.Tensor:
        stored = self.buffer.all()
        feats = self.features(stored["x"])
        means = torch.zeros((len(exp.seen_classes), feats.shape[1]))
        for c in exp.seen_classes:
            means[c] = feats[stored["y"] == c].mean(dim=0)
        return means

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        was_training = self.training
        self.eval()
        out = torch.cat([self.backbone(x[i : i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)])
        self.train(was_training)
        return out

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.class_means is None:  # before the first memory exists
            return self(x).logits
        feats = self.backbone(x)
        return -torch.cdist(feats, self.class_means.to(feats.device)) ** 2

    def stored_state(self) -> list[torch.Tensor]:
        """The class means: the nearest-mean classifier, a plain tensor rather than a parameter."""
        return [*super().stored_state(), *([self.class_means] if self.class_means is not None else [])]

    # ---- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}
        if self.class_means is not None:
            state["class_means"] = self.class_means.clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.buffer.load_state_dict({k[len("buffer."):]: v for k, v in state.items() if k.startswith("buffer.")})
        self.class_means = state["class_means"].clone() if "class_means" in state else None

    def report(self) -> dict:
        return {"buffer_size": self.cfg.buffer_size, "buffer_bytes": self.buffer.nbytes(), "buffer_counts": self.buffer.class_counts()}


def balanced_quotas(budget: int, classes) -> dict[int, int]:
    """budget // n exemplars per class, the remainder spread one each over the first classes."""
    classes = list(classes)
    base, extra = divmod(budget, len(classes))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (non-augmented) inputs and labels of an experience's training set."""
    if isinstance(dataset, InMemoryDataset):
        return dataset.x, dataset.y
    batches = list(make_loader(dataset, 256, shuffle=False))
    return torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])
