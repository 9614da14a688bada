"""Per-step time of `clbench run` at the papers' architectures against a hand-written PyTorch loop.

Two settings, each trained for `--steps` optimiser steps per measurement:

- PrePrompt at ViT-B/16 (timm `vit_base_patch16_224`, random weights, depth 12 / width 768): a step is
  PrePrompt's training step -- one unprompted pass under no_grad feeding the route head (route loss), one
  prompted pass with per-block key/value prefixes (prompt_length tokens in the first prompt_blocks
  blocks) feeding the label head (label loss), one backward, Adam on the prompts and both heads;
- ER at Mammoth's CIFAR ResNet-18 (nf 64, 32 px): a batch of 32 new samples plus 32 replayed ones from
  the buffer, one forward over the 64, cross-entropy, backward, SGD.

clbench is timed as `clbench.cli.main(["run", ...])` runs it: the profiler's measured `train_time_s` of the
second experience (FLOP counting off, checkpoints off, evaluation on 1 image) over its optimiser steps. That
time covers every phase of the experience, so the hand loops do the same work: PrePrompt's also runs the
statistics pass (a no-grad prompted pass per batch), ER's also writes each batch into its buffer; only
clbench's data loading and augmentation have no counterpart. The two are run interleaved `--repeats` times
(one warm-up each first), so load on shared cores hits both alike; the ratio clbench / hand per repeat is
summarised by its median and a bootstrap 95% interval of the median. Target: median ratio <= 1.05.

    python benchmarks/real_scale_step.py [--repeats 5] [--steps 3] [--vit-image 64] [--vit-batch 8] [--threads 2] [--only preprompt|er]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REVISION = "0123456789abcdef0123456789abcdef01234567"
VIT = "vit_base_patch16_224.orig_in21k"  # PrePrompt's default backbone


# --------------------------------------------------------------------------- data and weights
def write_fixtures(root: Path, per_class: int) -> None:
    """A CIFAR-100 python-pickle fixture (random 32x32 images) and a random ViT-B/16 in the hub cache."""
    import timm
    from safetensors.torch import save_file

    folder = root / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for split, n in (("train", per_class), ("test", 1)):
        labels = [c for c in range(100) for _ in range(n)]
        data = rng.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * len(labels), b"batch_label": split.encode(), b"fine_labels": labels,
                         b"coarse_labels": [c // 5 for c in labels], b"data": data}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{c}".encode() for c in range(100)],
                     b"coarse_label_names": [f"s{c}".encode() for c in range(20)]}, f, protocol=2)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    repo = root / "hub" / f"models--timm--{VIT}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def register_two_experience_cifar() -> None:
    from clbench.registry import SCENARIOS
    from clbench.scenarios import cifar
    from clbench.scenarios.base import split_increments

    SCENARIOS._load()
    SCENARIOS._entries["cifar100-2"] = lambda options: cifar._cifar100("cifar100-2", split_increments(100, 2), options)


# --------------------------------------------------------------------------- clbench
def clbench_step(root: Path, strategy: str, steps: int, batch: int, extra: list[str]) -> float:
    """Seconds per training step of the second experience of `clbench run`: its profiler's train time, which
    covers every phase of the experience (PrePrompt's statistics pass too), over the `steps` optimiser steps."""
    from clbench.cli import main

    out = Path(tempfile.mkdtemp(dir=root))
    args = ["run", "--strategy", strategy, "--scenario", "cifar100-2", "--data-root", str(root / "data"),
            "--output-dir", str(out), "--quiet", "--epochs", "1", "--batch-size", str(batch), "--flops", "off",
            "--set", f"limit_train_batches={steps}", "limit_eval_samples=1", "checkpoint=false", "progress=false",
            *extra]
    assert main(args) == 0, args
    (path,) = out.rglob("*.json")
    rec = json.loads(path.read_text())["edge"]["per_experience"][1]  # second experience: replay is on for ER
    # rec["steps"] also counts PrePrompt's statistics batches (no optimiser step): dividing by it would
    # halve PrePrompt's time per step against a hand loop that has no such pass
    return rec["train_time_s"] / steps


# --------------------------------------------------------------------------- hand loops
def hand_vit_step(model, heads, prompts, image: int, batch: int, steps: int, blocks: int) -> float:
    """PrePrompt's step by hand: no-grad plain pass -> route head; prefixed pass -> label head; one backward.
    Then, as PrePrompt's statistics phase does once per training batch, one no-grad prefixed pass."""
    route_head, label_head = heads
    opt = torch.optim.Adam([prompts, *route_head.parameters(), *label_head.parameters()], lr=1e-3)
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, 50, (batch,))

    def attention(attn, h, prefix):
        b, n, _ = h.shape
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        pk, pv = (p.reshape(len(p), attn.num_heads, attn.head_dim).expand(b, -1, -1, -1).permute(0, 2, 1, 3) for p in prefix)
        out = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2))
        return attn.proj(out.transpose(1, 2).reshape(b, n, -1))

    def prompted(x):
        h = model.patch_embed(x)
        h = model._pos_embed(h)
        for i, blk in enumerate(model.blocks):
            if i < blocks:
                h = h + attention(blk.attn, blk.norm1(h), prompts[i])
                h = h + blk.mlp(blk.norm2(h))
            else:
                h = blk(h)
        return model.forward_head(model.norm(h), pre_logits=True)

    start = time.perf_counter()
    for _ in range(steps):
        with torch.no_grad():
            plain = model(x)
        loss = F.cross_entropy(route_head(plain), y) + F.cross_entropy(label_head(prompted(x)), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([prompts], 1.0)
        opt.step()
    with torch.no_grad():
        for _ in range(steps):
            prompted(x)
    return (time.perf_counter() - start) / steps


def hand_resnet_step(model, head, batch: int, steps: int) -> float:
    """ER's step by hand: 32 new + 32 replayed samples, one forward, CE, backward, SGD, then the new samples
    written into the buffer (reservoir insertion: random slots of a full buffer), as ER does every step."""
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    buffer_x, buffer_y = torch.randn(200, 3, 32, 32), torch.randint(0, 50, (200,))
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(50, 100, (batch,))
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(buffer_x), (batch,))
        xb, yb = torch.cat([x, buffer_x[idx]]), torch.cat([y, buffer_y[idx]])
        loss = F.cross_entropy(head(model(xb)), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        slots = torch.randint(0, len(buffer_x), (batch,))
        buffer_x[slots], buffer_y[slots] = x, y
    return (time.perf_counter() - start) / steps


# --------------------------------------------------------------------------- statistics
def bootstrap_median(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    p.add_argument("--vit-image", type=int, default=64, help="ViT input side (224: the paper's)")
    p.add_argument("--vit-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=("preprompt", "er"), help="measure one setting only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")

    import timm
    from clbench.engine.runner import quiet_lightning
    from clbench.models.backbones import build_backbone
    from clbench.registry import STRATEGIES

    quiet_lightning()
    root = Path(tempfile.mkdtemp(prefix="real-scale-"))
    per_class = max(2, (32 * args.steps * 2) // 50 + 1)  # enough training images for the steps of an experience
    write_fixtures(root, per_class)
    os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = str(root / "hub"), "1"
    register_two_experience_cifar()

    cfg = STRATEGIES.get("preprompt").Config()
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=args.vit_image).eval()
    vit.requires_grad_(False)
    prompts = torch.nn.Parameter(torch.empty(cfg.prompt_blocks, 2, cfg.prompt_length, 768).uniform_(-1, 1))
    vit_heads = (torch.nn.Linear(768, 100), torch.nn.Linear(768, 100))
    resnet = build_backbone("resnet18_cifar", in_chans=3, img_size=32)
    resnet_head = torch.nn.Linear(512, 100)

    contenders = {
        "PrePrompt ViT-B/16": (
            lambda: clbench_step(root, "preprompt", args.steps, args.vit_batch,
                                 ["--pretrained", "--set", f"image_size={args.vit_image}", "calibration_epochs=0"]),
            lambda: hand_vit_step(vit, vit_heads, prompts, args.vit_image, args.vit_batch, args.steps, cfg.prompt_blocks)),
        "ER CIFAR ResNet-18": (
            lambda: clbench_step(root, "er", args.steps, 32, ["--set", "replay_batch_size=32"]),
            lambda: hand_resnet_step(resnet, resnet_head, 32, args.steps)),
    }
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# real_scale_step.py, {when}; {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads; load average {os.getloadavg()[0]:.1f}")
    print(f"# steps per measurement {args.steps}, repeats {args.repeats}; ViT at {args.vit_image} px, batch "
          f"{args.vit_batch}; ResNet batch 32 + 32 replay")
    print("| setting | clbench s/step (median) | hand s/step (median) | ratio median | 95% bootstrap interval |")
    print("|---|---|---|---|---|")
    for name, (ours, hand) in contenders.items():
        if args.only and not name.lower().startswith(args.only):
            continue
        ours(), hand()  # warm-up: imports, allocator, first calls
        a, b = [], []
        for _ in range(args.repeats):
            a.append(ours())
            b.append(hand())
        ratios = [x / y for x, y in zip(a, b)]
        lo, hi = bootstrap_median(ratios)
        print(f"| {name} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | "
              f"{statistics.median(ratios):.3f} | [{lo:.3f}, {hi:.3f}] |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
