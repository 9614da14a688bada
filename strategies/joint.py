"""Joint training: at experience i, train on the union of experiences 0..i (the upper bound)."""

from __future__ import annotations

from torch.utils.data import Dataset

from clbench.base import CLStrategy
from clbench.datasets import concat
from clbench.registry import register_strategy
from clbench.types import ExperienceInfo


@register_strategy("joint")
class Joint(CLStrategy):
    """Trains on all data seen so far at every experience (cumulative upper bound)."""

    accepts_aux: set[str] = set()  # the upper bound stays the plain reference: add-ons would change what it measures

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_train_sets: list[Dataset] = []

    def training_data(self, exp: ExperienceInfo, train_set: Dataset) -> Dataset:
        self.seen_train_sets.append(train_set)
        return concat(self.seen_train_sets)

    def on_resume(self, last: ExperienceInfo, past_train_sets) -> None:
        super().on_resume(last, past_train_sets)
        self.seen_train_sets = list(past_train_sets)
