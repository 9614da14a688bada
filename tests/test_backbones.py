"""clbench's registered timm backbones."""

from __future__ import annotations

import torch

from clbench.models.backbones import build_backbone


def test_tiny_vit_is_the_cards_configuration():
    """img 32, patch 8, width 64, depth 4, 4 heads: parameters counted by hand."""
    vit = build_backbone("clbench_vit_tiny", in_chans=3, img_size=32)
    d, mlp, tokens = 64, 256, (32 // 8) ** 2 + 1
    patch_embed = 3 * 8 * 8 * d + d
    block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    expected = patch_embed + d + tokens * d + 4 * block + 2 * d  # + cls token, positions, blocks, final norm
    assert sum(p.numel() for p in vit.parameters()) == expected == 213_568
    assert vit.num_features == d
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, d)
