"""AdaptFormer adapters in a timm ViT: placement, formula, initialisation, routing."""

import math

import pytest
import torch

from clbench.errors import UsageError
from clbench.models.adapters import Adapter, AdapterRouter, AdapterSet
from clbench.models.backbones import build_backbone


def _vit():
    torch.manual_seed(0)
    return build_backbone("clbench_vit_tiny", in_chans=3, img_size=32).eval()


def _randomise(adapters: AdapterSet) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_a_fresh_adapter_set_leaves_the_network_unchanged_and_is_initialised_as_specified():
    vit, x = _vit(), torch.randn(2, 3, 32, 32)
    adapters = AdapterSet.for_vit(vit, bottleneck=8)
    router = AdapterRouter(vit)
    plain = vit(x)
    with router.using(adapters):
        assert torch.equal(vit(x), plain)  # W_up = 0 and b_u = 0
    a = adapters[0]
    assert len(adapters) == 4 and a.down.weight.shape == (8, 64) and a.up.weight.shape == (64, 8)
    assert torch.all(a.up.weight == 0) and torch.all(a.up_bias == 0) and torch.all(a.down.bias == 0)
    bound = 1 / math.sqrt(64)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.down.weight.abs().max() <= bound and a.down.weight.abs().max() > 0.8 * bound


def test_a_block_adds_the_adapter_of_its_post_attention_stream_to_the_mlp_output():
    vit, x = _vit(), torch.randn(2, 3, 32, 32)
    adapters = AdapterSet.for_vit(vit, bottleneck=8).eval()
    _randomise(adapters)
    router = AdapterRouter(vit)
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    expected = tokens
    for i, block in enumerate(vit.blocks):  # by hand, with the paper's formula
        h = expected + block.attn(block.norm1(expected))
        a = adapters[i]
        adapter = 0.1 * (torch.relu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T) + a.up_bias
        expected = h + block.mlp(block.norm2(h)) + adapter
    expected = vit.norm(expected)[:, 0]  # the [CLS] token
    with router.using(adapters), torch.no_grad():
        got = vit(x)
    assert torch.allclose(got, expected.detach(), atol=1e-5)
    assert not torch.allclose(got, vit(x).detach(), atol=1e-3)  # outside `using`: the plain network


def test_using_nests_and_restores_and_only_adapters_get_gradients():
    vit, x = _vit(), torch.randn(2, 3, 32, 32)
    vit.requires_grad_(False)
    first, second = AdapterSet.for_vit(vit, 4), AdapterSet.for_vit(vit, 4)
    _randomise(first), _randomise(second)
    router = AdapterRouter(vit)
    with router.using(first):
        out_first = vit(x)
        with router.using(second):
            assert router.active is second
        assert router.active is first
        out_first.sum().backward()
    assert router.active is None
    assert all(p.grad is not None for p in first.parameters())
    assert all(p.grad is None for p in second.parameters()) and all(p.grad is None for p in vit.parameters())


def test_adapters_need_a_vit_and_a_matching_depth():
    mlp = build_backbone("clbench_mlp", in_chans=1, img_size=8)
    with pytest.raises(UsageError, match="no ViT blocks"):
        AdapterRouter(mlp)
    router = AdapterRouter(_vit())
    with pytest.raises(ValueError, match="3 adapters for a ViT of 4 blocks"):
        with router.using(AdapterSet(64, 3, 8)):
            pass


def test_adapter_dropout_acts_on_the_bottleneck_in_training_only():
    a = Adapter(6, 4, dropout=0.5)
    _randomise_module(a)
    x = torch.randn(3, 6)
    a.eval()
    assert torch.equal(a(x), a(x))
    a.train()
    torch.manual_seed(0)
    assert not torch.allclose(a(x), a.eval()(x))


def _randomise_module(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
