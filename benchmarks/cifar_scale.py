"""CIFAR scale: a whole clbench run against a hand-written PyTorch loop doing the same work, process CPU time.

    python benchmarks/cifar_scale.py [--per-class 4] [--test-per-class 2] [--repeats 3] [--strategies naive,er]

The data: a CIFAR-100-format fixture written to a temporary directory in the standard python
pickle layout (`cifar-100-python/{train,test,meta}`, the dicts of b"data" uint8 (N, 3072) rows and
b"fine_labels"), `--per-class` training and `--test-per-class` test images of each of the 100
classes, random pixels (seeded). clbench reads it with its own CIFAR-100 reader
(`scenarios/cifar.py`: PyCIL class order, seed 1993); the benchmark registers `cifar100-2`, that
reader's CIFAR-100 split into 2 experiences x 50 classes (clbench ships 5, 10 and 20 experiences).

The contenders, each timed as process CPU time of everything it does (data loading included), one
torch thread, CPU:
- clbench: `clbench.engine.runner.run(RunSpec(strategy, "cifar100-2"))` in this process with the
  run's defaults (profiler and checkpoints on), one epoch, batch 32, backbone `resnet18_cifar`;
  `er` replays 32 samples per step from a 200-sample reservoir.
- hand: the same work written directly in PyTorch: read the pickles, the same class order and label
  positions, per-batch normalisation and PyCIL's augmentation (pad-4 crop, flip, brightness 63/255),
  the same network (`resnet18_cifar` from clbench's backbone builder, plus a linear head of the seen
  classes that grows from 50 to 100 rows), SGD lr 0.05 momentum 0.9 fresh per experience, CE; for
  `er` a reservoir of 200 non-augmented images, 32 replayed per step concatenated to the batch;
  after each experience the accuracy on the seen experiences' test images (batch 256).
Each contender runs once untimed (first calls), then `--repeats` rounds, clbench and hand
alternating (the order flips every round). Printed: each run's CPU seconds, and per strategy the
median of the per-round ratios clbench / hand with a percentile bootstrap 95% interval
(`peer_avalanche.paired_ratio_interval`, exact for few rounds). Target: <= 1.05.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_avalanche import paired_ratio_interval  # noqa: E402

SCENARIO = "cifar100-2"
BATCH, REPLAY, MEMORY, LR, MOMENTUM, EVAL_BATCH = 32, 32, 200, 0.05, 0.9, 256
MEAN, STD, BRIGHTNESS = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 63 / 255


# --------------------------------------------------------------------------- the fixture
def write_fixture(root: Path, per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """`root/cifar-100-python/{train,test,meta}` as the CIFAR-100 python tarball holds them."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), n)
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist(), b"coarse_labels": [0] * len(labels),
                         b"filenames": [b"x"] * len(labels), b"batch_label": name.encode()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [b"all"]}, f)
    return root


def register_scenario_once() -> None:
    from clbench.registry import SCENARIOS, register_scenario

    SCENARIOS._load()  # the shipped scenarios first: names() then lists what is registered in this process
    if SCENARIO in SCENARIOS.names():
        return
    from clbench.scenarios import cifar
    from clbench.scenarios.base import split_increments

    @register_scenario(SCENARIO)
    def cifar100_2(options):
        """CIFAR-100, 2 experiences x 50 classes (PyCIL order: seed 1993); benchmarks/cifar_scale.py."""
        return cifar._cifar100(SCENARIO, split_increments(100, 2), options)


# --------------------------------------------------------------------------- clbench
def run_clbench(strategy: str, root: Path, out: Path, seed: int) -> float:
    from clbench.config import RunConfig
    from clbench.engine import runner

    # measured as `clbench run` runs it, the first run of its process: a later run of the same process
    # (a sweep) first collects what the earlier one left, which a one-run process has no need of
    runner._runs_started_in_process = 0
    t0 = time.process_time()
    cfg = RunConfig(accelerator="cpu", progress=False, output_dir=str(out), data_root=str(root), epochs=1,
                    batch_size=BATCH, eval_batch_size=EVAL_BATCH, backbone="resnet18_cifar")
    overrides = {"buffer_size": MEMORY, "replay_batch_size": REPLAY} if strategy == "er" else {}
    result = runner.run(runner.RunSpec(strategy=strategy, scenario=SCENARIO, run=cfg, seed=seed,
                                       strategy_overrides=overrides, overwrite=True))
    cpu = time.process_time() - t0
    if result.status != "completed":
        raise RuntimeError(f"clbench {strategy}: {result.status} {result.error}")
    return cpu


# --------------------------------------------------------------------------- the hand-written loop
def augment(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Pad-4 random crop, horizontal flip of half the batch, brightness jitter (normalised inputs)."""
    b, c, h, w = x.shape
    padded = (-mean / std).expand(b, c, h + 8, w + 8).clone()
    padded[:, :, 4 : 4 + h, 4 : 4 + w] = x
    top, left = torch.randint(0, 9, (b,)), torch.randint(0, 9, (b,))
    rows = (top[:, None] + torch.arange(h))[:, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, :]
    out = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    factor = 1 + (2 * torch.rand(b, 1, 1, 1) - 1) * BRIGHTNESS
    return ((((out * std + mean) * factor).clamp(0, 1) - mean) / std).contiguous()


class Reservoir:
    def __init__(self, capacity: int, seed: int):
        self.x, self.y, self.seen, self.capacity = None, None, 0, capacity
        self.g = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.x is None:
            self.x, self.y = x.new_zeros((self.capacity, *x.shape[1:])), y.new_zeros(self.capacity)
        for i in range(len(y)):
            slot = self.seen if self.seen < self.capacity else int(torch.randint(0, self.seen + 1, (1,), generator=self.g))
            if slot < self.capacity:
                self.x[slot], self.y[slot] = x[i], y[i]
            self.seen += 1

    def sample(self, n: int):
        size = min(self.seen, self.capacity)
        idx = torch.randperm(size, generator=self.g)[:n]
        return self.x[idx], self.y[idx]


def run_hand(strategy: str, root: Path, seed: int) -> float:
    from clbench.models.backbones import build_backbone

    t0 = time.process_time()
    torch.manual_seed(seed)
    folder = root / "cifar-100-python"
    with open(folder / "train", "rb") as f:
        train = pickle.load(f, encoding="bytes")
    with open(folder / "test", "rb") as f:
        test = pickle.load(f, encoding="bytes")
    order = np.random.RandomState(1993).permutation(100)  # PyCIL's class order
    position = torch.empty(100, dtype=torch.long)
    position[torch.as_tensor(order)] = torch.arange(100)

    def tensors(d):
        return (torch.from_numpy(d[b"data"]).view(-1, 3, 32, 32), position[torch.as_tensor(d[b"fine_labels"])])

    (train_x, train_y), (test_x, test_y) = tensors(train), tensors(test)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def normalise(x_uint8):
        return (x_uint8.float() / 255 - mean) / std

    backbone = build_backbone("resnet18_cifar", in_chans=3, img_size=32)
    head = nn.Linear(backbone.num_features, 0)
    buffer = Reservoir(MEMORY, seed) if strategy == "er" else None
    loader_gen = torch.Generator().manual_seed(seed)
    for exp in range(2):
        seen = 50 * (exp + 1)
        old, head = head, nn.Linear(backbone.num_features, seen)
        with torch.no_grad():
            head.weight[: old.out_features] = old.weight
            head.bias[: old.out_features] = old.bias
        params = [*backbone.parameters(), *head.parameters()]
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        mine = torch.nonzero((train_y >= 50 * exp) & (train_y < seen)).flatten()
        mine = mine[torch.randperm(len(mine), generator=loader_gen)]
        backbone.train()
        for start in range(0, len(mine), BATCH):
            idx = mine[start : start + BATCH]
            raw, y = normalise(train_x[idx]), train_y[idx]
            x = augment(raw, mean, std)
            if buffer is not None and buffer.seen:
                rx, ry = buffer.sample(REPLAY)
                x, y_all = torch.cat([x, augment(rx, mean, std)]), torch.cat([y, ry])
            else:
                y_all = y
            loss = F.cross_entropy(head(backbone(x)), y_all)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if buffer is not None:
                buffer.add(raw, y)
        backbone.eval()
        with torch.no_grad():  # accuracy on each seen experience's test images
            for j in range(exp + 1):
                keep = torch.nonzero((test_y >= 50 * j) & (test_y < 50 * (j + 1))).flatten()
                correct = 0
                for start in range(0, len(keep), EVAL_BATCH):
                    idx = keep[start : start + EVAL_BATCH]
                    correct += int((head(backbone(normalise(test_x[idx]))).argmax(1) == test_y[idx]).sum())
    return time.process_time() - t0


# --------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=4, help="training images per class (default 4)")
    ap.add_argument("--test-per-class", type=int, default=2, help="test images per class (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategies", default="naive,er")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from clbench.engine.runner import quiet_lightning

    quiet_lightning()
    register_scenario_once()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_fixture(Path(tmp) / "data", args.per_class, args.test_per_class)
        out = Path(tmp) / "results"
        print(f"CIFAR-100 fixture {args.per_class}+{args.test_per_class} images per class, {SCENARIO} (2 x 50 classes), "
              f"resnet18_cifar, 1 epoch, batch {BATCH} (+{REPLAY} replay for er, memory {MEMORY}), torch "
              f"{torch.__version__}, {torch.get_num_threads()} thread(s), CPU; clbench and hand alternating", flush=True)
        times = {s: {"clbench": [], "hand": []} for s in strategies}
        for s in strategies:  # first calls, untimed
            run_clbench(s, root, out, 1000)
            run_hand(s, root, 1000)
        for r in range(args.repeats):
            for s in strategies:
                sides = [("clbench", lambda s=s, r=r: run_clbench(s, root, out, r)), ("hand", lambda s=s, r=r: run_hand(s, root, r))]
                for side, fn in (sides if r % 2 == 0 else sides[::-1]):
                    cpu = fn()
                    times[s][side].append(cpu)
                    print(f"  round {r} {s:6s} {side:8s} cpu {cpu:7.2f} s", flush=True)
        print()
        print(f"{'strategy':10s} {'clbench s (median)':>18s} {'hand s (median)':>16s}   ratio clbench / hand (median, 95% CI)")
        for s in strategies:
            med, lo, hi = paired_ratio_interval(times[s]["clbench"], times[s]["hand"])
            c, h = (float(np.median(times[s][k])) for k in ("clbench", "hand"))
            print(f"{s:10s} {c:18.2f} {h:16.2f}   {med:.3f} [{lo:.3f}, {hi:.3f}]")
        print("ratio: process CPU time of a whole clbench run / the hand-written loop, median of paired per-round "
              "ratios, bootstrap 95% CI; target <= 1.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
