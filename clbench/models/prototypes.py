"""Class statistics over frozen features: running means, Gaussians, the CosFace loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

COVARIANCE_RIDGE = 1e-4


def cosface_loss(logits: torch.Tensor, y: torch.Tensor, classes: Sequence[int], scale: float, margin: float = 0.0) -> torch.Tensor:
    """CosFace-form cross-entropy over the logits of `classes` only (labels `y` are among them)."""
    columns = torch.as_tensor(list(classes), device=logits.device)
    position = torch.full((int(columns.max()) + 1,), -1, dtype=torch.long, device=logits.device)
    position[columns] = torch.arange(len(columns), device=logits.device)
    target = position[y]
    z = logits[:, columns]
    z = z - margin * F.one_hot(target, len(columns)).to(z.dtype)
    return F.cross_entropy(scale * z, target)


class ClassMeans(nn.Module):
    """Running per-class feature sums and counts, in float64: the means do not depend on the order
    in which the loader visits the samples (SimpleCIL's prototypes, the frozen PTM's class means)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("sums", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long))

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.sums.index_add_(0, labels, features.detach().to(torch.float64))
        self.counts.index_add_(0, labels, torch.ones_like(labels))

    @property
    def means(self) -> torch.Tensor:
        """Each class's mean (float64; zero rows for classes not seen yet)."""
        return self.sums / self.counts.clamp(min=1).unsqueeze(1)

    def stored_state(self) -> list[torch.Tensor]:
        """What a classifier over these means keeps for inference (a strategy's `stored_state`, which the
        profiler counts in `total_params`): one mean per class, unseen classes' rows included as a linear
        head's are, in the float64 they are accumulated in; the counts are folded into the means."""
        return [self.means]

    def pooled_mean(self, classes: Sequence[int]) -> torch.Tensor:
        """The mean over all samples of `classes` together."""
        classes = list(classes)
        return self.sums[classes].sum(0) / self.counts[classes].sum().clamp(min=1)


class ClassGaussians(nn.Module):
    """Mean and covariance of each class's features; rows of classes not yet measured are zero."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("covariance", torch.zeros(num_classes, dim, dim))
        self.register_buffer("measured", torch.zeros(num_classes, dtype=torch.bool))
        self._pending: dict[int, list[torch.Tensor]] = {}

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep features of the task being measured (`finish` turns them into statistics)."""
        for c in labels.unique().tolist():
            self._pending.setdefault(c, []).append(features[labels == c].detach().double())

    def finish(self) -> None:
        """Mean and unbiased covariance (+ 1e-4 I) of every class added since the last call."""
        for c, parts in self._pending.items():
            x = torch.cat(parts)
            mean = x.mean(0)
            centred = x - mean
            cov = centred.T @ centred / max(len(x) - 1, 1)
            cov += COVARIANCE_RIDGE * torch.eye(len(mean), dtype=cov.dtype, device=cov.device)
            self.mean[c], self.covariance[c], self.measured[c] = mean.float(), cov.float(), True
        self._pending.clear()

    def prepare_sampling(self) -> None:
        """Cholesky factors of the measured classes' covariances (once per alignment phase)."""
        self._factor = torch.zeros_like(self.covariance, dtype=torch.float64)
        self._factor[self.measured] = torch.linalg.cholesky(self.covariance[self.measured].double())

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw from N(mean_c, cov_c) per label: mean_c + L_c z, L_c the Cholesky factor, z ~ N(0, I)."""
        z = torch.randn(len(labels), self.mean.shape[1], 1, generator=generator, dtype=torch.float64)
        factor = self._factor.to(labels.device)[labels]
        return (self.mean[labels].double() + (factor @ z.to(factor.device)).squeeze(-1)).float()
