"""Prefix tuning in timm attention: the plain path is timm's, prefixes extend keys and values per sample."""

import pytest
import torch

from clbench.errors import UsageError
from clbench.models.backbones import build_backbone
from clbench.models.prompts import PrefixRouter


def _vit():
    torch.manual_seed(0)
    return build_backbone("clbench_vit_tiny", in_chans=3, img_size=32).eval()


def test_without_a_prefix_the_vit_is_unchanged():
    vit, x = _vit(), torch.randn(2, 3, 32, 32)
    plain = vit(x)
    router = PrefixRouter(vit, blocks=2)
    with torch.no_grad():
        assert torch.equal(vit(x), plain)
        with router.using(None):
            assert torch.equal(vit(x), plain)


def test_a_prefix_extends_keys_and_values_per_sample_and_keeps_the_token_count():
    vit = _vit()
    router = PrefixRouter(vit, blocks=1)
    attn = vit.blocks[0].attn
    x = torch.randn(2, 17, 64)
    prefix = torch.randn(1, 2, 2, 3, 4, 16)  # blocks, key/value, batch, length 3, heads 4, head_dim 16
    with torch.no_grad(), router.using(prefix):
        out = attn(x)
    assert out.shape == x.shape
    with torch.no_grad():  # by hand, sample by sample
        for b in range(2):
            q, k, v = attn.qkv(x[b]).reshape(17, 3, 4, 16).permute(1, 2, 0, 3)  # each (heads, tokens, head_dim)
            k = torch.cat([prefix[0, 0, b].permute(1, 0, 2), k], dim=1)
            v = torch.cat([prefix[0, 1, b].permute(1, 0, 2), v], dim=1)
            weights = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)  # scale 1/sqrt(16)
            expected = attn.proj((weights @ v).permute(1, 0, 2).reshape(17, 64))
            assert torch.allclose(out[b], expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(out, attn(x), atol=1e-3)  # outside `using`: timm's own attention


def test_prompt_blocks_must_fit_the_vit():
    with pytest.raises(UsageError, match="prompt_blocks=5 is invalid; expected 1 to the ViT's depth"):
        PrefixRouter(_vit(), blocks=5)
