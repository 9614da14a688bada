"""The small value types that strategies, scenarios and the runner exchange."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor | None = None
    x_raw: torch.Tensor | None = None  # the inputs before train augmentation (what buffers store)

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(self.x.to(device), self.y.to(device), move(self.task), move(self.x_raw))

    @property
    def stored_x(self) -> torch.Tensor:
        return self.x if self.x_raw is None else self.x_raw

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class ExperienceInfo:
    """What a strategy may know about experience `index` (labels are positions in the class order)."""

    index: int
    classes: tuple[int, ...]
    seen_classes: tuple[int, ...]
    num_experiences: int
    num_classes: int

    @property
    def past_classes(self) -> tuple[int, ...]:
        return tuple(c for c in self.seen_classes if c not in set(self.classes))

    @property
    def is_first(self) -> bool:
        return self.index == 0


@dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor | None = None

    def rows(self, index) -> "Output":
        """The outputs of some samples (`index`: a slice, mask or index tensor)."""
        return Output(self.logits[index], None if self.features is None else self.features[index])


@dataclass
class StepView:
    """The step's main forward as add-ons see it: its inputs, labels and outputs, the current
    batch's `current` samples first, then replayed ones for methods that forward both together."""

    x: torch.Tensor
    y: torch.Tensor
    out: Output
    current: int

    @property
    def replayed(self) -> int:
        return len(self.y) - self.current


@dataclass(frozen=True)
class Phase:
    """One `trainer.fit` inside an experience (most methods have one; warm-ups add another)."""

    name: str = "train"
    epochs: int | None = None  # None: RunConfig.epochs
    batch_size: int | None = None  # None: RunConfig.batch_size
    extras: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def on_images(self) -> bool:
        """False for a phase whose inputs are not images (sampled features), which says so with
        extras={"augment": False}: its batches are neither augmented nor handed to the add-ons."""
        return bool(self.extras.get("augment", True))
