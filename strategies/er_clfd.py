"""CLFD-ER: experience replay in CLFD's frequency domain (Liu et al., NeurIPS 2024); see `clfd.py`.

Each step: CE on the current batch (class-wise masked, k-WTA) + CE on a separate replay
batch of stored codes (augmented in the code domain, k-WTA, no class mask), one SGD step
on the sum, then the non-augmented current images are encoded and reservoir-inserted.
This is `clfd` with its default base, under its own name and with ER's options only.
"""

from __future__ import annotations

from dataclasses import dataclass

from clbench.strategies import er
from clbench.strategies.clfd import CLFD, CLFDOptions

from clbench.models.backbones import CIFAR_RESNET18
from clbench.registry import register_strategy


@dataclass(frozen=True)
class Config(er.Config, CLFDOptions):
    pass


@register_strategy("er_clfd")
class ERCLFD(CLFD):
    """CLFD over ER: frequency-domain codes in, class-aware k-WTA feature selection out."""

    Config = Config
    # Mammoth's ResNet-18 (3x3 stem, nf=64) on every benchmark of the paper, ImageNet-R at 224 px included
    DEFAULTS = {"cifar*": CIFAR_RESNET18, "tinyimagenet-*": CIFAR_RESNET18, "imagenet-r-*": CIFAR_RESNET18}
