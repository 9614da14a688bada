"""Cost of FLOP counting per training step: the digits MLP's SGD step plain, under an empty
dispatch mode, under clbench's counter and under torch's own `FlopCounterMode`.

    python benchmarks/flop_counter_speed.py [--batch 32] [--repeats 10]

The four are timed round-robin in one process (blocks of 50 steps), so load changes on a
shared machine hit all alike; medians of the blocks are printed, with ratios to the plain step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from clbench.edge.flops import Counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


class EmptyDispatchMode(TorchDispatchMode):
    """Runs every op unchanged: the floor of any per-op counting in Python."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(args.batch, 64), torch.randint(0, 10, (args.batch,))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    counter, torch_mode = Counter(trace=True), FlopCounterMode(display=False)
    modes = {"plain step": contextlib.nullcontext, "empty dispatch mode": EmptyDispatchMode,
             "clbench Counter (with op trace)": lambda: counter, "torch FlopCounterMode": lambda: torch_mode}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(2):  # warm-up
        for make in modes.values():
            with make():
                step()
    for _ in range(args.repeats):
        for name, make in modes.items():
            t0 = time.perf_counter()
            for _ in range(50):
                with make():
                    step()
            seconds[name].append((time.perf_counter() - t0) / 50)
    plain = statistics.median(seconds["plain step"])
    print(f"64-256-256-10 MLP, SGD with momentum, batch {args.batch}: one training step")
    for name, times in seconds.items():
        t = statistics.median(times)
        print(f"  {name:32s} {1e3 * t:6.2f} ms  ({t / plain:.2f}x plain)")
    assert counter.total == int(torch_mode.get_total_flops()), "clbench and torch counted different FLOPs"
    print(f"  both counters: {counter.total:,} FLOPs per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
