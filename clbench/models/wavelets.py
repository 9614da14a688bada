"""One-level orthonormal 2-D Haar transform, per channel, as CLFD, FDINet and `freq_kd` use it.

For every 2x2 block [a b; c d]: LL = (a+b+c+d)/2, D1 = (a-b+c-d)/2, D2 = (a+b-c-d)/2,
D3 = (a-b-c+d)/2 (PyWavelets' `dwt2(x, "haar")` gives the same LL, and D2, D1, D3 as cH, cV, cD;
the tests compare). `haar_dwt` and `haar_idwt` are torch custom ops (`clbench::haar_dwt`,
`clbench::haar_idwt`, each the other's gradient) that slice and add inside; being ops of their
own, FLOP counting sees one op per transform and counts it with the Haar formula (8·H·W FLOPs
per channel, spec 1.4), where the slices and adds it runs would count 0 as elementwise work.
`haar_dwt_conv` is the same transform as a stride-2 grouped convolution with the four fixed
filters (same values, same count), kept as the reference form the tests compare with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.errors import UsageError


def _check_even(x: torch.Tensor) -> None:
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise UsageError(f"the Haar transform needs even image sides, got {tuple(x.shape[-2:])}")


def haar_dwt(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(LL, details) of x [N, C, H, W]: LL [N, C, H/2, W/2], details = [D1 | D2 | D3] [N, 3C, H/2, W/2]."""
    _check_even(x)
    return torch.ops.clbench.haar_dwt(x)


def haar_idwt(ll: torch.Tensor, details: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `haar_dwt` (the transform is orthonormal, so it is its own transpose)."""
    return torch.ops.clbench.haar_idwt(ll, details)


@torch.library.custom_op("clbench::haar_dwt", mutates_args=())
def _haar_dwt(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    ll = (a + b + c + d) / 2
    details = torch.cat([(a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2], dim=1)
    return ll, details


@torch.library.custom_op("clbench::haar_idwt", mutates_args=())
def _haar_idwt(ll: torch.Tensor, details: torch.Tensor) -> torch.Tensor:
    d1, d2, d3 = details.chunk(3, dim=1)
    n, ch, h, w = ll.shape
    x = ll.new_empty((n, ch, 2 * h, 2 * w))
    x[..., 0::2, 0::2] = (ll + d1 + d2 + d3) / 2
    x[..., 0::2, 1::2] = (ll - d1 + d2 - d3) / 2
    x[..., 1::2, 0::2] = (ll + d1 - d2 - d3) / 2
    x[..., 1::2, 1::2] = (ll - d1 - d2 + d3) / 2
    return x


@_haar_dwt.register_fake
def _(x):
    n, c, h, w = x.shape
    return x.new_empty((n, c, h // 2, w // 2)), x.new_empty((n, 3 * c, h // 2, w // 2))


@_haar_idwt.register_fake
def _(ll, details):
    n, c, h, w = ll.shape
    return ll.new_empty((n, c, 2 * h, 2 * w))


def _dwt_backward(ctx, grad_ll, grad_details):
    # orthonormal: the gradient of the transform is the inverse transform of the output gradients
    return _haar_idwt(grad_ll, grad_details)


def _idwt_backward(ctx, grad_x):
    return _haar_dwt(grad_x)


_haar_dwt.register_autograd(_dwt_backward)
_haar_idwt.register_autograd(_idwt_backward)

# the op packets, for FLOP formulas (`clbench.edge.flops`)
HAAR_DWT_OP, HAAR_IDWT_OP = torch.ops.clbench.haar_dwt, torch.ops.clbench.haar_idwt


# rows: LL, D1, D2, D3 over the block [a b; c d]
_HAAR_FILTERS = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [1.0, -1.0]],
                              [[1.0, 1.0], [-1.0, -1.0]], [[1.0, -1.0], [-1.0, 1.0]]]) / 2


def haar_dwt_conv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`haar_dwt` as one stride-2 grouped convolution (same values, counted by the profiler)."""
    _check_even(x)
    n, c, h, w = x.shape
    weight = _HAAR_FILTERS.to(x.device, x.dtype).repeat(c, 1, 1).unsqueeze(1)  # [4C, 1, 2, 2]
    bands = F.conv2d(x, weight, stride=2, groups=c).view(n, c, 4, h // 2, w // 2)
    ll = bands[:, :, 0]
    details = bands[:, :, 1:].transpose(1, 2).reshape(n, 3 * c, h // 2, w // 2)  # [D1 | D2 | D3]
    return ll, details
