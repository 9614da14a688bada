"""EWC's per-sample Fisher: the vectorised estimate (torch.func vmap over per-sample gradients)
against the per-sample autograd loop it replaced, timed in one run on the same inputs; on a
network of Linear layers only (`--backbone clbench_mlp --scenario digits-5`) also the "linear"
path (one backward, per-layer products of squared inputs and output gradients).

    python benchmarks/ewc_fisher.py [--backbone resnet18_cifar] [--scenario synthetic32-3]  (--backbone "": the scenario's)
                                    [--samples 256] [--batch 32] [--repeats 5] [--threads 1] [--device cpu]

Both contenders call the method's own `accumulate_fisher` over `--samples` samples in
batches of `--batch` (what the "fisher" phase does) on one EWC strategy, switching only
`vectorised_fisher`; each runs once untimed (first-call costs), then both run round-robin
`--repeats` times so load on shared cores hits both alike.  Prints the medians, the ratio
loop / vectorised, and the largest relative difference between the two Fisher estimates
(they are the same sum, up to float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(args):
    from clbench.engine.runner import create_scenario, create_strategy, strategy_config
    from clbench.models.backbones import build_backbone

    scenario = create_scenario(args.scenario)
    torch.manual_seed(args.seed)
    args.backbone = args.backbone or scenario.default_backbone
    backbone = build_backbone(args.backbone, in_chans=scenario.input_shape[0],
                              img_size=scenario.input_shape[-1])
    strategy = create_strategy("ewc", backbone, scenario.num_classes, strategy_config("ewc", {}), seed=args.seed)
    strategy.on_experience_start(scenario.info(0))
    strategy.to(args.device)
    data = scenario.train_sets[0]
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randint(len(data), (args.samples,), generator=g)
    x, y = data.x[idx].to(args.device), data.y[idx].to(args.device)
    return strategy, x, y


def fisher(strategy, x, y, batch: int, vectorised: bool | str) -> tuple[float, dict[str, torch.Tensor]]:
    from clbench.types import Batch

    strategy.vectorised_fisher = vectorised is not False
    strategy.linear_fisher = vectorised == "linear"
    strategy._fisher_new, strategy._fisher_count = {}, 0
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        strategy.accumulate_fisher(Batch(x[i : i + batch], y[i : i + batch]))
    sync()
    elapsed = time.perf_counter() - start
    expected = {False: "loop", True: "vmap", "linear": "linear"}[vectorised]
    assert strategy.fisher_path == expected, f"{expected} fell back to {strategy.fisher_path} on this network"
    return elapsed, {k: v.clone() for k, v in strategy._fisher_new.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18_cifar")
    p.add_argument("--scenario", default="synthetic32-3")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    strategy, x, y = build(args)
    n_params = sum(p.numel() for p in strategy.parameters() if p.requires_grad)
    print(f"backbone {args.backbone}, {n_params:,} parameters, {args.samples} samples in batches of {args.batch}, "
          f"device {args.device}, torch {torch.__version__}, {args.threads} thread(s)")
    _, loop_f = fisher(strategy, x, y, args.batch, vectorised=False)  # untimed warm-up, and the reference
    _, vmap_f = fisher(strategy, x, y, args.batch, vectorised=True)
    def rel_diff(f):
        return max(float(((f[k] - loop_f[k]).abs().max() / loop_f[k].abs().max().clamp_min(1e-30))) for k in loop_f)

    from clbench.strategies.ewc import linear_layers

    params = {n: p for n, p in strategy.named_parameters() if p.requires_grad}
    modes = {"loop": False, "vectorised": True}
    diff = rel_diff(vmap_f)
    if linear_layers(strategy, params) is not None:
        modes["linear"] = "linear"
        diff = max(diff, rel_diff(fisher(strategy, x, y, args.batch, vectorised="linear")[1]))
    times = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, mode in modes.items():
            times[name].append(fisher(strategy, x, y, args.batch, vectorised=mode)[0])
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["loop"] / medians["vectorised"]
    for name, m in medians.items():
        print(f"{name:>10}: {m * 1e3:9.1f} ms median of {args.repeats} ({m / args.samples * 1e3:.2f} ms/sample)")
    extra = f", loop / linear: {medians['loop'] / medians['linear']:.2f}x" if "linear" in medians else ""
    print(f"ratio loop / vectorised: {ratio:.2f}x{extra}; largest relative difference of the estimates: {diff:.1e}")
    return {"medians_s": medians, "ratio": ratio, "max_rel_diff": diff}


if __name__ == "__main__":
    main()
