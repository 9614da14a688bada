"""AdaptFormer parallel adapters for timm Vision Transformers.

The pre-trained-model methods (APER, RanPAC, EASE, TUNA and the DAF, SAEF and SGDS methods
built on TUNA) tune a frozen ViT through a bottleneck adapter in every block. It reads the
residual stream after attention (the input of `norm2`) and its output is added to the MLP's:

    x <- x + attn(norm1(x))
    x <- x + mlp(norm2(x)) + a(x),    a(x) = scale * W_up ReLU(W_down x + b_d) + b_u

with scale 0.1, dropout on the bottleneck, W_down Kaiming-uniform and W_up, b_d, b_u zero,
so a fresh adapter leaves the network's function unchanged.  The formula follows the TUNA
paper (Wang, Zhou, Ye, ICCV 2025); the released AdaptFormer/PILOT code also multiplies b_u by the scale, which spans the
same functions and only changes b_u's effective step size.

The backbone's modules and `state_dict` stay as timm built them (pretrained weights load and
compare as usual): `AdapterRouter` hooks each block's `norm2` (keeps its input) and `mlp`
(adds the active adapter's output), and `router.using(adapters)` chooses which
`AdapterSet` runs, so a method can hold one set per task and run the backbone with any of
them, or with none.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clbench.config import StrategyConfig, positive_integers, probabilities_below_one
from clbench.errors import UsageError
from clbench.models.freeze import eval_mode


class Adapter(nn.Module):
    """a(x) = scale * W_up ReLU(W_down x + b_d) + b_u, with dropout on the bottleneck."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim, bias=False)
        self.up_bias = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor, unit_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`unit_mask` (batch x bottleneck, 0/1) keeps each sample's bottleneck units (SGDS routing)."""
        hidden = F.relu(self.down(x))
        if unit_mask is not None:
            hidden = hidden * unit_mask.reshape(len(unit_mask), *[1] * (hidden.dim() - 2), -1)
        return self.scale * self.up(self.dropout(hidden)) + self.up_bias


class AdapterSet(nn.Module):
    """One adapter per transformer block."""

    def __init__(self, dim: int, depth: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.adapters = nn.ModuleList(Adapter(dim, bottleneck, scale, dropout) for _ in range(depth))

    def __getitem__(self, block: int) -> Adapter:
        return self.adapters[block]

    def __len__(self) -> int:
        return len(self.adapters)

    @classmethod
    def for_vit(cls, vit: nn.Module, bottleneck: int, scale: float = 0.1, dropout: float = 0.1) -> "AdapterSet":
        blocks = vit_blocks(vit)
        return cls(blocks[0].norm2.normalized_shape[0], len(blocks), bottleneck, scale, dropout)


def vit_blocks(vit: nn.Module) -> nn.Sequential:
    """The transformer blocks of a timm ViT; a clear error for any other backbone."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not len(blocks) or not all(hasattr(b, "norm2") and hasattr(b, "mlp") for b in blocks):
        raise UsageError(f"backbone {type(vit).__name__} has no ViT blocks (norm2 + mlp); adapters need a timm "
                         "Vision Transformer, e.g. --backbone clbench_vit_tiny or vit_base_patch16_224")
    return blocks


class AdapterRouter:
    """Runs a ViT's blocks with the active `AdapterSet` (or none). Holds no parameters."""

    def __init__(self, vit: nn.Module):
        blocks = vit_blocks(vit)
        self.depth = len(blocks)
        self.active: AdapterSet | None = None
        self.unit_mask: torch.Tensor | None = None
        self._block_inputs: list[torch.Tensor | None] = [None] * self.depth
        self._handles = []
        for i, block in enumerate(blocks):
            self._handles.append(block.norm2.register_forward_pre_hook(partial(self._keep_input, i)))
            self._handles.append(block.mlp.register_forward_hook(partial(self._add_adapter, i)))

    def _keep_input(self, block: int, module: nn.Module, args: tuple) -> None:
        if self.active is not None:
            self._block_inputs[block] = args[0]

    def _add_adapter(self, block: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.active is None:
            return None
        x, self._block_inputs[block] = self._block_inputs[block], None
        return output + self.active[block](x, self.unit_mask)

    @contextmanager
    def using(self, adapters: AdapterSet | None, unit_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Run the ViT with `adapters` (None: the plain ViT), each sample's units masked by `unit_mask`."""
        if adapters is not None and len(adapters) != self.depth:
            raise ValueError(f"adapter set has {len(adapters)} adapters for a ViT of {self.depth} blocks")
        previous = self.active, self.unit_mask
        self.active, self.unit_mask = adapters, unit_mask
        try:
            yield
        finally:
            self.active, self.unit_mask = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass(frozen=True)
class AdapterTuningConfig(StrategyConfig):
    """The adapter-tuning recipe of PILOT and TUNA (APER, RanPAC, DAF): SGD lr 0.01, momentum 0.9,
    weight decay 5e-4, cosine schedule; adapter bottleneck 64 (TUNA and its family: 16), dropout 0.1."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    bottleneck: int = 64
    adapter_dropout: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        positive_integers(self, "bottleneck")
        probabilities_below_one(self, "adapter_dropout")


class FirstTaskAdaptation(nn.Module):
    """The first stage of APER and RanPAC: an adapter set in the frozen ViT, tuned with
    cross-entropy over the first task's classes through a linear head of its own, then frozen.

    The strategy owns the ViT (it is not registered here twice); this module holds the
    adapters, the head and the first task's label map, so they are in the strategy's state_dict.
    """

    def __init__(self, vit: nn.Module, num_classes: int, bottleneck: int, dropout: float = 0.1):
        super().__init__()
        self.adapters = AdapterSet.for_vit(vit, bottleneck, dropout=dropout)
        self.router = AdapterRouter(vit)
        self._vit = (vit,)  # a tuple: nn.Module does not register it
        self.head: nn.Linear | None = None
        self.register_buffer("first_task_label", torch.full((num_classes,), -1, dtype=torch.long))

    @property
    def vit(self) -> nn.Module:
        return self._vit[0]

    def start(self, exp) -> None:
        """At the first task: a head over its classes."""
        if exp.is_first:
            self.head = nn.Linear(self.vit.num_features, len(exp.classes))
            self.first_task_label[list(exp.classes)] = torch.arange(len(exp.classes))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.router.using(self.adapters):
            features = self.vit(x)
        return F.cross_entropy(self.head(features), self.first_task_label[y])

    def freeze(self) -> None:
        """After the first task: the adapters stay fixed, and the head, which served the tuning
        only, is dropped (so a checkpoint never holds it)."""
        self.requires_grad_(False)
        self.head = None

    def features(self, x: torch.Tensor, adapted: bool = True) -> torch.Tensor:
        """The ViT's embedding with (or without) the adapters, in eval mode and without gradients."""
        with eval_mode(self.vit, self.adapters), torch.no_grad(), self.router.using(self.adapters if adapted else None):
            return self.vit(x)
