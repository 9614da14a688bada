"""The experience loop: train each experience in fresh Lightning Trainers, evaluate on every test set."""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import logging
import os
import random
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clbench import config as C
from clbench._version import __version__
from clbench.datasets import make_loader
from clbench import distributed
from clbench.engine import checkpoint
from clbench.errors import TrainingDivergedError, UsageError
from clbench.registry import SCENARIOS, STRATEGIES
from clbench.reporting.results import RunResult, environment, save
from clbench.tasks import get_task
from clbench.types import Phase


@dataclass
class RunSpec:
    """Everything that names a run: what to train, on what, and how."""

    strategy: str
    scenario: str
    run: C.RunConfig = field(default_factory=C.RunConfig)
    strategy_overrides: dict[str, Any] = field(default_factory=dict)
    aux: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    seed: int = 0
    paper_settings: bool = False
    resume: bool = False
    wandb: str | None = None  # wandb project to mirror the logs to (None: no wandb)
    overwrite: bool = False  # replace a stored result made with other settings (otherwise refused)
    # where each given value came from ("flag", "set", "config"): RunConfig fields of `run` and keys of
    # `strategy_overrides`. None (a RunSpec built in code): the fields of `run` that differ from
    # RunConfig's defaults are the given ones ("run spec"), and so are all strategy_overrides
    run_given: dict[str, str] | None = None
    strategy_given: dict[str, str] | None = None


# --------------------------------------------------------------------------- factories
def create_scenario(name: str, run: C.RunConfig | None = None, seed: int = 0):
    from clbench.scenarios.base import ScenarioOptions

    run = run or C.RunConfig()
    factory = SCENARIOS.get(name)
    options = ScenarioOptions(
        class_order=run.class_order,
        data_root=run.data_root,
        download=run.download,
        seed=seed,
        image_size=run.image_size,
        normalization=run.normalization,
    )
    return factory(options)


def strategy_config(name: str, overrides: dict[str, Any] | None = None, paper_settings_for: str | None = None):
    cls = STRATEGIES.get(name)
    values: dict[str, Any] = {}
    if paper_settings_for is not None:
        values.update(paper_settings(cls, paper_settings_for)[1])
    values.update(overrides or {})
    return C.build(cls.Config, values)


def paper_settings(cls, scenario: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(RunConfig values, Config values) of the method's published setting for `scenario`."""
    if scenario not in cls.PAPER_SETTINGS:
        known = ", ".join(sorted(cls.PAPER_SETTINGS)) or "none"
        raise UsageError(
            f"--paper-settings: strategy {cls.registry_name!r} has no published setting for scenario "
            f"{scenario!r}; it has: {known}"
        )
    return C.split_overrides(cls.PAPER_SETTINGS[scenario], cls.Config, f"PAPER_SETTINGS[{scenario!r}]")


def published_number(cls, scenario: str) -> dict[str, Any] | None:
    """The number the method's paper reports for `scenario` (its `PUBLISHED` entry), or None."""
    entry = (vars(cls).get("PUBLISHED") or {}).get(scenario)  # declared by the class itself, never inherited
    return dict(entry) if entry else None


def create_aux(specs: Sequence[tuple[str, dict[str, Any]]]) -> list:
    from clbench.auxiliary.base import create_aux as build_add_ons

    return build_add_ons(specs)


def aux_problem(strategy_cls, aux_cls) -> str | None:
    """Why the add-on cannot be used with the strategy (None: it can); classes suffice."""
    from clbench.base import CLStrategy

    name, accepts = strategy_cls.registry_name, strategy_cls.accepts_aux
    if accepts is not None and aux_cls.family not in accepts and aux_cls.name not in accepts:
        return f"strategy {name!r} does not accept add-on {aux_cls.name!r}; it accepts: {', '.join(sorted(accepts)) or 'none'}"
    kind = strategy_cls.output_kind
    reason = aux_cls.refuses.get(kind)
    if reason is not None:
        return f"add-on {aux_cls.name!r} cannot distil strategy {name!r}, whose output is a {kind.replace('_', ' ')}: {reason}"
    # a snapshot is backbone and head, unless the class that defines the strategy's own forward
    # also declares how its snapshots are read (`snapshot_output`: forecasters)
    forward_owner = next(k for k in strategy_cls.__mro__ if "forward" in vars(k))
    declared = strategy_cls.forward is CLStrategy.forward or "snapshot_output" in vars(forward_owner)
    if getattr(aux_cls, "needs_backbone_head", False) and not declared:
        return (f"add-on {aux_cls.name!r} distils snapshots of backbone and head, and strategy {name!r} computes its "
                f"output its own way (encoders, adapters, prompts or other modules); expected a strategy whose output "
                f"is head(backbone(x))")
    return None


def create_strategy(name: str, backbone, num_classes: int, cfg=None, aux: Sequence = (), seed: int = 0):
    cls = STRATEGIES.get(name)
    for a in aux:
        problem = aux_problem(cls, type(a))
        if problem is not None:
            raise UsageError(problem)
    return cls(backbone, num_classes, cfg, aux=list(aux), seed=seed)


# --------------------------------------------------------------------------- the loop
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_name(run: C.RunConfig) -> str:
    return torch.cuda.get_device_name(0) if _eval_device(run).type == "cuda" else "cpu"


def resolve(spec: RunSpec) -> tuple[C.RunConfig, Any]:
    """The run config and strategy Config of `spec`; validates everything (see `resolve_sources`)."""
    run_cfg, cfg, _ = resolve_sources(spec)
    return run_cfg, cfg


def strategy_defaults(cls, scenario: str) -> list[tuple[str, dict[str, Any]]]:
    """(pattern, values) of the strategy's `DEFAULTS` that match `scenario`, least specific first: "*",
    then glob patterns by the length of their literal part, then the scenario's own name."""
    table = getattr(cls, "DEFAULTS", None) or {}
    if callable(getattr(cls, "defaults_for", None)):
        table = {**table, scenario: {**table.get(scenario, {}), **cls.defaults_for(scenario)}}
    matching = [(p, v) for p, v in table.items() if fnmatch.fnmatchcase(scenario, p)]
    return sorted(matching, key=lambda pv: (pv[0] == scenario, len(pv[0].replace("*", "").replace("?", ""))))


def resolve_sources(spec: RunSpec) -> tuple[C.RunConfig, Any, dict[str, dict[str, str]]]:
    """(run config, strategy Config, where each value came from), lowest precedence first: the fields'
    defaults < the strategy's `DEFAULTS` for the scenario < its `PAPER_SETTINGS` (--paper-settings) <
    --config < --set < flags. The scenario's default backbone applies only where the result names none.
    Values bound to a backbone (pretrained, weights, image_size, normalization; `BACKBONE_BOUND_KEYS`)
    stay with the strategy default's backbone: one of another architecture given above takes them away."""
    from clbench.models.backbones import BACKBONE_BOUND_KEYS, architecture

    cls = STRATEGIES.get(spec.strategy)
    SCENARIOS.get(spec.scenario)
    layers: list[tuple[str, dict[str, Any], dict[str, Any]]] = []  # (source, run values, strategy values)
    for pattern, values in strategy_defaults(cls, spec.scenario):
        run_values, strat_values = C.split_overrides(values, cls.Config, f"{cls.registry_name}.DEFAULTS[{pattern!r}]")
        layers.append((f"strategy defaults ({pattern})", run_values, strat_values))
    if spec.paper_settings:
        layers.append(("paper settings", *paper_settings(cls, spec.scenario)))
    layers.extend(_given_layers(spec))

    # a backbone given above the strategy defaults takes the defaults' backbone-bound values with it
    default_backbone = next((r["backbone"] for src, r, _ in reversed(layers)
                             if src.startswith("strategy defaults") and r.get("backbone")), None)
    chosen = next((r["backbone"] for src, r, _ in reversed(layers)
                   if not src.startswith("strategy defaults") and "backbone" in r), None)
    other_backbone = (default_backbone is not None and chosen is not None
                      and architecture(str(chosen)) != architecture(default_backbone))
    run_values: dict[str, Any] = {}
    strat_values: dict[str, Any] = {}
    sources: dict[str, dict[str, str]] = {"run_config": {}, "strategy_config": {}}
    for source, run_layer, strat_layer in layers:
        for key, value in run_layer.items():
            if other_backbone and source.startswith("strategy defaults") and key in BACKBONE_BOUND_KEYS:
                continue
            run_values[key], sources["run_config"][key] = value, source
        for key, value in strat_layer.items():
            strat_values[key], sources["strategy_config"][key] = value, source
    if run_values.get("weights") and "pretrained" not in run_values:
        run_values["pretrained"] = True  # a weight file is a pretrained backbone
        sources["run_config"]["pretrained"] = sources["run_config"]["weights"]
    run_cfg = C.build(C.RunConfig, run_values)
    cfg = C.build(cls.Config, strat_values)
    cfg = _apply_run_flags(cls, run_cfg, cfg, sources)
    for section, values in (("run_config", C.to_dict(run_cfg)), ("strategy_config", C.to_dict(cfg))):
        for key in values:
            sources[section].setdefault(key, "default")
    return run_cfg, cfg, sources


def _apply_run_flags(cls, run_cfg: C.RunConfig, cfg, sources: dict[str, dict[str, str]]):
    """Strategies that build their own model (detectors) say which Config fields the run flags
    --pretrained, --weights and --download stand for (`run_flag_settings`); those fields take the
    flags' values and their source, one flag at a time so each field names the flag it came from
    (a weight file set after --pretrained wins, as in the combined call)."""
    flags = getattr(cls, "run_flag_settings", None)
    if flags is None or cfg is None:
        return cfg
    from dataclasses import replace as replace_fields

    for flag, args in (("pretrained", (True, None, False)), ("weights", (True, run_cfg.weights, False)),
                       ("download", (False, None, True))):
        if getattr(run_cfg, flag):
            mapped = flags(cfg, *args)
            if mapped:
                cfg = replace_fields(cfg, **mapped)
                for key in mapped:
                    sources["strategy_config"][key] = sources["run_config"].get(flag, "default")
    return cfg


def _given_layers(spec: RunSpec) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The values given in `spec`, one layer per source in precedence order (config < set < flag)."""
    if spec.run_given is None:
        base = C.RunConfig()
        given = {f: "run spec" for f in C.field_names(C.RunConfig) if getattr(spec.run, f) != getattr(base, f)}
    else:
        given = dict(spec.run_given)
    strat_given = spec.strategy_given or {}
    order = ["config", "set", "run spec", "flag"]
    names = sorted(set(given.values()) | {strat_given.get(k, "run spec") for k in spec.strategy_overrides},
                   key=lambda n: order.index(n) if n in order else len(order))
    return [(name,
             {k: getattr(spec.run, k) for k, src in given.items() if src == name},
             {k: v for k, v in spec.strategy_overrides.items() if strat_given.get(k, "run spec") == name})
            for name in names]


def check_weights(run_cfg: C.RunConfig) -> str | None:
    """Before any data is read or model built: the pretrained weights a run needs are at hand (the local
    file of its backbone's timm tag; fetched now with `download`), or a one-line UsageError naming them.
    Returns the file (None: no pretrained weights needed, or the backbone is the scenario's default)."""
    if not run_cfg.pretrained:
        return None
    if run_cfg.weights is not None:
        if not os.path.isfile(run_cfg.weights):
            raise UsageError(f"pretrained weights file {run_cfg.weights!r} not found")
        return run_cfg.weights
    if run_cfg.backbone is None:
        return None  # the scenario's default backbone: checked when it is built
    from clbench.models.backbones import pretrained_file

    return pretrained_file(run_cfg.backbone, download=run_cfg.download)


def strategy_model_weights(strategy: str, cfg) -> list[str]:
    """The pretrained files a strategy that builds its own model (a detector) will read, from its
    `model_weights(cfg)`; a missing one is a one-line UsageError. [] for every other strategy."""
    model_weights = getattr(STRATEGIES.get(strategy), "model_weights", None)
    return list(model_weights(cfg)) if model_weights is not None else []


def download(spec: RunSpec, say: Callable[[str], None] = print) -> None:
    """Fetch everything `spec`'s run will read (pretrained weights, then the scenario's data) into the hub
    cache and the data root, for machines that train without network."""
    given = None if spec.run_given is None else {**spec.run_given, "download": "flag"}
    run_cfg, cfg = resolve(replace(spec, run=replace(spec.run, download=True), run_given=given))
    path = check_weights(run_cfg)
    if path is not None:
        say(f"weights: {run_cfg.backbone if run_cfg.weights is None else 'file'} -> {path}")
    own_files = strategy_model_weights(spec.strategy, cfg)
    for own in own_files:
        say(f"weights: {spec.strategy}'s model -> {own}")
    scenario = create_scenario(spec.scenario, run_cfg, spec.seed)
    if get_task(scenario.task_type).builds_own_model:  # detectors and forecasters: no backbone to fetch here
        if not own_files:
            say(f"weights: none needed ({spec.strategy} builds its own model from its settings)")
    elif path is None and not run_cfg.pretrained:
        say(f"weights: none needed ({run_cfg.backbone or scenario.default_backbone}, random init)")
    elif path is None:
        from clbench.models.backbones import pretrained_file

        say(f"weights: {scenario.default_backbone} -> {pretrained_file(scenario.default_backbone, download=True)}")
    from clbench.scenarios.base import ScenarioOptions, data_root

    root = data_root(ScenarioOptions(data_root=run_cfg.data_root))
    say(f"data: {spec.scenario} ready ({scenario.num_experiences} experiences) under {root}")


def run(spec: RunSpec, *, callbacks: Sequence = (), loggers: Sequence = (), on_experience: Callable | None = None,
        profiler=None) -> RunResult:
    """Train `spec.strategy` over `spec.scenario`; returns the result (also written to disk).

    `callbacks` and `loggers` (Lightning `Logger`s: CSV, TensorBoard, ...) join every
    experience's Trainer; loss terms are logged per step only when some logger is attached.
    """
    import pytorch_lightning as pl

    run_cfg, cfg, aux, scenario, task = _prepare(spec)
    backbone, model_name, cfg = task.build_model(STRATEGIES.get(spec.strategy), scenario, run_cfg, cfg)
    strategy = create_strategy(spec.strategy, backbone, scenario.num_classes, cfg, aux, seed=spec.seed)
    strategy.augment = scenario.augment
    _check_strategy_fits(strategy, scenario)
    result = _new_result(spec, run_cfg, cfg, model_name, scenario, aux)
    _refuse_to_replace(result, run_cfg.output_dir, spec.overwrite)
    if distributed.world_size() > 1:  # one run across processes: what is per device is recorded
        result.environment["distributed"] = distributed.describe(run_cfg.batch_size)
    if run_cfg.global_batch_size is not None:
        result.environment["gradient_accumulation"] = describe_accumulation(run_cfg, distributed.world_size())
    profiler = profiler or _default_profiler(run_cfg)
    strategy.cost_meter = profiler  # meters the training work a strategy does outside its fits
    wandb_logger, log_callbacks = _wandb(spec, run_cfg, cfg, model_name)
    test_loaders = [make_loader(d, run_cfg.eval_batch_size, shuffle=False) for d in scenario.test_sets]
    device = _eval_device(run_cfg)
    if distributed.world_size() > 1 and device.type == "cuda":  # each rank evaluates on its own GPU
        device = torch.device("cuda", distributed.local_rank())
    ckpt_dir = checkpoint.checkpoint_dir(run_cfg.output_dir, result)
    start = _restore_or_reset(spec, ckpt_dir, strategy, scenario, result, profiler)
    if start == 0:
        task.start(result, strategy, scenario, test_loaders, device)
    trainer_callbacks = [*([profiler] if isinstance(profiler, pl.Callback) else []), *callbacks, *log_callbacks]
    trainer_loggers = [*([wandb_logger] if wandb_logger is not None else []), *loggers]
    try:
        with _entry_points_scanned_once(), _collections_scan_only_this_run():
            for i in range(start, scenario.num_experiences):
                info = scenario.info(i)
                profiler.start_experience(i)
                strategy.on_experience_start(info)
                data = strategy.training_data(info, scenario.train_sets[i])
                _train(strategy, info, data, run_cfg, spec.seed, trainer_callbacks, trainer_loggers)
                strategy.on_experience_end(info, scenario.train_sets[i])
                _check_ranks_agree(strategy, result, i)
                # every rank scores the whole test sets (identical models: identical accuracies)
                task.after_experience(result, strategy, info, scenario, test_loaders, device)
                result.edge["per_experience"].append(_over_ranks(profiler.end_experience(strategy)))
                if run_cfg.checkpoint and i + 1 < scenario.num_experiences and distributed.is_global_zero():
                    checkpoint.save(ckpt_dir, strategy, result, i + 1)
                if wandb_logger is not None:  # charts grow as experiences end; a crash keeps them
                    from clbench.engine.loggers import log_experience

                    log_experience(wandb_logger, result, i, strategy)
                if on_experience is not None:
                    on_experience(i, result, strategy)
        result.status = "completed"
    except TrainingDivergedError as e:
        result.status, result.error = "failed", str(e)
    except UsageError:  # found only once training began (a layer's output shape): nothing of this run is kept
        if start == 0 and distributed.is_global_zero():
            checkpoint.remove(ckpt_dir)
        raise
    except KeyboardInterrupt:
        result.status, result.error = "interrupted", "interrupted by the user"
        raise
    finally:
        _finish(result, strategy, profiler, run_cfg, task)
        if wandb_logger is not None and distributed.is_global_zero():
            from clbench.engine.loggers import log_result

            log_result(wandb_logger, result)
    if result.status in ("completed", "failed"):  # a diverged run would diverge again: nothing to resume
        if distributed.is_global_zero():
            checkpoint.remove(ckpt_dir)
        distributed.dump_rank_state(strategy, result)
        distributed.finish()  # every rank returns once all have finished
    return result


def _check_ranks_agree(strategy, result: RunResult, index: int) -> None:
    """DDP: the strategy state must be the same on every rank after an experience; where it is not
    (state a strategy derives from its own shard in a way clbench cannot sum or gather), every rank
    continues with rank 0's and the result names what was taken from rank 0."""
    differing = distributed.ensure_identical(strategy, f"after experience {index + 1}", checkpoint.prepare_modules)
    if differing:
        result.environment["distributed"]["resynced"].append({"experience": index, "keys": differing})


def _over_ranks(record: dict[str, Any]) -> dict[str, Any]:
    """DDP: one experience's profile over all ranks (FLOPs and samples summed, peak memory and time the
    largest, per-rank values under `ranks`; the Jetson estimate stays per device); updated in place."""
    if record and distributed.active():
        from clbench.edge.profiler import combine_rank_records

        record.update(combine_rank_records(distributed.all_gather_object(record)))
    return record


def _prepare(spec: RunSpec):
    """Everything checked before a model is built: settings, add-ons, output folder, Trainer
    settings, the scenario and whether the strategy learns the scenario's task."""
    run_cfg, cfg = resolve(spec)
    check_weights(run_cfg)  # missing weights fail now, before data, Lightning or a model is touched
    strategy_model_weights(spec.strategy, cfg)  # a detector's own pretrained files: checked as early
    C.check_seed(spec.seed)
    aux = create_aux(spec.aux)
    _check_output_dir(run_cfg.output_dir)
    _check_trainer_settings(run_cfg)
    _check_accumulation(STRATEGIES.get(spec.strategy), run_cfg)  # needs the world size Lightning sees
    seed_everything(spec.seed)
    scenario = create_scenario(spec.scenario, run_cfg, spec.seed)
    problem = task_problem(STRATEGIES.get(spec.strategy), scenario)
    if problem is not None:
        raise UsageError(problem)
    return run_cfg, cfg, aux, scenario, get_task(scenario.task_type)


def _new_result(spec: RunSpec, run_cfg: C.RunConfig, cfg, model_name: str, scenario, aux: Sequence) -> RunResult:
    # the settings given for each add-on, as its Config typed them (the full Config is in its report)
    given = [{"name": name, **{k: C.to_dict(a.cfg)[k] for k in params}} for (name, params), a in zip(spec.aux, aux)]
    sources = resolve_sources(spec)[2]
    if run_cfg.backbone is None:  # the run built the scenario's default backbone
        sources["run_config"]["backbone"] = f"scenario default ({model_name})"
    return RunResult(
        strategy=spec.strategy,
        scenario=spec.scenario,
        backbone=model_name,
        seed=spec.seed,
        strategy_config=C.to_dict(cfg),
        run_config=C.to_dict(run_cfg),
        settings_source=sources,
        aux=given,
        pretrained=run_cfg.pretrained,
        paper_settings=spec.paper_settings,
        published=published_number(STRATEGIES.get(spec.strategy), spec.scenario) if spec.paper_settings else None,
        scenario_info=scenario.describe(),
        device=device_name(run_cfg),
        environment=environment(),
        clbench_version=_version(),
    )


def _refuse_to_replace(result: RunResult, output_dir: str, overwrite: bool) -> None:
    """Before training: a result made with other settings already at this run's result path is never silently
    replaced (UsageError naming the settings and --overwrite); the same settings are replaced as before."""
    from clbench.reporting.results import (
        describe_differences,
        differing_settings,
        load,
        result_path,
        result_settings,
    )

    path = result_path(output_dir, result)
    if overwrite or not path.is_file():
        return
    try:
        stored = load(path)
    except UsageError:
        return  # not a readable clbench result: nothing to keep
    differs = differing_settings(result_settings(stored), result_settings(result))
    if differs:
        raise UsageError(f"{path} holds a result made with other settings (stored vs now: "
                         f"{describe_differences(differs)}); pass --overwrite to replace it, or use another --output-dir")


def _default_profiler(run_cfg: C.RunConfig):
    """The edge profiler, or a stand-in that records nothing (`profile=False`: the profiler-invariance test)."""
    from clbench.edge.profiler import EdgeProfiler, NullProfiler

    return EdgeProfiler(flops=run_cfg.flops) if run_cfg.profile else NullProfiler()


def _train(strategy, info, data, run_cfg: C.RunConfig, seed: int, callbacks: Sequence, loggers: Sequence) -> None:
    """Every phase of one experience, each in a fresh Trainer (fresh optimiser, own loader seed).

    Under DDP each rank trains on its part of every global batch (the batch size is per device) and,
    after each fit, what the strategy summed over its own samples is summed over ranks and rank 0's
    BatchNorm statistics are taken (`clbench.distributed`)."""
    sharded = distributed.world_size() > 1
    if sharded:
        callbacks = [*callbacks, distributed.sharded_epochs_callback()]
    for p_index, phase in enumerate(strategy.phases(info)):
        epochs = run_cfg.epochs if phase.epochs is None else phase.epochs
        if epochs == 0:  # a phase switched off by its setting (e.g. 0 generator epochs), not the run's epochs
            continue
        strategy.phase = phase
        phase_data = strategy.phase_data(phase, data)
        own_batch = getattr(phase_data, "batch_size", None) or phase.batch_size
        batch_size = own_batch or run_cfg.batch_size
        # the global batch is a multiple of the run's batch: phases with their own batch step every batch
        strategy.accumulate_grad_batches = 1 if own_batch else accumulate_grad_batches(run_cfg, distributed.world_size())
        loader_seed = _loader_seed(seed, info.index, p_index)
        if sharded:
            loader = distributed.sharded_loader(phase_data, batch_size, seed=loader_seed, num_workers=run_cfg.num_workers)
        else:
            loader = make_loader(phase_data, batch_size, shuffle=True, seed=loader_seed, num_workers=run_cfg.num_workers)
        trainer = make_trainer(run_cfg, epochs, callbacks, info, phase, loggers=loggers)
        if sharded:
            distributed.fit_without_wrapper_if_frozen(trainer, strategy)
        sums = distributed.snapshot_sums(strategy) if sharded else {}
        with distributed.rank_streams():
            _fit(trainer, strategy, loader)
        # the previous fit's Trainer (its loader, persistent workers, fit-loop state) is cyclic garbage now
        # that the strategy points at this one; collected here, not whenever a full collection runs
        del trainer, loader
        gc.collect()
        if sharded:
            distributed.sum_over_ranks(strategy, sums)
            distributed.sync_batchnorm_buffers(strategy)
    strategy.phase = Phase()
    strategy.accumulate_grad_batches = 1


def accumulate_grad_batches(run: C.RunConfig, world_size: int = 1) -> int:
    """Batches summed per optimiser step so that one step sees `global_batch_size` samples:
    global / (batch_size x devices), Lightning's `accumulate_grad_batches` (1 without a global batch).
    A global batch that is not a multiple of batch_size x devices is a one-line UsageError."""
    if run.global_batch_size is None:
        return 1
    per_step = run.batch_size * world_size
    if run.global_batch_size % per_step:
        raise UsageError(f"global_batch_size={run.global_batch_size} is not divisible by batch_size x devices "
                         f"({run.batch_size} x {world_size} = {per_step}); expected a multiple of {per_step}")
    return run.global_batch_size // per_step


def describe_accumulation(run: C.RunConfig, world_size: int = 1) -> dict[str, int]:
    """What a result records of a run with a global batch: how its global batch was made."""
    return {"global_batch_size": run.global_batch_size, "batch_size": run.batch_size, "devices": world_size,
            "accumulate_grad_batches": accumulate_grad_batches(run, world_size)}


def _check_accumulation(strategy_cls, run: C.RunConfig) -> None:
    """Before training: the global batch divides into batch_size x devices, and a strategy asked to
    accumulate steps its optimisers through `CLStrategy.accumulation` (Lightning's own
    `accumulate_grad_batches` does not apply: every strategy optimises manually)."""
    k = accumulate_grad_batches(run, distributed.world_size())
    if k > 1 and not strategy_cls.accumulates_gradients():
        raise UsageError(f"global_batch_size={run.global_batch_size} needs {k} accumulated batches per step and strategy "
                         f"{strategy_cls.registry_name!r} steps its optimisers its own way; expected global_batch_size="
                         f"{run.batch_size * distributed.world_size()} (batch_size x devices) or unset")


_runs_started_in_process = 0


@contextlib.contextmanager
def _collections_scan_only_this_run():
    """The collection after every fit (which frees that fit's Trainer) scans only the objects made
    during this run: everything that existed before (the imported libraries: some 600k objects with
    Avalanche, 0.3 s a full scan) is frozen for the run's duration. Before freezing, a full collection
    frees what an earlier run of the same process (a sweep, `--seeds`) left; the first run has no such
    garbage, only the imports', which stays frozen until the run ends and is collected after it."""
    global _runs_started_in_process
    if _runs_started_in_process:
        gc.collect()
    _runs_started_in_process += 1
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _entry_points_scanned_once(scan: Callable | None = None):
    """Every Lightning Trainer scans all installed distributions for callback entry points
    (about 4 ms, most of a Trainer's construction, paid once per experience and phase); the
    installed set does not change during a run, so one scan serves all of its Trainers.
    `scan` replaces the real scan (the settings check's Trainer needs no callbacks)."""
    try:
        from lightning_fabric.utilities import registry
    except ImportError:  # a Lightning without this module: nothing to speed up
        yield
        return
    real = getattr(registry, "entry_points", None)
    if real is None:
        yield
        return
    scan = scan or real
    found: dict[tuple, Any] = {}

    def scanned_once(**selection):
        key = tuple(sorted(selection.items()))
        if key not in found:
            found[key] = scan(**selection)
        return found[key]

    registry.entry_points = scanned_once
    try:
        yield
    finally:
        registry.entry_points = real


def _restore_or_reset(spec: RunSpec, ckpt_dir, strategy, scenario, result: RunResult, profiler) -> int:
    """With --resume, load the last finished experience's state; otherwise drop any stale checkpoint."""
    if not spec.resume:
        if distributed.is_global_zero():  # the other ranks of a DDP run only read
            checkpoint.remove(ckpt_dir)
        return 0
    loaded = checkpoint.load(ckpt_dir)
    if loaded is None:
        logging.getLogger("clbench").warning("--resume: no checkpoint in %s; starting from the first experience", ckpt_dir)
        return 0
    meta, tensors = loaded
    checkpoint.check_identity(meta, result, ckpt_dir)
    done = int(meta["completed_experiences"])
    checkpoint.restore(strategy, meta, tensors, result)
    strategy.on_resume(scenario.info(done - 1), scenario.train_sets[:done])
    profiler.records = list(result.edge["per_experience"])
    return done


def _fit(trainer, strategy, loader) -> None:
    """`trainer.fit`, with Lightning's Ctrl-C handling (it exits the process) turned back into KeyboardInterrupt."""
    import signal

    try:
        trainer.fit(strategy, train_dataloaders=loader)
    except SystemExit:
        if getattr(trainer, "interrupted", False):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        raise


def _finish(result: RunResult, strategy, profiler, run_cfg: C.RunConfig, task) -> None:
    if result.status == "completed" and task.rows_recorded(result):
        task.finish(result)
    result.edge["totals"] = profiler.totals()
    result.strategy_report = strategy.report()
    add_ons = {a.name: a.report() for a in getattr(strategy, "aux", ())}
    if any(add_ons.values()):
        result.strategy_report["add_ons"] = {name: r for name, r in add_ons.items() if r}
    # an unexpected exception leaves status "running": no result file for a run that neither
    # finished nor failed in a known way (Ctrl-C keeps its resume state instead)
    if result.status in ("completed", "failed") and distributed.is_global_zero():
        if "distributed" in result.environment:
            result.environment["distributed"]["backend"] = distributed.describe(run_cfg.batch_size)["backend"]
        save(result, run_cfg.output_dir)


def _wandb(spec: RunSpec, run_cfg: C.RunConfig, cfg, backbone: str):
    """(logger, callbacks) mirroring this run to wandb, or (None, []) without --wandb."""
    if spec.wandb is None:
        return None, []
    from clbench.engine.loggers import GlobalStep, wandb_logger

    return wandb_logger(spec.wandb, spec, run_cfg, cfg, backbone), [GlobalStep()]


def make_trainer(run: C.RunConfig, epochs: int, callbacks: Sequence, info=None, phase=None, loggers: Sequence = ()):
    """A fresh Trainer per fit (a reused one silently stops after its first `max_epochs`), trimmed to the loop."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=run.accelerator,
        devices=run.devices if run.devices == "auto" else _devices(run.devices),
        num_nodes=run.num_nodes,
        precision=run.precision,
        strategy=run.trainer_strategy,
        logger=list(loggers) if loggers else False,
        log_every_n_steps=1,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_train_batches=run.limit_train_batches if run.limit_train_batches else 1.0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # DDP: `_train` shards the training data itself (distributed.ShardedBatchSampler)
        deterministic="warn" if run.deterministic else None,
        benchmark=False,
    )
    # Deterministic mode also fills every new tensor's memory (about 5% of a ResNet-18 step on the
    # CPU); deterministic kernels never read memory they did not write, so results are the same
    # without it (tested bit for bit)
    torch.utils.deterministic.fill_uninitialized_memory = FILL_UNINITIALIZED_MEMORY
    return trainer


FILL_UNINITIALIZED_MEMORY = False


def _eval_device(run: C.RunConfig) -> torch.device:
    if run.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(f"accelerator={run.accelerator!r} but no CUDA device is available; expected cpu or auto")
    if run.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _devices(value: str):
    try:
        return int(value)
    except ValueError:
        return value


def _loader_seed(seed: int, experience: int, phase: int) -> int:
    return seed * 1_000_003 + experience * 101 + phase


def _check_output_dir(path: str) -> None:
    """Refuse before training an output directory that could not be written: its nearest existing
    ancestor must be a directory in which a file can really be created (`os.access` says yes to
    root even where the file system refuses, as /proc does)."""
    import tempfile

    p = os.path.abspath(path)
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"output directory {path!r} is not writable: {probe!r} is a file; expected a directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".clbench-probe-")
    except OSError as e:
        raise UsageError(f"output directory {path!r} is not writable ({e.strerror or e}); expected a writable directory") from None
    os.close(fd)
    os.remove(name)


def _check_trainer_settings(run: C.RunConfig) -> None:
    """Lightning's own checks of accelerator, devices, precision and trainer strategy, before training."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    _eval_device(run)  # clbench's own message for a GPU that is not there
    try:
        with _entry_points_scanned_once(scan=lambda **selection: ()):  # no callbacks needed to check settings
            trainer = make_trainer(run, 1, ())
    except (ValueError, TypeError, MisconfigurationException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"accelerator={run.accelerator!r}, devices={run.devices!r}, precision={run.precision!r}, "
                         f"trainer_strategy={run.trainer_strategy!r}: Lightning refuses them ({first})") from None
    distributed.configure(trainer)  # world size and ranks as Lightning sees them (its launcher, SLURM, ...)


def task_problem(strategy_cls, scenario) -> str | None:
    """Why the strategy cannot run on the scenario because they learn different tasks (None: they match)."""
    if strategy_cls.task_type == scenario.task_type:
        return None
    fitting = sorted(n for n in STRATEGIES.names() if STRATEGIES.get(n).task_type == scenario.task_type)
    return (f"strategy {strategy_cls.registry_name!r} is a {strategy_cls.task_type} method and scenario "
            f"{scenario.name!r} a {scenario.task_type} benchmark; expected a {scenario.task_type} strategy "
            f"({', '.join(fitting) or 'none registered'})")


def _check_strategy_fits(strategy, scenario) -> None:
    size = getattr(strategy.cfg, "buffer_size", None)
    if size is not None:
        total = sum(len(d) for d in scenario.train_sets)
        if size < 0 or size > total:
            raise UsageError(f"buffer_size={size} is invalid; expected 0..{total} (the scenario's training samples)")


def _version() -> str:
    return __version__


def quiet_lightning() -> None:
    """Lightning's per-fit banners ('GPU available: ...') would repeat for every experience."""
    import pytorch_lightning  # noqa: F401  (its import sets its loggers to INFO; lower them after)

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # frozen teacher snapshots are in eval mode on purpose
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    # methods that fit statistics rather than weights (SimpleCIL) have no optimizer on purpose
    warnings.filterwarnings("ignore", message=".*configure_optimizers. returned .None., this fit will run with no optimizer.*")
