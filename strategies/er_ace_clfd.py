"""CLFD-ER-ACE: ER-ACE in CLFD's frequency domain (Liu et al., NeurIPS 2024); see `clfd.py` and `er_ace.py`."""

from __future__ import annotations

from dataclasses import dataclass

from clbench.strategies import er_ace
from clbench.strategies import clfd
from clbench.strategies.clfd import CLFDMixin, CLFDOptions, paper_settings

from clbench.models.backbones import CIFAR_RESNET18
from clbench.registry import register_strategy

_COMMON = {**clfd._COMMON, "lr": 0.03}


@dataclass(frozen=True)
class Config(er_ace.Config, CLFDOptions):
    pass


@register_strategy("er_ace_clfd")
class ERACECLFD(CLFDMixin, er_ace.ERACE):
    """CLFD over ER-ACE (asymmetric CE on masked, k-WTA current logits; replay of codes)."""

    Config = Config
    # Mammoth's ResNet-18 (3x3 stem, nf=64) on every benchmark of the paper, ImageNet-R at 224 px included
    DEFAULTS = {"cifar*": CIFAR_RESNET18, "tinyimagenet-*": CIFAR_RESNET18, "imagenet-r-*": CIFAR_RESNET18}
    # CLFD (Liu et al., NeurIPS 2024) Table 1, buffer 125, Class-IL: 58.68 (S-CIFAR-10) / 15.88 (S-Tiny-ImageNet)
    PAPER_SETTINGS = paper_settings({
        "cifar10-5": {**_COMMON, "epochs": 50},
        "tinyimagenet-10": {**_COMMON, "epochs": 50},
    })
    PUBLISHED = clfd.published("CLFD-ER-ACE", 0.5868, 0.1588)
