"""Command line: `clbench run | download | list | profile | sweep | leaderboard | plot`.

Imports stay lazy so `clbench --help` and `clbench list` never load torch or avalanche.
Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any, Sequence

from clbench.config import parse_aux
from clbench.errors import UsageError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clbench", description="Continual-learning benchmark: accuracy and edge efficiency.")
    from clbench._version import __version__

    p.add_argument("--version", action="version", version=f"clbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="train a strategy over a scenario and store the result JSON")
    add_run_arguments(r)
    r.add_argument("--seeds", type=int, nargs="+", default=None, help="run once per seed (overrides --seed)")
    r.add_argument("--resume", action="store_true", help="continue from the last finished experience")
    r.add_argument("--wandb", nargs="?", const="clbench", default=None, metavar="PROJECT", help="mirror logs to wandb")
    r.add_argument("--quiet", action="store_true", help="no progress bars or final table")
    r.add_argument("--verbose", action="store_true", help="keep Lightning's own messages (GPU/TPU lines, tips)")

    dl = sub.add_parser("download", help="fetch the data and pretrained weights a run will need (for offline nodes)")
    add_run_arguments(dl)

    ls = sub.add_parser("list", help="list registered strategies, scenarios, add-ons or devices")
    ls.add_argument("what", choices=["strategies", "scenarios", "aux", "devices"])

    pr = sub.add_parser("profile", help="per-experience FLOPs, memory, time and Jetson estimate")
    add_run_arguments(pr)
    pr.add_argument("--device", default="jetson-orin-nx-16gb", help="Jetson device profile for the time estimate")
    pr.add_argument("--steps", type=int, default=None, help="profile only N steps per experience (no full run)")

    sw = sub.add_parser("sweep", help="run a grid of strategies x scenarios x seeds, skipping finished runs")
    sw.add_argument("--strategies", required=True, help="comma-separated strategy names, or 'all'")
    sw.add_argument("--scenarios", required=True, help="comma-separated scenario names")
    sw.add_argument("--seeds", default="0", help="comma-separated seeds or a range, e.g. 0,1,2 or 0-4")
    sw.add_argument("--jobs", type=int, default=1, help="runs at a time, each in a fresh worker process")
    sw.add_argument("--threads", type=int, default=1, help="torch threads per worker process (default 1)")
    sw.add_argument("--ray-address", default=None, help="run on a Ray cluster ('local' starts one here)")
    sw.add_argument("--output-dir", default="results")
    sw.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="RunConfig keys apply to all runs; a strategy key to the strategies that have it")
    sw.add_argument("--aux", action="append", default=[], metavar="NAME[:k=v,...]", help="add-on for every run")
    sw.add_argument("--epochs", type=int, default=None)
    for flag in ("--accelerator", "--devices", "--trainer-strategy", "--precision", "--backbone"):
        sw.add_argument(flag, default=None, help="as in clbench run")
    sw.add_argument("--num-nodes", type=int, default=None)
    sw.add_argument("--wandb", nargs="?", const="clbench", default=None, metavar="PROJECT", help="mirror logs to wandb")
    sw.add_argument("--retry-failed", action="store_true", help="rerun runs whose stored result is 'failed'")
    sw.add_argument("--overwrite", action="store_true",
                    help="rerun and replace stored results made with other settings (without it they are kept)")
    sw.add_argument("--dry-run", action="store_true", help="list what would run and what is skipped")
    sw.add_argument("--in-process", action="store_true",
                    help="run in this process, one after another (fast start; CPU peak memory is not per run)")
    sw.add_argument("--verbose", action="store_true", help="keep Lightning's own messages (GPU/TPU lines, tips)")

    lb = sub.add_parser("leaderboard", help="mean +- std table over seeds from stored results")
    lb.add_argument("results_dir")
    lb.add_argument("--scenario", default=None)
    lb.add_argument("--format", choices=["md", "csv", "html", "json"], default="md")
    lb.add_argument("--out", default=None, help="write to this file instead of stdout")

    pl = sub.add_parser("plot", help="accuracy and efficiency plots from stored results")
    pl.add_argument("results_dir")
    pl.add_argument("--out", default="plots")
    pl.add_argument("--scenario", default=None)
    pl.add_argument("--format", choices=["png", "pdf", "svg"], default="png",
                    help="file format (pdf and svg are vector graphics, for papers)")
    pl.add_argument("--dpi", type=int, default=150, help="pixels per inch of png files (default 150)")
    pl.add_argument("--x", choices=["experiences", "classes"], default="experiences",
                    help="x axis of the curves: experience index or number of classes seen")
    return p


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", required=True, help="registered strategy name (clbench list strategies)")
    p.add_argument("--scenario", default="digits-5", help="registered scenario name (clbench list scenarios)")
    p.add_argument("--backbone", default=None, help="timm model name (default: the scenario's)")
    p.add_argument("--pretrained", action="store_true",
                   help="pretrained weights of the backbone's timm tag, from the local hub cache (--download fetches them)")
    p.add_argument("--weights", default=None, help="local pretrained weight file (implies --pretrained)")
    p.add_argument("--aux", action="append", default=[], metavar="NAME[:k=v,...]", help="add-on, repeatable")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--config", default=None, help="YAML file of key: value overrides")
    p.add_argument("--paper-settings", action="store_true", help="use the method's published setting for the scenario")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data-root", default=None, help="dataset folder (default $CLBENCH_DATA or ~/.cache/clbench/data)")
    p.add_argument("--download", action="store_true",
                   help="download missing dataset files and pretrained weights (default: offline, local files only)")
    p.add_argument("--class-order", default=None, help="natural | paper | seed:N")
    p.add_argument("--output-dir", default=None, help="where result JSONs go (default results/)")
    p.add_argument("--accelerator", default=None, help="cpu | gpu | auto")
    p.add_argument("--devices", default=None)
    p.add_argument("--num-nodes", type=int, default=None)
    p.add_argument("--trainer-strategy", default=None, help="Lightning distributed strategy, e.g. ddp")
    p.add_argument("--precision", default=None)
    p.add_argument("--flops", default=None, help="profiler FLOP counting: sample (default) | all (every step) | off")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a stored result made with other settings (without it such a run is refused)")


_FLAG_TO_FIELD = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "data_root": "data_root",
    "class_order": "class_order",
    "output_dir": "output_dir",
    "accelerator": "accelerator",
    "devices": "devices",
    "num_nodes": "num_nodes",
    "trainer_strategy": "trainer_strategy",
    "precision": "precision",
    "backbone": "backbone",
    "weights": "weights",
    "flops": "flops",
}


def spec_from_args(args, seed: int):
    """Resolve CLI flags, YAML and --set into a validated RunSpec (raises UsageError)."""
    from dataclasses import replace

    from clbench import config as C
    from clbench.engine.runner import RunSpec
    from clbench.registry import SCENARIOS, STRATEGIES

    strategy_cls = STRATEGIES.get(args.strategy)
    scenario = SCENARIOS.get(args.scenario) and args.scenario.strip()
    overrides: dict[str, Any] = {}
    source: dict[str, str] = {}  # key -> where it was given (precedence: config < set < flag)
    if args.config:
        data = C.load_yaml(args.config)
        for key in ("strategy", "scenario"):
            data.pop(key, None)
        overrides.update(data)
        source.update({k.replace("-", "_"): "config" for k in data})
    given_set = C.parse_set(args.overrides)
    overrides.update(given_set)
    source.update({k.replace("-", "_"): "set" for k in given_set})
    run_values, strat_values = C.split_overrides(overrides, strategy_cls.Config, "--set/--config")
    for flag, fld in _FLAG_TO_FIELD.items():
        value = getattr(args, flag, None)
        if value is not None:
            run_values[fld], source[fld] = value, "flag"
    if run_values.get("weights") is not None and "pretrained" not in run_values:  # a weight file implies --pretrained
        run_values["pretrained"], source["pretrained"] = True, source["weights"]
    if args.pretrained:
        run_values["pretrained"], source["pretrained"] = True, "flag"
    if args.download:
        run_values["download"], source["download"] = True, "flag"
    if getattr(args, "quiet", False):
        run_values["progress"], source["progress"] = False, "flag"
    run = replace(C.RunConfig(), **run_values) if run_values else C.RunConfig()
    C.build(strategy_cls.Config, strat_values)  # validate types and ranges now
    from clbench.registry import canonical

    return RunSpec(
        strategy=canonical(args.strategy, "strategy"),
        scenario=scenario,
        run=run,
        strategy_overrides=strat_values,
        aux=parse_aux(args.aux),
        seed=seed,
        paper_settings=args.paper_settings,
        resume=getattr(args, "resume", False),
        wandb=getattr(args, "wandb", None),
        overwrite=getattr(args, "overwrite", False),
        run_given={k: source[k] for k in run_values},
        strategy_given={k: source[k] for k in strat_values},
    )


def cmd_run(args) -> int:
    if not args.quiet:  # before the imports and checks below (seconds): say what is starting
        seeds = ", ".join(map(str, args.seeds)) if args.seeds else str(args.seed)
        print(f"clbench run: {args.strategy} on {args.scenario}, seed {seeds}: loading libraries ...", flush=True)
    seeds = args.seeds if args.seeds else [args.seed]
    specs = [spec_from_args(args, s) for s in seeds]  # validate all before training any
    from clbench.engine.runner import check_weights, quiet_lightning, resolve, run

    check_weights(resolve(specs[0])[0])  # missing pretrained weights: one line now, before data or Lightning
    from clbench.reporting.report import print_result

    if not getattr(args, "verbose", False):
        quiet_lightning()
    status = 0
    for spec in specs:
        from clbench.engine.progress import ProgressBar

        progress = ProgressBar(spec) if spec.run.progress else None
        if progress is not None:
            progress.announce()
        try:
            result = run(spec, callbacks=[progress] if progress else [],
                         on_experience=progress.on_experience if progress else None)
        finally:
            if progress is not None:
                progress.close()
        if not args.quiet:
            print_result(result)
        if result.status != "completed":
            print(f"clbench: run {result.status}: {result.error}", file=sys.stderr)
            status = 1
    return status


def cmd_list(args) -> int:
    if args.what == "devices":
        from clbench.edge import devices

        for name, desc in devices.describe().items():
            print(f"{name:28s} {desc}")
        return 0
    from clbench.registry import AUXILIARY, SCENARIOS, STRATEGIES

    registry = {"strategies": STRATEGIES, "scenarios": SCENARIOS, "aux": AUXILIARY}[args.what]
    for name, desc in registry.describe().items():
        print(f"{name:20s} {desc}")
    return 0


def cmd_profile(args) -> int:
    """`clbench profile`: one strategy's per-experience cost table (FLOPs, memory, time, Jetson time)."""
    import tempfile

    from clbench.edge import devices
    from clbench.edge.profiler import EdgeProfiler
    from clbench.edge.report import format_profile
    from clbench.engine.runner import quiet_lightning, run

    devices.load(args.device)  # fail on a bad name before training
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps} is invalid; expected a positive number of steps per experience")
    spec = spec_from_args(args, args.seed)
    run_cfg = replace(spec.run, progress=False)
    tmp = None
    if args.steps is not None:
        # a truncated run is not a result: it goes to a scratch folder, never into results/
        tmp = tempfile.TemporaryDirectory(prefix="clbench-profile-")
        run_cfg = replace(run_cfg, limit_train_batches=args.steps, epochs=1, output_dir=tmp.name)
    profiler = EdgeProfiler(flops=spec.run.flops, device=args.device, planned_epochs=spec.run.epochs if args.steps else None)
    quiet_lightning()
    try:
        # what the profile sets is given on top of the flags (the run resolves only given values)
        changed = {f: "flag" for f in ("progress", "limit_train_batches", "epochs", "output_dir")
                   if getattr(run_cfg, f) != getattr(spec.run, f)}
        given = None if spec.run_given is None else {**spec.run_given, **changed}
        result = run(replace(spec, run=run_cfg, run_given=given), profiler=profiler)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_profile(result.edge, title=f"{spec.strategy} on {spec.scenario} (backbone {result.backbone})",
                         steps=args.steps, planned_epochs=spec.run.epochs))
    if result.status != "completed":
        print(f"clbench: run {result.status}: {result.error}", file=sys.stderr)
        return 1
    return 0


def cmd_download(args) -> int:
    """`clbench download`: fetch the pretrained weights and the data a run with these arguments will read."""
    args.download = True
    spec = spec_from_args(args, args.seed)
    from clbench.engine.runner import download

    download(spec)
    return 0


def _lazy(module: str, func: str):
    def call(args) -> int:
        import importlib

        return importlib.import_module(module).__getattribute__(func)(args)

    return call


COMMANDS = {
    "run": cmd_run,
    "list": cmd_list,
    "profile": cmd_profile,
    "download": cmd_download,
    "sweep": _lazy("clbench.engine.sweep", "cmd_sweep"),
    "leaderboard": _lazy("clbench.reporting.render", "cmd_leaderboard"),
    "plot": _lazy("clbench.reporting.plots", "cmd_plot"),
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"clbench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("clbench: interrupted; the last finished experience can be resumed with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
