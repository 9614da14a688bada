"""TinyDETR: a plain DETR small enough for CPU tests, and what the query-based IOD methods share.

- `TinyDETR`: a BatchNorm CNN to stride 8 (64 tokens at 64 px), `d = 64`, one
  `nn.TransformerEncoder` layer, three decoder layers whose self-attention is an
  `nn.MultiheadAttention` that optionally sees extra key/value *prompt* tokens (appended to its
  key and value inputs before the in-projection, no positional embedding on them), 12 learned
  object queries, a sigmoid class head over every class of the stream from the start and a
  3-layer box MLP (normalised `cx, cy, w, h`), both shared by all decoder layers (DETR's
  auxiliary outputs). `encode` (backbone + encoder) and `decode` (decoder + heads) are separate
  so that methods whose passes differ only in the decoder compute the image features once.
- `hungarian_match` / `set_loss`: Deformable DETR's matching costs (focal class cost 2, L1 5,
  GIoU 2, `scipy.optimize.linear_sum_assignment`) and loss on every decoder layer:
  sigmoid focal (alpha .25, gamma 2) summed over queries and classes, L1 x 5 and GIoU x 2
  over matched pairs, each divided by the number of target boxes. Ignored boxes are never
  targets (dropped before matching).
- `detections`: the top-100 (query, class) scores per image over the allowed classes, no NMS;
  `with_pseudo_boxes` appends chosen detections to the ground truth as pseudo labels (P2IOD,
  CL-DETR).
- `pretrain_shapes_base`: the offline stand-in for a COCO-pretrained DETR (see its docstring),
  cached on disk by its settings; `load_base` reads such a file or any TinyDETR state_dict.
- `FrozenBaseDetrStrategy` (`clbench.strategies._detr`): a detection strategy around a frozen
  pretrained DETR whose class head (fresh, sized for all classes) and box head are trained;
  P2IOD and the fine-tuning baseline build on it, and CL-DETR, which unfreezes the whole
  detector (BatchNorm aside). Its detector is TinyDETR or, with `detector="deformable_detr"`,
  the papers' Deformable DETR R50 (`clbench.models.detection.deformable_detr`), which has the
  same `encode`/`decode`/heads interface and returns the same `DetrOutput`; matching, loss,
  masking and `detections` below serve both.

Deviations from DETR, for size: the encoder adds the sine positional embedding to its input
tokens once (an `nn.TransformerEncoderLayer` cannot add it to queries and keys per layer); no
dropout (so a frozen base is deterministic and a prompt-free pass equals the base exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from clbench.datasets import Target
from clbench.models.detection.padding import padding_mask, per_image_sizes, valid_sizes_for

MASKED_LOGIT = -1e11  # the value P2IOD's code gives logits of classes not to be predicted
FOCAL_PRIOR = 0.01  # initial foreground probability of the class head (RetinaNet / DETR focal init)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- model
@dataclass
class DetrOutput:
    """Per decoder layer (first axis): class logits `[L, B, Q, C]`, boxes `[L, B, Q, 4]` as
    normalised `cx, cy, w, h`, and the decoder states `[L, B, Q, d]` the heads read."""

    logits: torch.Tensor
    boxes: torch.Tensor
    states: torch.Tensor


def sine_positions(height: int, width: int, dim: int, device=None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding, `[H*W, dim]` (half for y, half for x); with `valid`
    (`[B, 2]` valid rows and columns of each image's feature map) `[B, H*W, dim]`, each image's
    coordinates normalised by its own valid extent (DETR's `PositionEmbeddingSine` on a padding mask)."""
    quarter = dim // 4
    if valid is not None:
        return torch.stack([_sine_positions(height, width, quarter, device, int(h), int(w)) for h, w in valid.tolist()])
    return _sine_positions(height, width, quarter, device, height, width)


def _sine_positions(height: int, width: int, quarter: int, device, valid_h: int, valid_w: int) -> torch.Tensor:
    freq = 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / valid_h * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / valid_w * 2 * math.pi
    y = ys[:, None] / freq
    x = xs[:, None] / freq
    y = torch.cat([y.sin(), y.cos()], 1)[:, None, :].expand(height, width, 2 * quarter)
    x = torch.cat([x.sin(), x.cos()], 1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([y, x], -1).reshape(height * width, 4 * quarter)


class DecoderLayer(nn.Module):
    """DETR decoder layer (post-norm). `prompt = (keys, values)`, each `[B, P, d]`, is appended
    to the self-attention's key and value inputs; queries and cross-attention are untouched."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, tgt, query_pos, memory, memory_pos, prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
                memory_padding: torch.Tensor | None = None):
        q = k = tgt + query_pos
        v = tgt
        if prompt is not None:
            k = torch.cat([k, prompt[0]], 1)
            v = torch.cat([v, prompt[1]], 1)
        tgt = self.norm1(tgt + self.self_attn(q, k, v, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, memory + memory_pos, memory, need_weights=False,
                                               key_padding_mask=memory_padding)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyDETR(nn.Module):
    """Plain DETR at CPU-test size (about 0.3 M parameters)."""

    backbone_prefix = "backbone."  # state_dict keys of the backbone (CL-DETR's base_parts="backbone")

    def __init__(self, num_classes: int, d_model: int = 64, heads: int = 4, encoder_layers: int = 1,
                 decoder_layers: int = 3, ffn: int = 128, num_queries: int = 12, width: int = 32):
        super().__init__()
        self.num_classes, self.d_model, self.num_queries = num_classes, d_model, num_queries
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone = nn.Sequential(conv_bn(3, width, 2), conv_bn(width, 2 * width, 2),
                                      conv_bn(2 * width, 2 * width, 2), conv_bn(2 * width, 2 * width, 1))
        self.input_proj = nn.Conv2d(2 * width, d_model, 1)
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, encoder_layers, enable_nested_tensor=False)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.decoder = nn.ModuleList(DecoderLayer(d_model, heads, ffn) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.class_head = nn.Linear(d_model, num_classes)
        self.box_head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model), nn.ReLU(),
                                      nn.Linear(d_model, 4))
        self.reset_class_head()

    @property
    def decoder_layers(self) -> int:
        return len(self.decoder)

    def reset_class_head(self) -> None:
        """nn.Linear's own weight init and the focal prior bias, as Deformable DETR's class head."""
        self.class_head.reset_parameters()
        nn.init.constant_(self.class_head.bias, -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR))

    def encode(self, x: torch.Tensor, image_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (encoder memory `[B, HW, d]`, its positional embedding `[1, HW, d]`).

        A padded batch (`image_sizes` `[B, 2]`, or the active padded batch's): feature cells
        outside an image's valid area are masked as keys in the encoder and the decoder's
        cross-attention, and positions are normalised by each image's valid extent (then `pos`
        is `[B, HW, d]`); the padding mask travels with the memory (`memory_padding`)."""
        sizes = valid_sizes_for(x, image_sizes)
        f = self.input_proj(self.backbone((x - self.mean) / self.std))
        if sizes is None:
            pos = sine_positions(f.shape[-2], f.shape[-1], self.d_model, f.device).unsqueeze(0)
            return self.encoder(f.flatten(2).transpose(1, 2) + pos), pos
        stride = x.shape[-1] / f.shape[-1]
        valid = torch.stack([(sizes[:, 0] / stride).ceil(), (sizes[:, 1] / stride).ceil()], 1).long()
        valid = torch.minimum(valid, valid.new_tensor([f.shape[-2], f.shape[-1]]))
        padding = ~padding_mask(valid, f.shape[-2:], f.device).flatten(1)  # [B, HW] True on padding
        pos = sine_positions(f.shape[-2], f.shape[-1], self.d_model, f.device, valid)
        memory = self.encoder(f.flatten(2).transpose(1, 2) + pos, src_key_padding_mask=padding)
        memory.memory_padding = padding  # read by `decode` (cross-attention keys)
        return memory, pos

    def decode(self, memory: torch.Tensor, pos: torch.Tensor,
               prompts: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DetrOutput:
        """Decoder and heads; `prompts[l]` (keys, values) enters decoder layer `l`'s self-attention."""
        query_pos = self.query_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        padding = getattr(memory, "memory_padding", None)
        states = []
        for l, layer in enumerate(self.decoder):
            tgt = layer(tgt, query_pos, memory, pos, None if prompts is None else prompts[l], padding)
            states.append(self.decoder_norm(tgt))
        h = torch.stack(states)
        return DetrOutput(self.class_head(h), self.box_head(h).sigmoid(), h)

    def forward(self, x: torch.Tensor, prompts=None, image_sizes: torch.Tensor | None = None) -> DetrOutput:
        return self.decode(*self.encode(x, image_sizes), prompts=prompts)


# --------------------------------------------------------------------------- matching and loss
@dataclass(frozen=True)
class SetLossWeights:
    """Deformable DETR's defaults: matching costs (class, L1, GIoU) and loss weights."""

    cost_class: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0


def normalised_targets(targets: Sequence[Target], image_size) -> list[dict[str, torch.Tensor]]:
    """Non-ignored boxes as normalised `cx, cy, w, h` with their labels, each image's boxes divided
    by its own valid size: `image_size` is one `(H, W)` for all or per-image sizes `[B, 2]`
    (`DetectionBatch.image_sizes`; DETR normalises by the image before padding). A single `(H, W)`
    equal to the active padded batch's shape means that batch's valid sizes
    (`clbench.models.detection.padding`)."""
    sizes = per_image_sizes(image_size, len(targets))
    out = []
    for t, (h, w) in zip(targets, sizes.tolist()):
        keep = ~t["ignore"]
        boxes = t["boxes"][keep].float()
        scale = boxes.new_tensor([w, h, w, h])
        out.append({"boxes": box_convert(boxes / scale, "xyxy", "cxcywh"), "labels": t["labels"][keep].long()})
    return out


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]],
                    w: SetLossWeights = SetLossWeights()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, (query indices, target indices) of the minimum-cost assignment.

    Cost = cost_class * focal cost of the target class + cost_l1 * L1(cxcywh) - cost_giou * GIoU,
    with Deformable DETR's focal class cost alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p)).
    `logits` `[B, Q, C]`, `boxes` `[B, Q, 4]` normalised cxcywh.
    """
    from scipy.optimize import linear_sum_assignment

    B, Q, _ = logits.shape
    sizes = [len(t["labels"]) for t in targets]
    if sum(sizes) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return [(empty, empty) for _ in targets]
    labels = torch.cat([t["labels"] for t in targets])
    target_boxes = torch.cat([t["boxes"] for t in targets])
    # every query against every target of the batch at once (DETR's layout), then one
    # assignment per image on its own block
    p = logits.flatten(0, 1).sigmoid()[:, labels]
    pos = w.alpha * (1 - p) ** w.gamma * -(p + 1e-8).log()
    neg = (1 - w.alpha) * p ** w.gamma * -(1 - p + 1e-8).log()
    pred = boxes.flatten(0, 1)
    cost = (w.cost_class * (pos - neg) + w.cost_l1 * torch.cdist(pred, target_boxes, p=1)
            - w.cost_giou * generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")))
    blocks = cost.view(B, Q, -1).cpu().split(sizes, -1)
    out = []
    for b, block in enumerate(blocks):
        rows, cols = linear_sum_assignment(block[b].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return out


def layer_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]],
               w: SetLossWeights = SetLossWeights()) -> dict[str, torch.Tensor]:
    """One decoder layer's unweighted terms after matching: focal (summed over queries and
    classes), L1 and 1 - GIoU (summed over matched pairs), each / number of targets."""
    matches = hungarian_match(logits, boxes, targets, w)
    num_targets = max(sum(len(t["labels"]) for t in targets), 1)
    onehot = torch.zeros_like(logits)
    src, tgt = [], []
    for b, ((q, j), t) in enumerate(zip(matches, targets)):
        q, j = q.to(logits.device), j.to(logits.device)
        onehot[b, q, t["labels"][j]] = 1.0
        src.append(boxes[b, q])
        tgt.append(t["boxes"][j])
    src, tgt = torch.cat(src), torch.cat(tgt)
    focal = sigmoid_focal_loss(logits, onehot, alpha=w.alpha, gamma=w.gamma, reduction="sum") / num_targets
    l1 = F.l1_loss(src, tgt, reduction="sum") / num_targets
    giou = (1 - torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))).sum() / num_targets
    return {"focal": focal, "l1": l1, "giou": giou}


def set_loss(out: DetrOutput, targets: Sequence[dict[str, torch.Tensor]], w: SetLossWeights = SetLossWeights()) -> dict[str, torch.Tensor]:
    """`sum over decoder layers [focal + w.l1 * L1 + w.giou * GIoU]` as three named terms."""
    terms = [layer_loss(out.logits[l], out.boxes[l], targets, w) for l in range(out.logits.shape[0])]
    return {"focal": sum(t["focal"] for t in terms), "l1": w.l1 * sum(t["l1"] for t in terms),
            "giou": w.giou * sum(t["giou"] for t in terms)}


def mask_classes(logits: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
    """Logits of classes not in `allowed` set to -1e11 (probability 0, no gradient)."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[list(allowed)] = True
    return logits.masked_fill(~keep, MASKED_LOGIT)


# --------------------------------------------------------------------------- inference
def detections(logits: torch.Tensor, boxes: torch.Tensor, image_size, classes: Sequence[int],
               top_k: int = 100) -> list[dict[str, torch.Tensor]]:
    """Per image the `top_k` highest (query, class) sigmoid scores over `classes` with their boxes
    (xyxy pixels of the image, clipped to it) and labels; no NMS. `logits` `[B, Q, C]`, `boxes`
    `[B, Q, 4]`; `image_size` is one `(H, W)` or per-image valid sizes `[B, 2]`, as in
    `normalised_targets` (DETR's PostProcess scales each image by its own size)."""
    sizes = per_image_sizes(image_size, logits.shape[0])
    classes_t = torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)
    out = []
    for b in range(logits.shape[0]):
        h, w = sizes[b].tolist()
        if len(classes_t) == 0:
            out.append({"boxes": boxes.new_zeros(0, 4), "scores": boxes.new_zeros(0),
                        "labels": torch.zeros(0, dtype=torch.long, device=logits.device)})
            continue
        scores = logits[b][:, classes_t].sigmoid()
        k = min(top_k, scores.numel())
        top, flat = scores.flatten().topk(k)
        query, column = flat // len(classes_t), flat % len(classes_t)
        xyxy = box_convert(boxes[b, query], "cxcywh", "xyxy") * boxes.new_tensor([w, h, w, h])
        xyxy = torch.stack([xyxy[:, 0].clamp(0, w), xyxy[:, 1].clamp(0, h), xyxy[:, 2].clamp(0, w), xyxy[:, 3].clamp(0, h)], 1)
        out.append({"boxes": xyxy, "scores": top, "labels": classes_t[column]})
    return out


def with_pseudo_boxes(targets: Sequence[Target], found: Sequence[dict[str, torch.Tensor]],
                      keep: Sequence[torch.Tensor]) -> list[Target]:
    """Each image's target plus the kept rows of its `found` detections (xyxy pixel boxes and
    labels, as `detections` returns them) as ordinary, non-ignored boxes. New dicts: the real
    ground truth is never altered."""
    out = []
    for t, d, k in zip(targets, found, keep):
        n = int(k.sum())
        out.append({"boxes": torch.cat([t["boxes"], d["boxes"][k].to(t["boxes"].dtype)]),
                    "labels": torch.cat([t["labels"], d["labels"][k]]),
                    "ignore": torch.cat([t["ignore"], t["ignore"].new_zeros(n)])})
    return out
