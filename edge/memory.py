"""Peak memory per experience: the CUDA allocator's peak, or the process RSS high-water mark.

`tracemalloc` never sees tensor storage and `ru_maxrss` is a lifetime maximum that
cannot be reset. On Linux the kernel keeps a per-process RSS high-water mark (VmHWM)
that writing "5" to /proc/self/clear_refs resets (Linux >= 4.0): it sees every peak
exactly and costs nothing while training. Where that file cannot be written
(other systems, locked-down containers) a background thread samples the resident set
size every `interval_s` and the profiler adds samples at batch ends, so a peak that
lives for one step is not missed. `RssPeak.method` says which one measured.
Resetting VmHWM also lowers what `getrusage().ru_maxrss` reports for this process.

Before each baseline is read, `release_freed_memory` collects Python's cyclic garbage and asks
glibc to return freed heap pages to the kernel (`malloc_trim(0)`). Without that, memory freed by
an earlier experience or an earlier seed in the same process (old Trainers awaiting a full
collection, activations freed below a live allocation) stays resident, the next experience reuses
it without the RSS rising, and its rise reads near 0 (three seeds in one process: 63, 2.1, 2.1 MiB
for the same work; with the release: 63, 49, 49 MiB).

Three numbers describe the CPU peak of an experience: `baseline` (the RSS just before it, after
the release), `peak` (the process's peak RSS during it: what the OS had to provide) and
`peak_above_baseline` (the rise, what the experience itself added).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import re
import threading
import time

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def kernel_peak_rss_bytes() -> int | None:
    """The kernel's RSS high-water mark (VmHWM) of this process, or None where there is none."""
    try:
        with open(_STATUS, "rb") as f:
            match = re.search(rb"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_kernel_peak_rss() -> bool:
    """Lower VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return kernel_peak_rss_bytes() is not None


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Collect cyclic garbage and return the allocator's free pages to the OS (glibc), so the RSS
    read next is what is alive, not what earlier work freed and the allocator kept."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class RssPeak:
    """Peak RSS above a baseline: the kernel's resettable high-water mark, or a sampling thread."""

    def __init__(self, interval_s: float = 0.01, use_kernel_peak: bool = True):
        self.interval_s = interval_s
        self.use_kernel_peak = use_kernel_peak
        self.method = "vmhwm" if use_kernel_peak else "sampled"
        self.baseline = 0
        self.peak = 0
        self.release_s = 0.0  # seconds the last reset spent in release_freed_memory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reset(self, release: bool = True) -> None:
        """New baseline (the RSS just before the experience, after `release_freed_memory` unless
        `release` is False) and a cleared peak."""
        t0 = time.perf_counter()
        if release:
            release_freed_memory()
        self.release_s = time.perf_counter() - t0
        if self.use_kernel_peak and not reset_kernel_peak_rss():
            self.use_kernel_peak, self.method = False, "sampled"
        self.baseline = current_rss_bytes()
        self.peak = self.baseline

    @property
    def needs_samples(self) -> bool:
        return not self.use_kernel_peak

    def sample(self) -> None:
        rss = kernel_peak_rss_bytes() if self.use_kernel_peak else current_rss_bytes()
        if rss is not None and rss > self.peak:
            self.peak = rss

    def start(self) -> None:
        if self._thread is not None or self.use_kernel_peak:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="clbench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        if self._thread is not None:
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
