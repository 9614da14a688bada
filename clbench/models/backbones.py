"""Backbones come from timm by name; clbench's small nets are registered with timm's `register_model`.

`build_backbone` always returns a timm model built with `num_classes=0`, so calling it
gives pooled features of width `model.num_features`; the classifier is a clbench head.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from timm.models import register_model
from torch import nn

from clbench.errors import UsageError


class _TimmStyleNet(nn.Module):
    """The parts of timm's model API that clbench uses, for the small nets defined here."""

    num_features: int

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes

    def _make_head(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        self._make_head(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class MLP(_TimmStyleNet):
    """Flatten, then `depth` Linear+ReLU layers (the 64-256-256 net of the digits reference setup)."""

    def __init__(self, in_features: int = 64, hidden: int = 256, depth: int = 2, num_classes: int = 0, in_chans: int = 1, img_size: int = 8, **_):
        super().__init__(num_classes)
        self.in_chans = in_chans  # image channels, for methods that build their own input stage (FDINet)
        in_features = in_chans * img_size * img_size if in_features is None else in_features
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.num_features = width
        self._make_head(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ConvNet(_TimmStyleNet):
    """Three 3x3 conv blocks with BatchNorm and global average pooling; for 8x8 to 32x32 inputs."""

    def __init__(self, in_chans: int = 3, width: int = 32, num_classes: int = 0, **_):
        super().__init__(num_classes)

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(in_chans, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2))
        self.num_features = 4 * width
        self._make_head(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1-conv) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(_TimmStyleNet):
    """ResNet-18 for small images (Mammoth/DER/GEM variant): 3x3 stride-1 stem, no max-pool.

    Stages of 2 BasicBlocks with widths nf, 2nf, 4nf, 8nf (strides 1, 2, 2, 2), then
    global average pooling to `8 * nf` features.  At nf=64 on 3x32x32 this is the
    11.17M-parameter, 1.111-GFLOP network of the rehearsal papers; nf=20 is the
    "reduced ResNet-18" of GEM/A-GEM/ER-ACE.  timm's `resnet18` is a different
    network (7x7 stride-2 stem + max-pool, 4x smaller maps).
    """

    def __init__(self, nf: int = 64, in_chans: int = 3, num_classes: int = 0, blocks=(2, 2, 2, 2), **_):
        super().__init__(num_classes)
        self.nf = nf
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        stages, cin = [], nf
        for i, n in enumerate(blocks):
            cout = nf * 2**i
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else cout, cout, (1 if i == 0 else 2) if b == 0 else 1) for b in range(n)]))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = cin
        self._make_head(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool), width nf=64 by default (`nf=` to change)."""
    return CifarResNet(**{"nf": 64, **kwargs})


@register_model
def resnet18_cifar_nf20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Reduced CIFAR ResNet-18 (nf=20, 1.09M parameters with a 10-class head)."""
    return CifarResNet(**{**kwargs, "nf": 20})


@register_model
def resnet18_cifar_nf8(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-18 at nf=8: the tiny CPU configuration of the tests."""
    return CifarResNet(**{**kwargs, "nf": 8})


@register_model
def clbench_mlp(pretrained: bool = False, **kwargs) -> MLP:
    """64-256-256 MLP for flattened 8x8 inputs."""
    return MLP(**{"in_features": None, **kwargs})


@register_model
def clbench_mlp_tiny(pretrained: bool = False, **kwargs) -> MLP:
    """A 32-unit single-layer MLP for tests."""
    return MLP(**{"in_features": None, "hidden": 32, "depth": 1, **kwargs})


@register_model
def clbench_vit_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm ViT for 32x32 inputs (patch 8, width 64, depth 4, 4 heads): the tiny CPU configuration of the pre-trained-model methods."""
    from timm.models.vision_transformer import VisionTransformer

    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory adds these
        kwargs.pop(key, None)
    return VisionTransformer(**{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, **kwargs})


@register_model
def clbench_convnet(pretrained: bool = False, **kwargs) -> ConvNet:
    """Small 3-block CNN (32-64-128 channels)."""
    return ConvNet(**kwargs)


def build_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    in_chans: int = 3,
    img_size: int | None = None,
) -> nn.Module:
    """A timm model without classifier (`num_classes=0`), exposing `num_features`."""
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        close = [m for m in timm.list_models() if m.startswith(name.split("_")[0])][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UsageError(f"unknown backbone {name!r}; expected a timm model name, e.g. clbench_mlp, clbench_convnet, resnet18{hint}")
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if img_size is not None and name.startswith(("clbench_mlp", "clbench_vit")):
        kwargs["img_size"] = img_size
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if name.startswith("clbench_"):
        raise UsageError(f"backbone {name!r} has no pretrained weights; drop --pretrained")
    if weights is not None:
        if not Path(weights).is_file():
            raise UsageError(f"pretrained weights file {weights!r} not found")
        expected = set(timm.create_model(name, pretrained=False, **kwargs).state_dict())
        found = _checkpoint_keys(weights)
        if not found & expected:  # timm would only warn and leave the model at its random init
            raise UsageError(f"pretrained weights file {weights!r} holds no weights of {name!r} (none of its "
                             f"{len(found)} keys names a parameter of the model); expected a checkpoint of that model")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    return _from_local_cache(name, kwargs)


def _checkpoint_keys(path: str) -> set[str]:
    """The parameter names in a weight file (a torch state_dict, possibly under "state_dict" or
    "model" as timm's checkpoints keep it, or .safetensors)."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                keys = set(f.keys())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for nested in ("state_dict", "model", "state_dict_ema"):
                if isinstance(state, dict) and isinstance(state.get(nested), dict):
                    state = state[nested]
                    break
            keys = set(state) if isinstance(state, dict) else set()
    except Exception as e:  # a text file, a truncated download, a pickle of other objects
        raise UsageError(f"pretrained weights file {path!r} is not a readable checkpoint ({type(e).__name__}); "
                         f"expected a state_dict saved with torch.save, or a .safetensors file") from None
    return {k.removeprefix("module.") for k in keys}


def _from_local_cache(name: str, kwargs: dict) -> nn.Module:
    """Load weights that timm/Hugging Face already cached locally; never touch the network.

    Looks for the model's default pretrained tag in the Hugging Face hub cache and in
    torch.hub's checkpoint folder; a missing file is an error, never a random init.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    looked: list[str] = []
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": found}, **kwargs)
        looked.append(f"{HF_HUB_CACHE} ({cfg.hf_hub_id})")
    if cfg is not None and cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if path.is_file():
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        looked.append(str(path))
    where = "; ".join(looked) or "no pretrained tag is known to timm"
    raise UsageError(
        f"pretrained weights for {name!r} are not available locally (looked in {where}); "
        f"download them once with timm on a machine with network, or pass --weights FILE"
    )
