"""CLFD-CLS-ER: CLS-ER in CLFD's frequency domain (Liu et al., NeurIPS 2024); see `clfd.py` and `cls_er.py`.

The two EMA copies average the whole CLFD network (encoder included); they score
replayed codes through backbone -> k-WTA -> head, and the stable copy predicts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from clbench.strategies import cls_er
from clbench.strategies import clfd
from clbench.strategies.clfd import CLFDMixin, CLFDOptions, kwta, paper_settings
from torch import nn

from clbench.models.backbones import CIFAR_RESNET18
from clbench.registry import register_strategy

_COMMON = {**clfd._COMMON, "lr": 0.1, "stable_alpha": 0.999, "plastic_alpha": 0.999}


@dataclass(frozen=True)
class Config(cls_er.Config, CLFDOptions):
    pass


@register_strategy("cls_er_clfd")
class CLSERCLFD(CLFDMixin, cls_er.CLSER):
    """CLFD over CLS-ER (EMA copies of the whole CLFD net, stable copy predicts)."""

    Config = Config
    # Mammoth's ResNet-18 (3x3 stem, nf=64) on every benchmark of the paper, ImageNet-R at 224 px included
    DEFAULTS = {"cifar*": CIFAR_RESNET18, "tinyimagenet-*": CIFAR_RESNET18, "imagenet-r-*": CIFAR_RESNET18}
    # CLFD (Liu et al., NeurIPS 2024) Table 1, buffer 125, Class-IL: 59.98 (S-CIFAR-10) / 18.73 (S-Tiny-ImageNet)
    PAPER_SETTINGS = paper_settings({
        "cifar10-5": {**_COMMON, "epochs": 50, "reg_weight": 0.15, "stable_update_freq": 0.2, "plastic_update_freq": 0.9},
        "tinyimagenet-10": {**_COMMON, "epochs": 50, "reg_weight": 0.1, "stable_update_freq": 0.1, "plastic_update_freq": 0.16},
    })
    PUBLISHED = clfd.published("CLFD-CLS-ER", 0.5998, 0.1873)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for net in self.ema.values():  # the encoder exists only now, after the base built its copies
            net["encoder"] = copy.deepcopy(self.encoder).requires_grad_(False)

    def working_modules(self) -> nn.ModuleDict:
        modules = super().working_modules()
        if "encoder" in self._modules:
            modules["encoder"] = self.encoder
        return modules

    def ema_logits(self, which: str, z: torch.Tensor) -> torch.Tensor:
        net = self.ema[which]
        return net["head"](kwta(net["backbone"](z), self.k))

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.ema_logits("stable", self.ema["stable"]["encoder"](x))
