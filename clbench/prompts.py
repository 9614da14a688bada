"""Prefix tuning for timm Vision Transformers (PrePrompt; DualPrompt-style prompts).

In each prompted block, a prompt's key part is put in front of the attention keys and its
value part in front of the values; queries, and so the number of output tokens, stay as they
are. timm's `Attention.forward` takes no prefix, so `PrefixRouter` gives each prompted block's
attention module a forward of its own that runs timm's computation with the prefixes added
(and timm's own forward when no prefix is active). The modules, their parameters and the
`state_dict` are untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clbench.adapters import vit_blocks
from clbench.errors import UsageError


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
    def using(self, prefix: torch.Tensor | None) -> Iterator[None]:
        """`prefix`: (blocks, 2 (key, value), batch, length, heads, head_dim), or None for the plain ViT."""
        previous, self.prefix = self.prefix, prefix
        try:
            yield
        finally:
            self.prefix = previous
