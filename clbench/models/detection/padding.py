"""Padded detection batches: each image's valid area, as the detectors read it.

A `DetectionBatch` of images of different sizes is padded at the bottom and right
(`clbench.datasets.detection_collate`); `DetectionBatch.image_sizes` (long `[B, 2]`, height and
width) is each image's valid area. The detectors take it explicitly (`image_sizes=` of the GFL
and DETR forwards, a per-image `image_size` of `normalised_targets` / `detections`).

Method code written before padding existed calls `detector(batch.x)` and passes
`batch.x.shape[-2:]` as "the image size". `DetectionStrategy` therefore runs each training step
and each `detect` inside `padded_batch(x, image_sizes)`: while it is active, a detector forward,
`normalised_targets` or `detections` that gets no sizes but the batch's padded shape (same
batch size and height x width) reads the batch's valid sizes from here (`valid_sizes_for`).
Explicit sizes always win; outside a step nothing changes.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Sequence

import torch

_ACTIVE: ContextVar[tuple[tuple[int, int], torch.Tensor] | None] = ContextVar("clbench_padded_batch", default=None)


@contextlib.contextmanager
def padded_batch(x: torch.Tensor, image_sizes: torch.Tensor | None):
    """While active, `valid_sizes_for` answers for tensors of `x`'s batch size and height x width."""
    if image_sizes is None:
        yield
        return
    sizes = torch.as_tensor(image_sizes, dtype=torch.long).reshape(-1, 2).cpu()
    if bool((sizes == sizes.new_tensor([x.shape[-2], x.shape[-1]])).all()):
        yield  # nothing padded: every image fills x
        return
    token = _ACTIVE.set(((int(x.shape[-2]), int(x.shape[-1])), sizes))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sizes(batch: int, shape: Sequence[int]) -> torch.Tensor | None:
    """The active padded batch's valid sizes `[B, 2]` if it has `batch` images of height x width
    `shape`, else None."""
    active = _ACTIVE.get()
    if active is None:
        return None
    padded, sizes = active
    if len(sizes) != batch or tuple(int(v) for v in shape) != padded:
        return None
    return sizes


def valid_sizes_for(x: torch.Tensor, image_sizes=None) -> torch.Tensor | None:
    """`[B, 2]` (height, width) of each image of `x` (`[B, C, H, W]`): `image_sizes` if given, else
    the active padded batch's (if `x` is that batch), else None (every image fills `x`)."""
    if image_sizes is not None:
        return torch.as_tensor(image_sizes, dtype=torch.long).reshape(-1, 2).cpu()
    return active_sizes(x.shape[0], x.shape[-2:])


def per_image_sizes(image_size, batch: int) -> torch.Tensor:
    """`[batch, 2]` float (height, width) per image from either one `(H, W)` for all images or
    per-image sizes (`[batch, 2]`, a list of pairs). A single `(H, W)` that is the active padded
    batch's shape (and `batch` its size) stands for that batch's valid sizes."""
    sizes = torch.as_tensor([list(s) for s in image_size] if _is_nested(image_size) else image_size,
                            dtype=torch.float64).cpu()
    if sizes.dim() == 1:
        active = active_sizes(batch, sizes.long().tolist())
        if active is not None:
            return active.to(torch.float64)
        return sizes.reshape(1, 2).expand(batch, 2)
    if len(sizes) != batch:
        raise ValueError(f"{len(sizes)} image sizes for a batch of {batch}")
    return sizes


def _is_nested(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], (list, tuple, torch.Size))


def padding_mask(image_sizes: torch.Tensor, shape: Sequence[int], device=None) -> torch.Tensor:
    """bool `[B, H, W]`: True on each image's valid pixels (top-left `h x w` of `shape`)."""
    h, w = int(shape[0]), int(shape[1])
    sizes = torch.as_tensor(image_sizes, dtype=torch.long, device=device).reshape(-1, 2)
    rows = torch.arange(h, device=device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(w, device=device)[None, None, :] < sizes[:, 1, None, None]
    return rows & cols
