"""Peak RSS per experience: the kernel high-water mark and the sampling-thread fallback."""

import time

import pytest
import torch
from clbench.edge import memory

MIB = 2**20


def _transient(mib: int, hold_s: float = 0.0) -> None:
    blob = torch.ones(mib * MIB // 4)  # written, so every page is resident
    time.sleep(hold_s)
    del blob


@pytest.mark.skipif(not memory.reset_kernel_peak_rss(), reason="kernel RSS high-water mark not resettable here")
def test_kernel_peak_sees_an_allocation_freed_before_any_sample_and_resets():
    peak = memory.RssPeak()
    peak.reset()
    peak.start()
    _transient(96)  # allocated and freed between two reads: only the kernel's mark can see it
    peak.stop()
    assert peak.method == "vmhwm"
    assert peak.peak_above_baseline >= 90 * MIB  # other memory may be released meanwhile
    peak.reset()
    peak.start()
    _transient(8)
    peak.stop()
    assert peak.peak_above_baseline < 48 * MIB


def test_sampling_fallback_sees_an_allocation_held_past_one_interval():
    peak = memory.RssPeak(interval_s=0.005, use_kernel_peak=False)
    peak.reset()
    peak.start()
    _transient(96, hold_s=0.1)
    peak.stop()
    assert peak.method == "sampled"
    assert peak.peak_above_baseline >= 90 * MIB  # other memory may be released meanwhile
    peak.reset()
    assert peak.peak_above_baseline == 0
