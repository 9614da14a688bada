"""CLS-ER: Complementary Learning System based Experience Replay (Arani et al., ICLR 2022; Mammoth code).

A working model plus two exponential-moving-average copies of it: a plastic one
(updated often) and a stable one (updated rarely); after each step each copy is
updated with probability equal to its update frequency, with decay
min(1 - 1/(step + 1), alpha).  Loss: ER's cross-entropy over current + replay samples
+ reg_weight * MSE(working logits on the replay batch, logits of whichever EMA copy
gives the true label the higher probability).  Inference uses the stable copy.

As in the Mammoth code, only parameters are averaged; the copies run their forward
passes in training mode, so their BatchNorm statistics follow the replay batches they
see.  Heads grow per experience: the copies' new rows start equal to the working model's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from clbench.strategies import er
from clbench.strategies._replay import Replay
from torch import nn

from clbench.config import non_negative_numbers, unit_interval
from clbench.models.backbones import CIFAR_RESNET18
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo


@dataclass(frozen=True)
class Config(er.Config):
    reg_weight: float = 0.15
    stable_update_freq: float = 0.2
    plastic_update_freq: float = 0.9
    stable_alpha: float = 0.999
    plastic_alpha: float = 0.999

    def __post_init__(self):
        super().__post_init__()
        non_negative_numbers(self, "reg_weight")
        unit_interval(self, "stable_update_freq", "plastic_update_freq", "stable_alpha", "plastic_alpha")


@register_strategy("cls_er")
class CLSER(Replay):
    """CLS-ER: replay with consistency to plastic/stable EMA copies; predicts with the stable copy."""

    Config = Config
    DEFAULTS = {"cifar*": CIFAR_RESNET18, "tinyimagenet-*": CIFAR_RESNET18}  # Mammoth's ResNet-18 (3x3 stem)
    PAPER_SETTINGS = {  # CLFD's Table 1 runs, buffer 125 (stable 0.1/0.2, plastic 0.5/0.9 for buffers 50/125), EMA 0.999
        "cifar10-5": {**er.MAMMOTH_PROTOCOL, "lr": 0.1, "epochs": 50, "replay_batch_size": 32, "buffer_size": 125,
                      "reg_weight": 0.15, "stable_update_freq": 0.2, "plastic_update_freq": 0.9,
                      "stable_alpha": 0.999, "plastic_alpha": 0.999},
        "tinyimagenet-10": {**er.MAMMOTH_PROTOCOL, "lr": 0.1, "epochs": 50, "replay_batch_size": 32, "buffer_size": 125,
                            "reg_weight": 0.1, "stable_update_freq": 0.1, "plastic_update_freq": 0.16,
                            "stable_alpha": 0.999, "plastic_alpha": 0.999},
    }
    PUBLISHED = {
        "cifar10-5": {"metric": "final_avg_acc", "value": 0.5357, "source": "CLFD paper (NeurIPS 2024), Table 1, "
                      "S-CIFAR-10 Class-IL, buffer 125"},
        "tinyimagenet-10": {"metric": "final_avg_acc", "value": 0.1635, "source": "CLFD paper (NeurIPS 2024), Table 1, "
                            "S-Tiny-ImageNet Class-IL, buffer 125"},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema = nn.ModuleDict({"plastic": self.ema_copy(), "stable": self.ema_copy()})
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.ema_generator = torch.Generator().manual_seed(self.seed + 7)

    def working_modules(self) -> nn.ModuleDict:
        """The parts of the working model that the EMA copies average (variants add theirs)."""
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def ema_copy(self) -> nn.ModuleDict:
        net = copy.deepcopy(self.working_modules())
        net.requires_grad_(False)
        return net

    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        for copy_ in self.ema.values():  # new head rows start as the working model's
            old = copy_["head"].out_features
            if copy_["head"].grow(self.head.out_features):
                with torch.no_grad():
                    for mine, theirs in zip(copy_["head"].parameters(), self.head.parameters()):
                        mine[old:] = theirs[old:]
                copy_["head"].requires_grad_(False)

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.current_output(batch)
        replay = self.draw()
        if not replay:
            return {"ce": F.cross_entropy(out.logits, batch.y)}
        with torch.no_grad():
            target = self.consistency_target(replay["x"], replay["y"])
        replay_logits = self.replay_output(replay["x"]).logits
        consistency = self.cfg.reg_weight * F.mse_loss(replay_logits, target)
        # ER's term: current and replayed samples in one cross-entropy (a second replay forward, as in Mammoth)
        ce = F.cross_entropy(torch.cat([out.logits, self.replay_output(replay["x"]).logits]), torch.cat([batch.y, replay["y"]]))
        return {"ce": ce, "consistency": consistency}

    def consistency_target(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        stable, plastic = self.ema_logits("stable", x), self.ema_logits("plastic", x)
        p_stable = F.softmax(stable, 1).gather(1, y[:, None])
        p_plastic = F.softmax(plastic, 1).gather(1, y[:, None])
        return torch.where(p_stable > p_plastic, stable, plastic)

    def ema_logits(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """An EMA copy's logits on replay-domain inputs."""
        net = self.ema[which]
        return net["head"](net["backbone"](x))

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.ema_steps += 1
        for which, freq, alpha in (("plastic", self.cfg.plastic_update_freq, self.cfg.plastic_alpha),
                                   ("stable", self.cfg.stable_update_freq, self.cfg.stable_alpha)):
            if float(torch.rand(1, generator=self.ema_generator)) < freq:
                self.update_ema(which, alpha)

    @torch.no_grad()
    def update_ema(self, which: str, alpha: float) -> None:
        decay = min(1 - 1 / (int(self.ema_steps) + 1), alpha)
        working = self.working_modules()
        for name, part in self.ema[which].items():
            for ema_p, p in zip(part.parameters(), working[name].parameters()):
                ema_p.mul_(decay).add_(p, alpha=1 - decay)

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.ema_logits("stable", x)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**super().extra_state(), "ema_generator": self.ema_generator.get_state()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state)
        self.ema_generator.set_state(state["ema_generator"])
