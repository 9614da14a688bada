"""CLFD-DER++: DER++ in CLFD's frequency domain (Liu et al., NeurIPS 2024); see `clfd.py` and `der_pp.py`.

DER++'s three terms unchanged; stored logits are the masked training logits of the
current batch, replay draws are codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from clbench.strategies import der_pp
from clbench.strategies import clfd
from clbench.strategies.clfd import CLFDMixin, CLFDOptions, paper_settings

from clbench.models.backbones import CIFAR_RESNET18
from clbench.registry import register_strategy

_COMMON = {**clfd._COMMON, "lr": 0.03, "beta": 0.5}


@dataclass(frozen=True)
class Config(der_pp.Config, CLFDOptions):
    pass


@register_strategy("der_pp_clfd")
class DERPPCLFD(CLFDMixin, der_pp.DERPP):
    """CLFD over DER++ (codes and masked logits in the buffer)."""

    Config = Config
    # Mammoth's ResNet-18 (3x3 stem, nf=64) on every benchmark of the paper, ImageNet-R at 224 px included
    DEFAULTS = {"cifar*": CIFAR_RESNET18, "tinyimagenet-*": CIFAR_RESNET18, "imagenet-r-*": CIFAR_RESNET18}
    # CLFD (Liu et al., NeurIPS 2024) Table 1, buffer 125, Class-IL: 58.81 (S-CIFAR-10) / 15.42 (S-Tiny-ImageNet)
    PAPER_SETTINGS = paper_settings({
        "cifar10-5": {**_COMMON, "alpha": 0.2, "epochs": 50},
        "tinyimagenet-10": {**_COMMON, "alpha": 0.1, "epochs": 100},
    })
    PUBLISHED = clfd.published("CLFD-DER++", 0.5881, 0.1542)
