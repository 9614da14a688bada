"""CLFD's efficiency claims, measured: ER vs CLFD-ER and DER++ vs CLFD-DER++ on one small scenario.

    python benchmarks/rehearsal_efficiency.py [--scenario synthetic32-3] [--backbone resnet18_cifar_nf20]
        [--epochs 2] [--batch-size 32] [--buffer 50] [--seed 0] [--threads 1] [--pairs er,der_pp]

Each method trains the whole stream once with clbench's runner (same seed, backbone,
batch size = replay batch size, nominal buffer of N images; CLFD stores 4N codes in the
same bytes).  Read from each run's EdgeProfiler totals:
  - training FLOPs: every op of every training step (FlopCounterMode, corrected), replay included;
  - peak memory: the CUDA allocator's peak on a GPU, the sampled process RSS above its
    pre-experience baseline on CPU (noisy for small models: the Python/torch overhead dominates);
  - wall time of the training fits;
  - bytes of the tensors autograd saves for backward in one training step of the trained
    strategy (current batch + replay batch; storages counted once): a device-independent
    proxy of activation memory (CLFD-ER/ER = 0.35 for batch 32+32 at 32x32, derived from the
    paper's architecture).
Each run happens in a fresh process, so the CPU RSS baseline is not shared between methods.
Ratios CLFD / base are printed next to the CLFD paper's (Liu et al., NeurIPS 2024): FLOPs 0.25 (derived from
the official modules), GPU peak memory 0.37-0.41 (Table 1: 205/497 MB ER, 241/646 MB
DER++, ResNet-18 nf=64, S-CIFAR-10), Jetson Orin NX training time 1/2.3 (ER) and 1/2.5
(DER++).  CPU wall-time ratios are expected to be far from the FLOP ratio on small
models (per-step Python overhead; the official code measured about 1/1.8 on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile

import torch

from clbench import config as C
from clbench.engine.runner import RunSpec, quiet_lightning, run

PAPER = {  # CLFD / base, from the CLFD paper (Liu et al., NeurIPS 2024)
    "er": {"flops": "0.25", "saved": "0.35 (derived)", "memory": "0.41 (205/497 MB)", "time": "0.43 (2.8/6.5 h, Orin NX)"},
    "der_pp": {"flops": "0.25", "saved": "-", "memory": "0.37 (241/646 MB)", "time": "0.39 (4.1/10.5 h, Orin NX)"},
}


def measure(strategy: str, args, out: str) -> dict:
    """One whole run, in a fresh process (clean RSS baseline, no allocator reuse between methods)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (strategy, args, out))


def _measure(strategy: str, args, out: str) -> dict:
    torch.set_num_threads(args.threads)
    quiet_lightning()
    trained = {}
    cfg = C.RunConfig(epochs=args.epochs, batch_size=args.batch_size, progress=False, output_dir=out,
                      backbone=args.backbone, accelerator=args.accelerator)
    overrides = {"buffer_size": args.buffer, "replay_batch_size": args.batch_size}
    result = run(RunSpec(strategy, args.scenario, run=cfg, strategy_overrides=overrides, seed=args.seed),
                 on_experience=lambda i, res, s: trained.update(strategy=s))
    if result.status != "completed":
        raise SystemExit(f"{strategy}: {result.status}: {result.error}")
    totals = result.edge.get("totals", {})
    return {
        "flops": totals.get("train_flops_total"),
        "memory": totals.get("peak_memory_bytes"),
        "memory_kind": totals.get("peak_memory_kind"),
        "time": totals.get("train_time_s"),
        "accuracy": result.metrics.get("final_avg_acc"),
        "saved": saved_for_backward_bytes(trained["strategy"], args),
    }


def saved_for_backward_bytes(strategy, args) -> int:
    """Bytes autograd keeps for backward in one step (each storage once), buffer full, last experience."""
    from clbench.datasets import make_loader
    from clbench.engine.runner import create_scenario

    scenario = create_scenario(args.scenario)
    batch = next(iter(make_loader(scenario.train_sets[-1], args.batch_size, shuffle=False))).to(strategy.device)
    strategy.train()
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        strategy.step_losses(batch)
    return sum(seen.values())


def ratio(a, b) -> str:
    return f"{a / b:.3f}" if a and b else "n/a"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="synthetic32-3")
    p.add_argument("--backbone", default="resnet18_cifar_nf20")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--buffer", type=int, default=50, help="nominal buffer, in images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--pairs", default="er,der_pp")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    print(f"scenario {args.scenario}, backbone {args.backbone}, {args.epochs} epochs, batch {args.batch_size} + replay "
          f"{args.batch_size}, nominal buffer {args.buffer} images, seed {args.seed}")
    header = f"{'pair':<22}{'quantity':<14}{'base':>14}{'CLFD':>14}{'ratio':>9}   paper ratio"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as out:
        for base in args.pairs.split(","):
            b, c = measure(base, args, out), measure(f"{base}_clfd", args, out)
            pair = f"{base} vs {base}_clfd"
            rows = [
                ("train FLOPs", f"{b['flops'] or 0:.3e}", f"{c['flops'] or 0:.3e}", ratio(c["flops"], b["flops"]), PAPER[base]["flops"]),
                ("saved for bwd", f"{b['saved'] / 2**20:.1f} MiB", f"{c['saved'] / 2**20:.1f} MiB", ratio(c["saved"], b["saved"]), PAPER[base]["saved"]),
                (f"peak mem ({b['memory_kind']})", f"{(b['memory'] or 0) / 2**20:.1f} MiB", f"{(c['memory'] or 0) / 2**20:.1f} MiB",
                 ratio(c["memory"], b["memory"]), PAPER[base]["memory"]),
                ("train time", f"{b['time']:.1f} s", f"{c['time']:.1f} s", ratio(c["time"], b["time"]), PAPER[base]["time"]),
                ("final acc", f"{b['accuracy']:.3f}", f"{c['accuracy']:.3f}", "", ""),
            ]
            for i, (name, vb, vc, r, paper) in enumerate(rows):
                print(f"{pair if i == 0 else '':<22}{name:<14}{vb:>14}{vc:>14}{r:>9}   {paper}")


if __name__ == "__main__":
    main()
