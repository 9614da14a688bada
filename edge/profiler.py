"""EdgeProfiler: a Lightning Callback that records cost per experience; it never changes results."""

from __future__ import annotations

import resource
import time
from typing import Any

import pytorch_lightning as pl
import torch


class EdgeProfiler(pl.Callback):
    """Wall time, samples, parameter counts and peak memory of the training fits of each experience.

    The runner calls `start_experience(i)` before the experience's fits and
    `end_experience(strategy)` after them; each `fit` in between reports here.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None

    # ---- experience bracket (called by the runner)
    def start_experience(self, index: int) -> None:
        self._current = {"experience": index, "train_time_s": 0.0, "samples": 0, "steps": 0}

    def end_experience(self, strategy) -> dict[str, Any]:
        rec = self._current or {}
        rec["trainable_params"] = sum(p.numel() for p in strategy.parameters() if p.requires_grad)
        rec["total_params"] = sum(p.numel() for p in strategy.parameters())
        rec["samples_per_s"] = rec["samples"] / rec["train_time_s"] if rec.get("train_time_s") else None
        self.records.append(rec)
        self._current = None
        return rec

    def totals(self) -> dict[str, Any]:
        return {
            "train_time_s": sum(r["train_time_s"] for r in self.records),
            "samples": sum(r["samples"] for r in self.records),
            "steps": sum(r["steps"] for r in self.records),
            "peak_memory_bytes": max((r.get("peak_memory_bytes") or 0 for r in self.records), default=0),
            "peak_memory_kind": self.records[-1].get("peak_memory_kind") if self.records else None,
        }

    # ---- Lightning hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        if self._current is None:
            self.start_experience(-1)
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._rss_before = _rss_high_water_bytes()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._current["samples"] += len(batch)
        self._current["steps"] += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        cuda = torch.cuda.is_available() and pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        self._current["train_time_s"] += time.perf_counter() - self._t0
        if cuda:
            peak, kind = torch.cuda.max_memory_allocated(), "cuda_allocator"
        else:
            peak, kind = max(_rss_high_water_bytes() - self._rss_before, 0), "cpu_rss"
        self._current["peak_memory_bytes"] = max(self._current.get("peak_memory_bytes", 0), peak)
        self._current["peak_memory_kind"] = kind


def _rss_high_water_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
