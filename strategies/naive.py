"""Naive fine-tuning: cross-entropy on the current experience only (the lower bound)."""

from __future__ import annotations

from clbench.base import CLStrategy
from clbench.registry import register_strategy


@register_strategy("naive")
class Naive(CLStrategy):
    """Fine-tuning on each experience in turn, with no protection against forgetting (lower bound)."""
