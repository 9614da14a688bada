"""Backbones come from timm by name; clbench's small nets are registered with timm's `register_model`.

`build_backbone` always returns a timm model built with `num_classes=0`, so calling it
gives pooled features of width `model.num_features`; the classifier is a clbench head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


# --------------------------------------------------------------------------- strategies' backbone defaults
# What a method's paper fixes, for its `DEFAULTS` (clbench.engine.runner.strategy_defaults): a backbone with
# its timm weights tag, and the input it was trained for. Keys are RunConfig fields.

# ViT-B/16 pre-trained on ImageNet-21k as the PILOT code family loads it: timm 0.6's
# `vit_base_patch16_224_in21k`, which timm 1.x names `vit_base_patch16_224.augreg_in21k` (the AugReg
# checkpoint); 224 px, images fed as ToTensor() output (no normalisation)
PILOT_VIT_B16_IN21K = {"backbone": "vit_base_patch16_224.augreg_in21k", "pretrained": True, "image_size": 224,
                       "normalization": "none"}
# PrePrompt's code points ViT-B/16 at the original `ViT-B_16.npz` ImageNet-21k checkpoint (timm 1.x:
# `.orig_in21k`), 224 px, mean = std = 0.5 (timm's "inception" statistics)
ORIG_VIT_B16_IN21K = {"backbone": "vit_base_patch16_224.orig_in21k", "pretrained": True, "image_size": 224,
                      "normalization": "inception"}
# the tiny CPU configuration of the pre-trained-model methods (random init, the data's own size)
TINY_VIT = {"backbone": "clbench_vit_tiny", "pretrained": False, "image_size": None, "normalization": "dataset"}
# Mammoth's ResNet-18 (3x3 stride-1 stem, no max-pool, nf=64), trained from scratch
CIFAR_RESNET18 = {"backbone": "resnet18_cifar", "pretrained": False}

# values that belong to the backbone they were declared with: a backbone of another architecture given at a
# higher level (paper settings, --config, --set, --backbone) takes them away with it
BACKBONE_BOUND_KEYS = ("pretrained", "weights", "image_size", "normalization")


def ptm_defaults(paper: dict) -> dict[str, dict]:
    """`DEFAULTS` of a pre-trained-model method: its paper's ViT on every scenario, the tiny CPU ViT on the
    small test scenarios (8/32 px digits, synthetic data)."""
    return {"*": dict(paper), "digits*": dict(TINY_VIT), "synthetic*": dict(TINY_VIT)}


def architecture(name: str) -> str:
    """The timm architecture of a backbone name, without its weights tag (`vit_base_patch16_224.augreg_in21k`
    -> `vit_base_patch16_224`)."""
    return name.split(".", 1)[0]


# --------------------------------------------------------------------------- building
def check_backbone_name(name: str) -> None:
    """A timm model name, optionally with a pretrained tag (`arch.tag`); otherwise a one-line UsageError
    listing the closest names (difflib over timm's models, or over its pretrained tags for a tag)."""
    import difflib

    arch, _, tag = name.partition(".")
    if tag:
        known = timm.list_pretrained()
        if name in known:
            return
        if arch not in timm.list_models():
            close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
            raise UsageError(f"unknown backbone {name!r}; expected a timm model name (e.g. resnet18, vit_base_patch16_224)"
                             f" or model.tag{_similar(close)}")
        tags = [m for m in known if m.split(".", 1)[0] == arch]
        close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
        close = list(dict.fromkeys([*close, *tags]))[:8]
        raise UsageError(f"{tag!r} is not a timm weights tag of {arch!r}; expected one of timm's pretrained tags"
                         f"{_similar(close) if close else ' (timm has no pretrained weights for it)'}")
    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
    raise UsageError(f"unknown backbone {name!r}; expected a timm model name, e.g. clbench_mlp, clbench_convnet, "
                     f"resnet18{_similar(close)}")


def _similar(names) -> str:
    return f" (similar: {', '.join(names)})" if names else ""


def build_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    in_chans: int = 3,
    img_size: int | None = None,
    download: bool = False,
) -> nn.Module:
    """A timm model without classifier (`num_classes=0`), exposing `num_features`.

    `pretrained`: the weights of `weights` (a file), else of the name's timm tag (`arch.tag`; the
    architecture's default tag without one) from the Hugging Face hub cache or torch.hub's folder. Nothing
    is downloaded unless `download`; missing weights are a UsageError, never a random init.
    """
    check_backbone_name(name)
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if img_size is not None and (name.startswith(("clbench_mlp", "clbench_vit")) or _vit_at_other_size(name, img_size)):
        kwargs["img_size"] = img_size  # timm ViTs: position embeddings resampled to the grid when weights load
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if name.startswith("clbench_"):
        raise UsageError(f"backbone {name!r} has no pretrained weights; drop --pretrained (and --weights)")
    if weights is not None:
        if not Path(weights).is_file():
            raise UsageError(f"pretrained weights file {weights!r} not found")
        expected = set(timm.create_model(name, pretrained=False, **kwargs).state_dict())
        found = _checkpoint_keys(weights)
        if not found & expected:  # timm would only warn and leave the model at its random init
            raise UsageError(f"pretrained weights file {weights!r} holds no weights of {name!r} (none of its "
                             f"{len(found)} keys names a parameter of the model); expected a checkpoint of that model")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    path = pretrained_file(name, download=download)
    # the file holds timm's state_dict (hub) or the original checkpoint (torch.hub url); timm's filter
    # converts it either way. custom_load is timm's .npz reader, for url downloads only
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path, "custom_load": False}, **kwargs)


def _vit_at_other_size(name: str, img_size: int) -> bool:
    """A timm Vision Transformer whose default input side is not `img_size`."""
    from timm.models import get_pretrained_cfg, is_model_in_modules

    if not is_model_in_modules(architecture(name), ["vision_transformer"]):
        return False
    cfg = get_pretrained_cfg(name)
    return cfg is None or cfg.input_size[-1] != img_size


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


# --------------------------------------------------------------------------- pretrained weights
HUB_TIMEOUT_S = 10  # seconds a --download waits for the hub to answer (connect, metadata) before it gives up


@dataclass(frozen=True)
class WeightsSource:
    """Where timm keeps the pretrained weights of `model` (`arch.tag`): a Hugging Face hub repo, or a url."""

    model: str
    hub_repo: str | None = None
    hub_revision: str | None = None
    hub_filenames: tuple[str, ...] = ()
    url: str | None = None

    def describe(self) -> str:
        if self.hub_repo:
            return f"hf-hub {self.hub_repo} ({' or '.join(self.hub_filenames)})"
        return str(self.url)

    def download_url(self) -> str:
        if self.hub_repo:
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
            return f"{endpoint}/{self.hub_repo}/resolve/{self.hub_revision or 'main'}/{self.hub_filenames[0]}"
        return str(self.url)


def weights_source(name: str) -> WeightsSource:
    """The pretrained weights timm names for `name` (its default tag when the name has none)."""
    from timm.models import get_pretrained_cfg

    check_backbone_name(name)
    if name.startswith("clbench_"):
        raise UsageError(f"backbone {name!r} has no pretrained weights; drop --pretrained (and --weights)")
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = [m for m in timm.list_pretrained() if architecture(m) == architecture(name)]
        raise UsageError(f"timm knows no pretrained weights for {name!r}; expected a pretrained tag"
                         f"{_similar(tags[:8]) if tags else ' (none for this architecture): drop --pretrained'}")
    tag = cfg.tag if "." not in name and getattr(cfg, "tag", None) else None
    model = f"{name}.{tag}" if tag else name
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        if cfg.hf_hub_filename:
            files = (cfg.hf_hub_filename,)
        else:  # timm reads model.safetensors where the repo has it, else pytorch_model.bin
            files = ("model.safetensors", "pytorch_model.bin")
        return WeightsSource(model, repo, revision or None, files)
    return WeightsSource(model, url=cfg.url)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now ($HF_HUB_CACHE, else $HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def cached_weights(src: WeightsSource) -> str | None:
    """The local file of `src`, if the hub cache or torch.hub's checkpoint folder holds it."""
    if src.hub_repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in src.hub_filenames:
            found = try_to_load_from_cache(src.hub_repo, filename, cache_dir=hub_cache_dir(), revision=src.hub_revision)
            if isinstance(found, str):
                return found
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(src.url))
    return str(path) if path.is_file() else None


def missing_weights_message(src: WeightsSource) -> str:
    if src.hub_repo:
        where = f"{src.hub_repo} ({src.hub_filenames[0]}) in the hub cache {hub_cache_dir()}"
    else:
        where = f"{os.path.basename(str(src.url))} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
    return (f"pretrained weights {src.model} not found locally: expected {where}; fetch them with --download "
            f"(or `clbench download` ahead of time), pass --weights FILE, or place the file there")


def pretrained_file(name: str, *, download: bool = False) -> str:
    """The local weight file of `name`'s timm tag; fetched into the hub cache (or torch.hub's folder) only
    with `download`, with a short timeout. Offline-first: without `download` nothing touches the network."""
    src = weights_source(name)
    found = cached_weights(src)
    if found is not None:
        return found
    if not download:
        raise UsageError(missing_weights_message(src))
    if src.hub_repo:
        return _hub_download(src)
    return _url_download(src)


def _hub_download(src: WeightsSource) -> str:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UsageError(f"--download: HF_HUB_OFFLINE is set, so {src.download_url()} cannot be fetched; unset it, "
                         f"or place {src.model}'s weights in the hub cache {hub_cache_dir()}")
    _probe(src.download_url(), src)  # one short request: no network fails now, not after the hub's retries
    endpoint = os.environ.get("HF_ENDPOINT") or None
    saved = constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT
    constants.HF_HUB_ETAG_TIMEOUT = min(saved[0], HUB_TIMEOUT_S)  # the hub reads these at call time
    constants.HF_HUB_DOWNLOAD_TIMEOUT = min(saved[1], HUB_TIMEOUT_S)
    last: Exception | None = None
    try:
        for filename in src.hub_filenames:
            try:
                return hf_hub_download(src.hub_repo, filename, revision=src.hub_revision, cache_dir=hub_cache_dir(),
                                       endpoint=endpoint, etag_timeout=HUB_TIMEOUT_S)
            except EntryNotFoundError as e:
                if isinstance(e, LocalEntryNotFoundError):  # the hub could not be reached after all
                    raise UsageError(f"--download: could not fetch {src.download_url()} ({_reason(e)})") from None
                last = e  # the repo has the other format
            except Exception as e:  # no network, refused, timed out, 401/404 from the hub
                raise UsageError(f"--download: could not fetch {src.download_url()} ({_reason(e)}); check the "
                                 f"network (or HF_ENDPOINT), or place {src.model}'s weights in the hub cache "
                                 f"{hub_cache_dir()}, or pass --weights FILE") from None
    finally:
        constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT = saved
    raise UsageError(f"--download: {src.hub_repo} holds none of {', '.join(src.hub_filenames)} ({_reason(last)})")


def _probe(url: str, src: WeightsSource) -> None:
    """One HEAD request with a short timeout (proxies from the environment honoured): any HTTP answer
    means the server is reachable; no answer is a one-line UsageError naming the url."""
    import threading
    import urllib.error
    import urllib.request

    outcome: list = []

    def head():  # in a thread: name resolution ignores socket timeouts
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # reachable (401/404 are the hub's to explain)
        except Exception as e:
            outcome.append(e)

    worker = threading.Thread(target=head, daemon=True)
    worker.start()
    worker.join(HUB_TIMEOUT_S + 1)
    e = outcome[0] if outcome else TimeoutError(f"no answer in {HUB_TIMEOUT_S} s")
    if e is not None:
        reason = getattr(e, "reason", None) or e
        raise UsageError(f"--download: could not reach {url} ({type(e).__name__}: {reason}); check the network "
                         f"(or HF_ENDPOINT), or place {src.model}'s weights in the hub cache {hub_cache_dir()}, "
                         f"or pass --weights FILE") from None


def _url_download(src: WeightsSource) -> str:
    import socket

    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(src.url))
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(HUB_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(str(src.url), str(target), progress=False)
    except Exception as e:
        raise UsageError(f"--download: could not fetch {src.url} ({_reason(e)}); check the network, or place the "
                         f"file at {target}, or pass --weights FILE") from None
    finally:
        socket.setdefaulttimeout(previous)
    return str(target)


def _reason(e: Exception | None) -> str:
    if e is None:
        return "no file"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__
