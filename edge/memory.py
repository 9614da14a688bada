"""Peak memory per experience: the CUDA allocator's peak, or a sampled process RSS high-water mark.

`tracemalloc` never sees tensor storage and `ru_maxrss` is a lifetime maximum that
cannot be reset, so on CPU a background thread samples the resident set size every
`interval_s` (and the profiler adds synchronous samples at batch ends, so a peak
that lives for one step is not missed).
"""

from __future__ import annotations

import os
import threading

import torch


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().rss)


class RssPeak:
    """Peak RSS above a baseline, sampled by a daemon thread while running."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """New baseline (the RSS just before the experience) and a cleared peak."""
        self.baseline = current_rss_bytes()
        self.peak = self.baseline

    def sample(self) -> None:
        rss = current_rss_bytes()
        if rss > self.peak:
            self.peak = rss

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="clbench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sample()

    @property
    def peak_above_baseline(self) -> int:
        return max(self.peak - self.baseline, 0)


def cuda_reset() -> None:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def cuda_peaks() -> dict[str, int]:
    torch.cuda.synchronize()
    return {"peak_alloc_bytes": int(torch.cuda.max_memory_allocated()), "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}
