"""`clbench sweep`: run a grid of strategies x scenarios x seeds, skipping finished runs.

A run whose result JSON already exists is skipped, so a sweep that was stopped picks
up where it left off (a run stopped mid-way resumes from its last finished experience).
Runs go to a local process pool (`--jobs N`; a fresh spawned process per run, with
`cpu_count // N` torch threads), run one by one in this process (`--in-process`), or,
with `--ray-address`, to a Ray cluster (one task per run).  Each run is the ordinary `clbench.engine.runner.run`; distributed
training of one run stays Lightning's (`--set trainer_strategy=ddp devices=N`).
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from clbench import config as C
from clbench.errors import UsageError
from clbench.reporting.results import add_on_slug
from clbench.tasks import get_task


@dataclass
class Job:
    spec: Any  # clbench.engine.runner.RunSpec
    existing: Path | None = None  # a stored result of this exact run
    stale: str | None = None  # why an existing result does not match the requested settings

    @property
    def name(self) -> str:
        s = self.spec
        aux = "".join(f"+{add_on_slug({'name': n, **settings})}" for n, settings in s.aux)
        resumed = " (resumed)" if getattr(s, "resume", False) else ""
        return f"{s.strategy}{aux} on {s.scenario} seed {s.seed}{resumed}"


def split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--{what} {text!r} is empty; expected a comma-separated list")
    return items


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` or a range `0-4`."""
    seeds: list[int] = []
    for item in split_list(text, "seeds"):
        lo, sep, hi = item.partition("-")
        try:
            items = list(range(int(lo), int(hi) + 1)) if sep and lo else [int(item)]
        except ValueError:
            raise UsageError(f"--seeds item {item!r} is invalid; expected integers like 0,1,2 or 0-4") from None
        if not items:
            raise UsageError(f"--seeds item {item!r} is an empty range; expected LOW-HIGH with LOW <= HIGH")
        seeds += [C.check_seed(seed) for seed in items]
    return list(dict.fromkeys(seeds))


def plan(
    strategies: Sequence[str],
    scenarios: Sequence[str],
    seeds: Sequence[int],
    overrides: dict[str, Any] | None = None,
    aux: Sequence[tuple[str, dict[str, Any]]] = (),
    output_dir: str = "results",
    wandb: str | None = None,
) -> list[Job]:
    """Validate the whole grid (names, --set keys, values) before any run starts."""
    from clbench.engine.runner import RunSpec, resolve
    from clbench.registry import SCENARIOS, STRATEGIES, canonical

    strategies = [canonical(s, "strategy") for s in strategies]
    for name in strategies:
        STRATEGIES.get(name)
    for name in scenarios:
        SCENARIOS.get(name)
    from clbench.engine.runner import (
        _check_output_dir,
        _check_trainer_settings,
        create_aux,
    )

    run_values, per_strategy = _route_overrides(overrides or {}, strategies)
    run = replace(C.RunConfig(), **run_values, output_dir=output_dir, progress=False)
    create_aux(aux)  # add-on names and settings
    _check_output_dir(output_dir)
    _check_trainer_settings(run)
    jobs = []
    for scenario in scenarios:
        for strategy in strategies:
            for seed in seeds:
                spec = RunSpec(strategy, scenario, run=run, strategy_overrides=per_strategy[strategy],
                               aux=list(aux), seed=seed)
                if wandb is not None:
                    spec = _with_wandb(spec, wandb)
                resolve(spec)  # builds the strategy Config: bad values fail here, not mid-sweep
                jobs.append(_find_existing(Job(spec)))
    return jobs


def compatible_strategies(names: Sequence[str], scenario: str, run: C.RunConfig | None = None,
                          aux: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """(strategies defined for the scenario's images, {strategy: why not} for the others).

    A strategy declares the image channels it is defined for in `input_channels`; a
    scenario whose data is absent (under `run.data_root`) is not filtered (its runs fail
    with the data error).
    """
    from clbench.engine.runner import aux_problem, create_scenario, strategy_defaults, task_problem
    from clbench.errors import DataNotFoundError
    from clbench.registry import AUXILIARY, STRATEGIES

    try:
        built = create_scenario(scenario, run)
    except (DataNotFoundError, UsageError):
        return list(names), {}
    channels = built.input_shape[0]
    kept, skipped = [], {}
    for name in names:
        cls = STRATEGIES.get(name)
        needs = cls.input_channels
        # the backbone a run would build: the one asked for, else the strategy's own default for
        # this scenario, else the scenario's
        own = [values["backbone"] for _, values in strategy_defaults(cls, scenario) if values.get("backbone")]
        backbone = (run.backbone if run is not None else None) or (own[-1] if own else built.default_backbone)
        if task_problem(cls, built) is not None:
            skipped[name] = f"a {cls.task_type} method, the scenario is a {built.task_type} benchmark"
        elif (problem := next(filter(None, (aux_problem(cls, AUXILIARY.get(a)) for a in aux)), None)) is not None:
            skipped[name] = problem
        elif get_task(built.task_type).builds_own_model:  # no backbone to check
            kept.append(name)
        elif needs is not None and needs != channels:
            skipped[name] = f"defined for {needs}-channel images, the scenario has {channels}"
        elif (problem := cls.backbone_problem(_meta_backbone(backbone, built.input_shape))) is not None:
            skipped[name] = problem
        else:
            kept.append(name)
    return kept, skipped


@functools.lru_cache(maxsize=None)
def _meta_backbone(backbone: str, input_shape: tuple):
    """The backbone built on the meta device (no memory, no weights), for `backbone_problem`."""
    import torch

    from clbench.models.backbones import build_backbone

    with torch.device("meta"):
        return build_backbone(backbone, in_chans=input_shape[0], img_size=input_shape[-1])


def _defined_for_their_scenario(jobs: list[Job]) -> list[Job]:
    """The jobs whose strategy is defined for their scenario's images; the others are printed as skipped."""
    skipped: set[tuple[str, str]] = set()
    for scenario in dict.fromkeys(job.spec.scenario for job in jobs):
        mine = [job for job in jobs if job.spec.scenario == scenario]
        names = list(dict.fromkeys(job.spec.strategy for job in mine))
        add_ons = [a for a, _ in mine[0].spec.aux]
        for name, reason in compatible_strategies(names, scenario, mine[0].spec.run, add_ons)[1].items():
            print(f"skip  {name} on {scenario}: {reason}")
            skipped.add((name, scenario))
    return [job for job in jobs if (job.spec.strategy, job.spec.scenario) not in skipped]


def _with_wandb(spec, project: str):
    if "wandb" not in getattr(type(spec), "__dataclass_fields__", {}):
        raise UsageError("--wandb is not supported by this clbench runner")
    return replace(spec, wandb=project)


def _route_overrides(overrides: dict[str, Any], strategies: Sequence[str]):
    """RunConfig keys apply to every run; a strategy key applies to the strategies that have it.

    A key that no strategy of the sweep (and not RunConfig) knows is an error.
    """
    from clbench.registry import STRATEGIES

    run_keys = set(C.field_names(C.RunConfig))
    run_values: dict[str, Any] = {}
    per_strategy: dict[str, dict[str, Any]] = {s: {} for s in strategies}
    for key, value in overrides.items():
        k = key.replace("-", "_")
        owners = [s for s in strategies if k in C.field_names(STRATEGIES.get(s).Config)]
        if not owners and k not in run_keys:
            valid = set(run_keys)
            for s in strategies:
                valid |= set(C.field_names(STRATEGIES.get(s).Config))
            raise UsageError(f"unknown key {key!r} in --set; valid keys for this sweep: {', '.join(sorted(valid))}")
        for s in owners:
            per_strategy[s].update(C.split_overrides({k: value}, STRATEGIES.get(s).Config, "--set")[1])
        if not owners:
            run_values.update(C.split_overrides({k: value}, C.StrategyConfig, "--set")[0])
    return run_values, per_strategy


def _stale(stored, run_cfg: C.RunConfig, cfg, aux: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """Why a stored result does not match the requested settings (None: it does). Both sides are compared
    as JSON reads them back (a tuple setting is stored as a list), add-on settings typed by their Config."""
    from clbench.engine.runner import create_aux
    from clbench.reporting.results import describe_differences, differing_settings, result_settings, settings_of

    from clbench.tasks.forecasting import SCENARIO_FIELDS

    typed = [{"name": n, **{k: C.to_dict(a.cfg)[k] for k in p}} for (n, p), a in zip(aux, create_aux(aux))]
    wanted = C.to_dict(cfg)
    for key in SCENARIO_FIELDS:  # 0: unset, the run fills in its scenario's value (the stored one)
        if wanted.get(key) == 0 and key in stored.strategy_config:
            wanted[key] = stored.strategy_config[key]
    differs = differing_settings(result_settings(stored), settings_of(wanted, C.to_dict(run_cfg), typed))
    if not differs:
        return None
    return f"stored with different {', '.join(k for k, _, _ in differs)} ({describe_differences(differs)})"


def _find_existing(job: Job) -> Job:
    """A stored result of the same strategy+add-ons, scenario, seed, device and backbone request."""
    from clbench.engine.runner import device_name, resolve
    from clbench.reporting.results import RunResult, _slug, load, result_path

    spec = job.spec
    run_cfg, cfg = resolve(spec)
    probe = RunResult(spec.strategy, spec.scenario, "_", spec.seed, aux=[{"name": n, **p} for n, p in spec.aux],
                      device=device_name(run_cfg))
    folder = result_path(run_cfg.output_dir, probe).parent
    for path in sorted(folder.glob(f"*-seed{spec.seed}-{_slug(probe.device)}.json")):
        try:
            r = load(path)
        except UsageError:
            continue  # unreadable: run again and overwrite it
        if r.seed != spec.seed or r.run_config.get("backbone") != run_cfg.backbone:
            continue
        if r.status not in ("completed", "failed"):
            continue
        job.existing = path
        job.stale = _stale(r, run_cfg, cfg, spec.aux)
        return job
    # No result, but an interrupted run left its resume state: continue from its last experience.
    resume_root = Path(run_cfg.output_dir) / ".resume" / folder.relative_to(run_cfg.output_dir)
    if "resume" in type(spec).__dataclass_fields__ and any(
        resume_root.glob(f"*-seed{spec.seed}-{_slug(probe.device)}/checkpoint.json")
    ):
        job.spec = replace(spec, resume=True)
    return job


# --------------------------------------------------------------------------- execution
def _run_job(spec, threads: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """Worker body (also used in-process): one run, reduced to a small picklable summary."""
    import torch

    from clbench.engine.runner import quiet_lightning, run
    from clbench.reporting.results import result_path

    if threads:
        torch.set_num_threads(threads)
    if not verbose:
        quiet_lightning()
    t0 = time.perf_counter()
    try:
        r = run(spec)
    except UsageError as e:
        return {"status": "error", "error": str(e), "seconds": time.perf_counter() - t0}
    except Exception as e:  # one broken run must not stop the sweep; its message is reported
        return {"status": "error", "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    return {
        "status": r.status,
        "error": r.error,
        "seconds": time.perf_counter() - t0,
        "path": str(result_path(spec.run.output_dir, r)),
        "final_avg_acc": r.metrics.get("final_avg_acc"),
        "headline": _headline(r),
    }


def _headline(result) -> str | None:
    """The run's headline metric as the leaderboard shows it ('Final acc 55.0%', 'Final MSE 0.4120')."""
    from clbench.engine.progress import summary_so_far

    summary = summary_so_far(result) if result.status == "completed" else []
    if not summary:
        return None
    column, value = summary[0]
    return f"{column.title} {value:{column.fmt}}{column.unit}"


def run_local(jobs: Sequence[Job], workers: int, report: Callable[[Job, dict], None], in_process: bool = False,
              threads: int = 1, started: Callable[[Job], None] | None = None, verbose: bool = False) -> None:
    """Each run in a fresh worker process (`workers` at a time), or all in this process.

    A fresh process per run keeps runs independent: the CPU peak-memory figure is an
    RSS high-water mark above the process baseline, which a previous run in the same
    process would already have raised, and no global state (RNG, torch threads) leaks.
    Each worker gets `threads` torch threads (default one: on a loaded machine more threads than
    cores per run cost far more in contention than they gain). `started(job)` is called as a run
    starts (the pool takes its jobs in order: the first `workers` at once, then one per run ended).
    """
    started = started or (lambda job: None)
    if in_process:
        for job in jobs:
            started(job)
            report(job, _run_job(job.spec, verbose=verbose))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: forking a process that already holds torch's thread pools can hang
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {pool.submit(_run_job, job.spec, threads, verbose): job for job in jobs}
        waiting = list(jobs)
        for job in waiting[:workers]:
            started(job)
        del waiting[:workers]
        for future in as_completed(futures):
            report(futures[future], future.result())
            if waiting:
                started(waiting.pop(0))


def run_ray(jobs: Sequence[Job], address: str, report: Callable[[Job, dict], None],
            started: Callable[[Job], None] | None = None) -> None:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray-address needs Ray, which is not installed; pip install 'clbench[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(_run_job)
        pending = {}
        for job in jobs:
            # a run that asks for GPUs gets them reserved; Ray then sets CUDA_VISIBLE_DEVICES for it
            gpus = _gpus_wanted(job.spec.run)
            pending[remote.options(num_cpus=1, num_gpus=gpus).remote(job.spec, 1)] = job
            if started is not None:
                started(job)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                report(pending.pop(ref), ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()


def _gpus_wanted(run) -> int:
    if run.accelerator not in ("gpu", "cuda"):
        return 0
    try:
        return int(run.devices)
    except ValueError:
        return 1


def _will_run(job: Job, retry_failed: bool = False, overwrite: bool = False) -> bool:
    """No stored result; or one made with other settings and `overwrite`; or a failed one with the same
    settings and `retry_failed` (a failed one with other settings needs `overwrite`)."""
    if job.existing is None:
        return True
    if job.stale:
        return overwrite
    return retry_failed and _stored_status(job.existing) == "failed"


def sweep(jobs: Sequence[Job], workers: int = 1, ray_address: str | None = None, retry_failed: bool = False,
          out=None, in_process: bool = False, threads: int = 1, overwrite: bool = False,
          verbose: bool = False) -> dict[str, int]:
    """Run the jobs that have no stored result (and, with `overwrite`, those whose stored result was made with
    other settings, replacing it); returns counts by outcome.

    Prints a line per skipped run, a header (grid size, runs to do, how they run), a line as each run starts
    and one as it ends with the grid's ETA (the sweep's wall time per finished run times the runs left)."""
    out = out or sys.stdout
    todo, counts = [], {"skipped": 0, "completed": 0, "failed": 0, "error": 0}
    for job in jobs:
        if not _will_run(job, retry_failed, overwrite):
            counts["skipped"] += 1
            note = (f" (warning: {job.stale}; rerun with --overwrite to replace it, or use another --output-dir)"
                    if job.stale else "")
            print(f"skip  {job.name}: {job.existing}{note}", file=out, flush=True)
        else:
            if job.stale and "overwrite" in getattr(type(job.spec), "__dataclass_fields__", {}):
                job.spec = replace(job.spec, overwrite=True)
            todo.append(job)
    done, begun, t0 = 0, 0, time.perf_counter()
    print(f"sweep: {len(jobs)} run{'s' if len(jobs) != 1 else ''} in the grid, {len(todo)} to run, "
          f"{counts['skipped']} stored; {_how(len(todo), workers, ray_address, in_process, threads)}", file=out, flush=True)

    def started(job: Job) -> None:
        nonlocal begun
        begun += 1
        verb = "queue" if ray_address else "start"
        print(f"{verb} [{begun}/{len(todo)}] {job.name}", file=out, flush=True)

    def report(job: Job, summary: dict) -> None:
        nonlocal done
        done += 1
        status = summary["status"]
        counts[status if status in counts else "error"] += 1
        acc = summary.get("final_avg_acc")
        detail = summary.get("headline") or (f"final acc {100 * acc:.1f}%" if acc is not None else "")
        detail = detail if status == "completed" else (summary.get("error") or detail)
        elapsed = time.perf_counter() - t0
        eta = f"; sweep ETA {format_duration(elapsed / done * (len(todo) - done))}" if done < len(todo) else ""
        print(f"[{done}/{len(todo)}] {job.name}: {status} in {summary['seconds']:.1f} s; {detail}{eta}", file=out, flush=True)

    if todo:
        if ray_address:
            run_ray(todo, ray_address, report, started)
        else:
            run_local(todo, workers, report, in_process, threads, started, verbose)
    took = f" in {format_duration(time.perf_counter() - t0)}" if todo else ""
    print(
        f"sweep: {counts['completed']} completed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped (already stored){took}",
        file=out,
    )
    return counts


def _how(runs: int, workers: int, ray_address: str | None, in_process: bool, threads: int) -> str:
    if ray_address:
        return f"on Ray ({ray_address})"
    if in_process:
        return "one at a time in this process"
    at_once = min(workers, runs) or 1
    return (f"{at_once} at a time, each in a fresh process with {threads} torch thread{'s' if threads != 1 else ''}")


def format_duration(seconds: float) -> str:
    from clbench.engine.progress import format_duration as fmt  # Lightning-free callers keep their fast import

    return fmt(seconds)


def _stored_status(path: Path) -> str:
    from clbench.reporting.results import load

    return load(path).status


def cmd_sweep(args) -> int:
    from clbench.config import parse_aux

    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs} is invalid; expected a positive integer")
    from clbench.registry import STRATEGIES

    overrides: dict[str, Any] = dict(C.parse_set(args.overrides))
    for flag in ("epochs", "accelerator", "devices", "trainer_strategy", "precision", "backbone", "num_nodes"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag)
    strategies = STRATEGIES.names() if args.strategies == "all" else split_list(args.strategies, "strategies")
    scenarios, seeds = split_list(args.scenarios, "scenarios"), parse_seeds(args.seeds)
    if not args.dry_run:  # checking the grid takes seconds (imports, settings, stored results): say so first
        print(f"sweep: {len(strategies)} strateg{'ies' if len(strategies) != 1 else 'y'} x {len(scenarios)} "
              f"scenario{'s' if len(scenarios) != 1 else ''} x {len(seeds)} seed{'s' if len(seeds) != 1 else ''}: "
              f"checking settings and stored results ...", flush=True)
    if not getattr(args, "verbose", False):  # Lightning's GPU/TPU lines and tips (the settings check builds a Trainer)
        from clbench.engine.runner import quiet_lightning

        quiet_lightning()
    jobs = plan(
        strategies,
        scenarios,
        seeds,
        overrides=overrides,
        aux=parse_aux(args.aux),
        output_dir=args.output_dir,
        wandb=args.wandb,
    )
    if args.strategies == "all":  # the whole grid routes --set keys; then each scenario keeps its strategies
        jobs = _defined_for_their_scenario(jobs)
    if args.dry_run:
        for job in jobs:
            print(f"{'run ' if _will_run(job, args.retry_failed, args.overwrite) else 'skip'}  {job.name}")
        return 0
    if args.in_process and args.jobs > 1:
        raise UsageError("--in-process runs one job at a time; drop --jobs or --in-process")
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads} is invalid; expected a positive number of torch threads per run")
    counts = sweep(jobs, args.jobs, args.ray_address, args.retry_failed, in_process=args.in_process, threads=args.threads,
                   overwrite=args.overwrite, verbose=getattr(args, "verbose", False))
    return 0 if counts["error"] == 0 and counts["failed"] == 0 else 1
