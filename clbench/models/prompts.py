"""Prompt mechanics for timm Vision Transformers (PrePrompt, L2P, DualPrompt, CODA-Prompt).

- `PrefixRouter`, prefix tuning: in each prompted block, a prompt's key part is put in front of
  the attention keys and its value part in front of the values; queries, and so the number of
  output tokens, stay as they are. timm's `Attention.forward` takes no prefix, so the router
  gives each prompted block's attention module a forward of its own that runs timm's
  computation with the prefixes added (and timm's own forward when no prefix is active).
- `TokenPrompter`, input-level prompt tuning (L2P): per-sample prompt tokens are inserted right
  after the class token, before the first block, so every block attends to them.
- `PromptPool`, a pool of prompts with one learnable key each (L2P; DualPrompt's E-prompts):
  per-sample top-k selection by the cosine between a query and the keys, and the key-query
  pull term sum_i (1 - cos(q, k_i)) over the selected keys.
- `mask_to`: logits outside a class set set to -inf (the prompt methods train on the current
  task's classes only).

None of them changes the ViT's modules, parameters or `state_dict`.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clbench.errors import UsageError
from clbench.models.adapters import vit_blocks


class PrefixRouter:
    """Routes per-sample key/value prefixes into the first `blocks` attention layers of a ViT."""

    def __init__(self, vit: nn.Module, blocks: int):
        all_blocks = vit_blocks(vit)
        if not 0 < blocks <= len(all_blocks):
            raise UsageError(f"prompt_blocks={blocks} is invalid; expected 1 to the ViT's depth ({len(all_blocks)})")
        self.blocks = blocks
        self.prefix: torch.Tensor | None = None
        for i in range(blocks):
            attn = all_blocks[i].attn
            if getattr(attn, "gate", None) is not None:
                raise UsageError("prefix tuning supports timm's plain attention, not gated attention")
            attn.forward = partial(self._attention, i, attn)
        first = all_blocks[0].attn
        self.heads, self.head_dim = first.num_heads, first.head_dim

    def _attention(self, block: int, attn: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        if self.prefix is None:
            return type(attn).forward(attn, x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("prefix tuning does not take attention masks")
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        prefix_k, prefix_v = (p.permute(0, 2, 1, 3) for p in self.prefix[block])  # (batch, heads, length, head_dim)
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
        return attn.proj_drop(attn.proj(out))

    @contextmanager
    def using(self, prefix: torch.Tensor | Sequence[torch.Tensor] | None) -> Iterator[None]:
        """`prefix`: (blocks, 2 (key, value), batch, length, heads, head_dim), or None for the plain
        ViT; or one (2, batch, length_b, heads, head_dim) tensor per routed block, when blocks
        take prefixes of different lengths (DualPrompt's G- and E-prompts; length 0: none)."""
        previous, self.prefix = self.prefix, prefix
        try:
            yield
        finally:
            self.prefix = previous


class TokenPrompter:
    """Input-level prompt tuning for a timm ViT (L2P): inside `using(tokens)`, each sample's
    prompt tokens are inserted right after the class token(s), before the first block.

    The insertion is a forward hook on the ViT's `norm_pre` (the step after position embedding),
    so `forward_features` returns [CLS, prompt outputs, patch outputs]; `offset` is where the
    prompt outputs start. The prompt tokens get the class token's position embedding added, as
    in the L2P/PILOT code (it widens the position table by repeating the [CLS] entry for them).
    """

    def __init__(self, vit: nn.Module):
        vit_blocks(vit)
        if not all(hasattr(vit, name) for name in ("norm_pre", "forward_features", "num_prefix_tokens")):
            raise UsageError(f"backbone {type(vit).__name__} is not a timm VisionTransformer; input-level prompts "
                             "need one, e.g. --backbone clbench_vit_tiny or vit_base_patch16_224")
        self._vit = (vit,)  # a tuple: the strategy owns and registers the ViT
        self.offset = int(vit.num_prefix_tokens)
        self.tokens: torch.Tensor | None = None
        self._handle = vit.norm_pre.register_forward_hook(self._insert)

    def position(self) -> torch.Tensor | None:
        """The position embedding the prompt tokens get: the class token's (None if it has none)."""
        vit = self._vit[0]
        if getattr(vit, "pos_embed", None) is None or getattr(vit, "no_embed_class", False) or vit.cls_token is None:
            return None
        return vit.pos_embed[:, :1]

    def _insert(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.tokens is None:
            return None
        tokens = self.tokens.to(output.dtype)
        position = self.position()
        if position is not None:
            tokens = tokens + position
        p = self.offset
        return torch.cat([output[:, :p], tokens, output[:, p:]], dim=1)

    @contextmanager
    def using(self, tokens: torch.Tensor | None) -> Iterator[None]:
        """`tokens`: (batch, n, embed_dim) prompt tokens, or None for the plain ViT."""
        previous, self.tokens = self.tokens, tokens
        try:
            yield
        finally:
            self.tokens = previous

    def remove(self) -> None:
        self._handle.remove()


class PromptPool(nn.Module):
    """`size` prompts of shape `prompt_shape`, each with a learnable key in R^key_dim.

    Prompts and keys start from U(-1, 1) (the L2P/DualPrompt/PILOT "uniform" initialiser).
    Selection is per sample: sample b gets the `k` prompts whose keys have the highest cosine to
    its query q_b (never the batch-majority "batchwise" choice, which would let a test batch's
    composition decide each sample's prompts).
    """

    def __init__(self, size: int, prompt_shape: Sequence[int], key_dim: int):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(size, *prompt_shape).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(size, key_dim).uniform_(-1, 1))

    def __len__(self) -> int:
        return len(self.keys)

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """cos(q_b, k_i): (batch, size)."""
        return F.normalize(query, dim=1) @ F.normalize(self.keys, dim=1).T

    def select(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """The indices of each sample's top-k keys by cosine, best first: (batch, k)."""
        return self.similarity(query.detach()).topk(k, dim=1).indices

    def pull(self, query: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The key-query term: the batch mean of sum over the selected keys of (1 - cos(q_b, k_i)),
        with gradients to the keys only (`idx`: (batch, k)). PILOT subtracts lambda times the batch
        mean of sum cos(q_b, k_i); this differs by the constant lambda * k and has the same gradients."""
        keys = F.normalize(self.keys, dim=1)[idx]  # (batch, k, key_dim)
        cosines = (keys * F.normalize(query.detach(), dim=1).unsqueeze(1)).sum(-1)
        return (1 - cosines).sum(1).mean()


def mask_to(logits: torch.Tensor, classes) -> torch.Tensor:
    """Logits of classes outside `classes` set to -inf (they get no gradient)."""
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[list(classes)] = True
    return logits.masked_fill(~keep, float("-inf"))
