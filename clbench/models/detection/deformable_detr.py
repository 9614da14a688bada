"""Deformable DETR (Zhu et al., ICLR 2021): the detector of the P2IOD and CL-DETR papers, through
Hugging Face transformers' `DeformableDetrForObjectDetection` (optional extra `detr`).

`DeformableDETR` wraps that model behind the interface the DETR family's strategies use with
`TinyDETR` (`clbench.models.detection.detr`): `encode(x)` returns the arguments of
`decode(..., prompts=None)`, which returns a `DetrOutput` of every decoder layer (class logits,
normalised `cx, cy, w, h` boxes, decoder states); `class_head`, `box_head`, `backbone`,
`num_classes`, `num_queries`, `d_model`, `decoder_layers`, `reset_class_head`.

- Architecture (`deformable_detr_config`): the released single-stage Deformable DETR R50 without
  box refinement (the checkpoint `SenseTime/deformable-detr`, P2IOD's variant (a)): ResNet-50 from
  timm (`use_pretrained_backbone=False`: built, never downloaded) with frozen BatchNorm, 4
  feature levels, 6 encoder and 6 decoder layers, d = 256, 8 heads, 4 sampling points, FFN 1024,
  300 queries, a class head and a 3-layer box MLP shared by all decoder layers. Images in [0, 1]
  are normalised with the ImageNet mean and std inside `encode` (as TinyDETR does); the pixel
  mask (`pixel_mask`) marks each image's valid area of a padded batch (`image_sizes`, or the
  active padded batch's: `clbench.models.detection.padding`), all ones when nothing is padded. Multi-scale deformable attention runs in
  transformers' pure-PyTorch path on CPU.
- Outputs of every decoder layer: the model's own per-layer states and reference points, read
  through the class and box heads with Deformable DETR's box parametrisation
  (`sigmoid(box_mlp(h) + [logit(reference), 0, 0])`); the last layer equals the model's
  `logits`/`pred_boxes` (tested).
- Prompts (P2IOD): `prompts[l] = (keys, values)`, each `[B, P, d]`, are *prepended* to decoder
  layer `l`'s self-attention keys and values after their linear maps (prefix tuning, the
  injection of P2IOD's Deformable-DETR code). They enter through transformers' public
  attention-function registry (`AttentionInterface`): the model is built with
  `attn_implementation="clbench_prompted_sdpa"`, a function that concatenates the prompt tokens
  the layer's `DeformableDetrSelfAttention` module carries during `decode` and then calls
  `attend` (`F.scaled_dot_product_attention`). No transformers source is copied; the encoder's
  deformable attention and the decoder's cross-attention are untouched.
- One backbone and encoder pass per batch: `encode` runs the backbone; the first `decode` runs
  the encoder and keeps its output, later `decode`s of the same batch reuse both (the model's
  `encoder_outputs` argument; its backbone call is answered from the cache).
- Weights (`load_deformable_detr_weights`): `coco` is the COCO-pretrained checkpoint
  `SenseTime/deformable-detr` from the Hugging Face hub cache (downloaded only when asked), a
  directory written by `save_pretrained`, or one weight file (`.safetensors`, or a torch
  state_dict) in transformers' key names; the class head is never loaded (the stream's classes
  get a fresh one). `imagenet` loads only the backbone, timm's `resnet50.tv_in1k` (torchvision's
  ImageNet ResNet-50, which Deformable DETR starts from) through the classification backbones'
  weights path (`clbench.models.backbones.build_backbone`: hub or torch.hub cache, never a
  download); the rest stays at its random init.

Parameter count: 40,069,665 with COCO's 91 label ids (the released head), 40,051,418 with 20
classes; the published Deformable DETR R50 has 40M (Zhu et al., ICLR 2021, Table 1). The ResNet's
frozen BatchNorm affine terms are buffers, not parameters, in both.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clbench.errors import UsageError
from clbench.models.detection.detr import FOCAL_PRIOR, IMAGENET_MEAN, IMAGENET_STD, DetrOutput

HUB_ID = "SenseTime/deformable-detr"  # COCO-pretrained, R50, single stage, no box refinement
IMAGENET_BACKBONE = "resnet50.tv_in1k"  # timm's copy of torchvision's ImageNet ResNet-50
PROMPTED_ATTENTION = "clbench_prompted_sdpa"
PUBLISHED_PARAMETERS = 40_000_000  # "40M", Zhu et al., ICLR 2021, Table 1 (Deformable DETR, R50)
_PROMPT = "_clbench_prompt"  # attribute of a decoder self-attention module while prompts are set


def require_transformers():
    """The `transformers` module, or one clear error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UsageError("detector='deformable_detr' needs Hugging Face transformers >= 5 "
                         "(pip install 'clbench[detr]' or pip install 'transformers>=5')") from None
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise UsageError(f"detector='deformable_detr' needs transformers >= 5 (its decoder self-attention goes "
                         f"through the attention-function registry); found {transformers.__version__}")
    from transformers import AttentionInterface

    if PROMPTED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PROMPTED_ATTENTION, prompted_attention)
    return transformers


# --------------------------------------------------------------------------- prompted attention
def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           scaling: float | None, dropout: float) -> torch.Tensor:
    """Scaled dot-product attention, `[B, H, Q, hd]` inputs -> `[B, Q, H, hd]` (the layout
    transformers' attention functions return)."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


def prompted_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract; when `module` carries prompt tokens
    (`(keys, values)`, each `[B, P, d]`, set by `DeformableDETR.decode`), they are split into
    heads and prepended to the projected keys and values (no positional embedding on them) and
    the mask, if any, gets `P` always-visible columns."""
    prompt = getattr(module, _PROMPT, None)
    if prompt is not None:
        batch, heads, _, head_dim = key.shape
        pk, pv = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2).to(key.dtype) for t in prompt)
        key, value = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
        if attention_mask is not None:
            visible = True if attention_mask.dtype == torch.bool else 0.0
            attention_mask = F.pad(attention_mask, (pk.shape[2], 0), value=visible)
    return attend(query, key, value, attention_mask, scaling, dropout), None


# --------------------------------------------------------------------------- model
def deformable_detr_config(num_classes: int, num_queries: int = 300, **overrides: Any):
    """Deformable DETR R50, single stage, no box refinement (the released `SenseTime/deformable-detr`
    architecture), its ResNet-50 built by timm without downloading, prompts enabled."""
    require_transformers()
    from transformers import DeformableDetrConfig

    values = dict(num_labels=num_classes, num_queries=num_queries, two_stage=False, with_box_refine=False,
                  num_feature_levels=4, encoder_layers=6, decoder_layers=6, d_model=256, encoder_ffn_dim=1024,
                  decoder_ffn_dim=1024, encoder_attention_heads=8, decoder_attention_heads=8, encoder_n_points=4,
                  decoder_n_points=4, backbone="resnet50", use_timm_backbone=True, use_pretrained_backbone=False,
                  attn_implementation=PROMPTED_ATTENTION)
    values.update(overrides)
    return DeformableDetrConfig(**values)


class _Encoded:
    """One batch's backbone features and (after the first decode) encoder output."""

    def __init__(self, features, pixel_mask: torch.Tensor):
        self.features = features
        self.pixel_mask = pixel_mask
        self.encoder_outputs = None


class DeformableDETR(nn.Module):
    """Hugging Face's `DeformableDetrForObjectDetection` (`self.hf`) behind TinyDETR's interface."""

    backbone_prefix = "hf.model.backbone."  # state_dict keys of the ImageNet-pretrainable part

    def __init__(self, num_classes: int, num_queries: int = 300, **config_overrides: Any):
        super().__init__()
        require_transformers()
        from transformers import DeformableDetrForObjectDetection

        config = deformable_detr_config(num_classes, num_queries, **config_overrides)
        self.hf = DeformableDetrForObjectDetection(config)
        self.num_classes, self.num_queries, self.d_model = num_classes, num_queries, config.d_model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        heads = [p for m in (*self.hf.class_embed, *self.hf.bbox_embed) for p in m.parameters()]
        if len({id(p) for p in heads}) != len(list(self.class_head.parameters()) + list(self.box_head.parameters())):
            raise RuntimeError("transformers did not tie Deformable DETR's per-layer heads (expected one class head "
                               "and one box head shared by all decoder layers, as without box refinement)")
        self.reset_class_head()

    # ----------------------------------------------------------- structure
    @property
    def decoder_layers(self) -> int:
        return len(self.hf.model.decoder.layers)

    @property
    def class_head(self) -> nn.Linear:
        return self.hf.class_embed[0]  # tied to every decoder layer's class_embed

    @property
    def box_head(self) -> nn.Module:
        return self.hf.bbox_embed[0]

    @property
    def backbone(self) -> nn.Module:
        return self.hf.model.backbone

    def self_attentions(self) -> list[nn.Module]:
        """The decoder layers' self-attention modules, where prompts enter."""
        return [layer.self_attn for layer in self.hf.model.decoder.layers]

    def reset_class_head(self) -> None:
        """nn.Linear's own weight init and the focal prior bias, as Deformable DETR's class head."""
        self.class_head.reset_parameters()
        nn.init.constant_(self.class_head.bias, -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR))

    # ----------------------------------------------------------- passes
    def encode(self, x: torch.Tensor, image_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, _Encoded]:
        """Images in [0, 1] -> (normalised pixels, the batch's backbone features): `decode`'s arguments.
        `image_sizes` (`[B, 2]`): each image's valid area of a padded batch, Deformable DETR's
        `pixel_mask` (1 on valid pixels); default the active padded batch's, else all valid."""
        from clbench.models.detection.padding import padding_mask, valid_sizes_for

        pixels = (x - self.mean) / self.std
        sizes = valid_sizes_for(x, image_sizes)
        if sizes is None:
            mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long, device=pixels.device)
        else:
            mask = padding_mask(sizes, pixels.shape[-2:], pixels.device).long()
        return pixels, _Encoded(self.backbone(pixels, mask), mask)

    def decode(self, pixels: torch.Tensor, encoded: _Encoded,
               prompts: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DetrOutput:
        """Encoder (once per batch), decoder and heads; `prompts[l]` (keys, values) enters decoder
        layer `l`'s self-attention."""
        with self._reusing(encoded), self._prompting(prompts):
            out = self.hf.model(pixel_values=pixels, pixel_mask=encoded.pixel_mask, encoder_outputs=encoded.encoder_outputs)
        states = out.intermediate_hidden_states.transpose(0, 1)  # [L, B, Q, d]
        references = torch.cat([out.init_reference_points[:, None], out.intermediate_reference_points[:, :-1]], 1)
        references = torch.logit(references.transpose(0, 1), eps=1e-5)  # [L, B, Q, 2], the reference of each layer
        logits = torch.stack([self.hf.class_embed[l](states[l]) for l in range(len(states))])
        delta = torch.stack([self.hf.bbox_embed[l](states[l]) for l in range(len(states))])
        boxes = torch.cat([delta[..., :2] + references, delta[..., 2:]], -1).sigmoid()
        return DetrOutput(logits, boxes, states)

    def forward(self, x: torch.Tensor, prompts=None, image_sizes: torch.Tensor | None = None) -> DetrOutput:
        return self.decode(*self.encode(x, image_sizes), prompts=prompts)

    @contextlib.contextmanager
    def _reusing(self, encoded: _Encoded):
        """The model's backbone call answers with `encoded.features`; the encoder's output is kept
        in `encoded` the first time (later calls pass it as `encoder_outputs`)."""
        backbone = self.backbone
        backbone.forward = lambda *args, **kwargs: encoded.features  # instance attribute, removed below
        handle = None
        if encoded.encoder_outputs is None:
            handle = self.hf.model.encoder.register_forward_hook(
                lambda module, args, output: setattr(encoded, "encoder_outputs", output))
        try:
            yield
        finally:
            del backbone.forward
            if handle is not None:
                handle.remove()

    @contextlib.contextmanager
    def _prompting(self, prompts):
        modules = self.self_attentions()
        if prompts is not None and len(prompts) != len(modules):
            raise ValueError(f"{len(prompts)} prompts for {len(modules)} decoder layers")
        try:
            for module, prompt in zip(modules, prompts or [None] * len(modules)):
                setattr(module, _PROMPT, prompt)
            yield
        finally:
            for module in modules:
                setattr(module, _PROMPT, None)


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied heads counted once), buffers excluded."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- weights
def _hub_snapshot(download: bool) -> Path:
    """The cached `SenseTime/deformable-detr` snapshot folder (downloaded first only if `download`),
    in the hub cache the classification backbones read (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, read now)."""
    from huggingface_hub import try_to_load_from_cache

    from clbench.models.backbones import hub_cache_dir

    cache = hub_cache_dir()
    config = try_to_load_from_cache(HUB_ID, "config.json", cache_dir=cache)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(HUB_ID, filename, cache_dir=cache)
        if isinstance(found, str) and isinstance(config, str):
            return Path(found).parent
    if not download:
        where = Path(cache) / ("models--" + HUB_ID.replace("/", "--"))
        raise UsageError(f"COCO-pretrained Deformable DETR weights not found: no {HUB_ID} model.safetensors under "
                         f"{str(where)!r}; fetch them with --download (or `clbench download` ahead of time), or pass "
                         f"--weights FILE (a DeformableDetrForObjectDetection state_dict or save_pretrained folder)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(HUB_ID, allow_patterns=["config.json", "*.safetensors"], cache_dir=cache))


def base_weights_file(base: str, download: bool = False) -> Path | None:
    """The local file or folder `base` reads (None: "random"): "coco" the hub snapshot, "imagenet" the
    classification backbones' cached `resnet50.tv_in1k`, else the path itself. Fetched first only
    with `download`; a missing one is a one-line `UsageError` naming it and how to get it, raised
    before any data is read (the runner asks through `FrozenBaseDetrStrategy.model_weights`)."""
    if base == "random":
        return None
    if base == "coco":
        return _hub_snapshot(download)
    if base == "imagenet":
        from clbench.models.backbones import pretrained_file

        return Path(pretrained_file(IMAGENET_BACKBONE, download=download))
    source = Path(base).expanduser()
    if not source.exists():
        raise UsageError(f"base detector weights not found: {str(source)!r} (expected base=coco, base=imagenet, "
                         f"a DeformableDetrForObjectDetection weight file or a save_pretrained folder)")
    return source


def _pretrained_folder(source: Path, config, stack: contextlib.ExitStack) -> Path:
    """A folder `from_pretrained` reads: `source` itself, or a temporary one with `config` and a
    link to the single weight file `source`."""
    if source.is_dir():
        return source
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    config.save_pretrained(folder)
    name = "model.safetensors" if source.suffix == ".safetensors" else "pytorch_model.bin"
    os.symlink(source.resolve(), folder / name)
    return folder


def load_deformable_detr_weights(model: DeformableDETR, base: str, download: bool = False) -> None:
    """Load pretrained weights into all of `model` but its class head: `base` is "coco" (the hub
    checkpoint), "imagenet" (the backbone only) or a path (a file or a `save_pretrained` folder)."""
    if base == "imagenet":
        return _load_imagenet_backbone(model)
    from transformers import DeformableDetrForObjectDetection

    config = model.hf.config
    with contextlib.ExitStack() as stack:
        source = base_weights_file(base, download)
        folder = source if base == "coco" else _pretrained_folder(source, config, stack)
        try:
            loaded, info = DeformableDetrForObjectDetection.from_pretrained(
                folder, config=config, local_files_only=True, ignore_mismatched_sizes=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise UsageError(f"{base!r} is not a readable Deformable DETR checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
    missing = [k for k in info["missing_keys"] if not k.startswith("class_embed.")]
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    mismatched = [k for k in mismatched if not k.startswith("class_embed.")]
    if missing or mismatched:
        raise UsageError(f"{base!r} is not a Deformable DETR R50 of this architecture: missing {missing[:5]}, "
                         f"mismatched {mismatched[:5]}")
    state = {k: v for k, v in loaded.state_dict().items() if not k.startswith("class_embed.")}
    model.hf.load_state_dict(state, strict=False)


def _load_imagenet_backbone(model: DeformableDETR) -> None:
    from clbench.models.backbones import build_backbone

    imagenet = build_backbone(IMAGENET_BACKBONE, pretrained=True).state_dict()  # local weights only
    target = model.backbone.model  # timm's feature extractor inside the conv encoder
    wanted = target.state_dict()
    state = {k: v for k, v in imagenet.items() if k in wanted}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise UsageError(f"{IMAGENET_BACKBONE} weights lack backbone entries {missing[:5]}")
    target.load_state_dict(state)
