"""Contract suite generated from the registries (timm test_models / sklearn parametrize_with_checks).

Every registered strategy, scenario and add-on is checked here without anyone editing a
list: a new `strategies/<name>.py` is picked up automatically.  A strategy runs on
`cls.contract_scenario` (default `synthetic-2`, whose default backbone is the tiny MLP;
methods that need 3x32x32 images set it to `synthetic32-3`) with the scenario's default
backbone and `cls.contract_overrides` applied to its Config (e.g. a narrower own
network), one epoch of two batches per experience, on CPU.
"""

from __future__ import annotations

import io
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from clbench.datasets import dataset_labels
from clbench.engine.checkpoint import load_strategy_state
from clbench.engine.runner import RunSpec, create_scenario, run
from clbench.errors import DataNotFoundError
from clbench.registry import AUXILIARY, SCENARIOS, STRATEGIES, Registry

STRATEGY_NAMES = STRATEGIES.names()
SCENARIO_NAMES = SCENARIOS.names()
AUX_NAMES = AUXILIARY.names()

_scenario_cache: dict[str, object] = {}


def scenario_named(name: str):
    if name not in _scenario_cache:
        _scenario_cache[name] = create_scenario(name)
    return _scenario_cache[name]


# --------------------------------------------------------------------------- registry itself
@pytest.mark.parametrize(
    "registry, package, decorator",
    [
        (STRATEGIES, "clbench.strategies", "register_strategy"),
        (SCENARIOS, "clbench.scenarios", "register_scenario"),
        (AUXILIARY, "clbench.auxiliary", "register_aux"),
    ],
)
def test_source_listing_matches_imported_registry(registry, package, decorator):
    """`clbench list` reads names from source without importing; it must agree with the real registry."""
    registry._load()
    scanned = Registry(registry.kind, package, decorator).describe()
    assert sorted(scanned) == sorted(registry._entries)
    assert all(desc for desc in scanned.values()), f"every {registry.kind} needs a docstring: {scanned}"


def test_there_are_baselines():
    assert {"naive", "joint", "er", "lwf", "ewc"} <= set(STRATEGY_NAMES)
    assert {"digits-5", "synthetic-2", "synthetic-5"} <= set(SCENARIO_NAMES)


# --------------------------------------------------------------------------- strategies
class _MetricNames(Logger):
    """A Lightning logger that keeps the names of the metrics it receives."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    @property
    def name(self) -> str:
        return "metric-names"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.names.update(metrics)


class _TermRecorder(pl.Callback):
    """Records the terms `step_losses` returns (checking each is finite).

    It wraps `step_losses` on the instance (a strategy class may build another class in
    `__new__`).
    """

    def __init__(self):
        self.seen: set[str] = set()
        self.batches = 0

    def on_fit_start(self, trainer, pl_module):
        if getattr(pl_module, "_contract_wrapped", False):
            return
        original = pl_module.step_losses

        def recording_step_losses(batch):
            terms = original(batch)
            for k, v in terms.items():
                assert torch.isfinite(v).all(), f"loss term {k!r} is not finite: {v}"
            self.seen.update(terms)
            return terms

        pl_module.step_losses = recording_step_losses
        pl_module._contract_wrapped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def unwrap(self, pl_module):
        for attr in ("step_losses", "_contract_wrapped"):
            pl_module.__dict__.pop(attr, None)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_strategy_contract(name, tmp_path, fast_config_for, build_strategy, batch_of, task_end_recorder, monkeypatch):
    cls = STRATEGIES.get(name)
    assert cls.__module__ == f"clbench.strategies.{name}", "registry name must equal the module file name"
    assert cls.registry_name == name

    recorder, logged = _TermRecorder(), _MetricNames()
    captured = {}
    scenario = scenario_named(cls.contract_scenario)
    overrides = dict(cls.contract_overrides)
    takes_add_ons = cls.accepts_aux != set()
    if takes_add_ons:  # the run's add-ons get one more, which records the task ends it is handed
        _add_to_every_run(monkeypatch, task_end_recorder)
    spec = RunSpec(strategy=name, scenario=cls.contract_scenario, run=fast_config_for(tmp_path, backbone=cls.contract_backbone),
                   strategy_overrides=overrides, seed=7)
    result = run(spec, callbacks=[recorder], loggers=[logged], on_experience=lambda i, res, strategy: captured.update(strategy=strategy))

    assert result.status == "completed", result.error
    t = scenario.num_experiences
    assert captured["strategy"].seed == 7  # the run's seed reaches the strategy's own generators
    if takes_add_ons:  # a strategy overriding its task-end hook must still hand it on
        assert [e.index for e in task_end_recorder.ended] == list(range(t))
    forecasting = scenario.task_type == "forecasting"  # forecasting: an MSE matrix, no accuracy matrix
    matrix = result.forecasting["mse_matrix"] if forecasting else result.accuracy_matrix
    assert len(matrix) == t and all(len(row) == t for row in matrix)
    if forecasting:
        assert all(math.isfinite(a) and a >= 0.0 for row in matrix for a in row)
    else:
        assert all(0.0 <= a <= 1.0 for row in matrix for a in row)
        for i in range(t - 1):  # masked evaluation: unseen experiences score exactly 0
            assert all(a == 0.0 for a in matrix[i][i + 1 :])
    assert recorder.batches >= 2 * t
    if cls.learns_by_gradient:
        assert recorder.seen, "step_losses returned no terms"
        missing = {f"train/{k}" for k in recorder.seen} - logged.names
        assert not missing, f"loss terms not logged: {sorted(missing)}"
        assert "train/loss" in logged.names
    else:  # it fits statistics: no loss terms, and no parameter may change
        assert not recorder.seen
        assert all(not p.requires_grad for p in captured["strategy"].parameters())
    if forecasting:
        assert set(result.forecasting["metrics"]["mse"]) >= {"final_avg_error", "forgetting", "bwt_err"}
    else:
        assert set(result.metrics) >= {"final_avg_acc", "forgetting_diag", "forgetting_max", "bwt"}
    assert list(tmp_path.rglob("*.json")), "no result JSON written"

    # state_dict round-trip through a weights-only checkpoint, into a strategy rebuilt from scratch
    strategy = captured["strategy"]
    recorder.unwrap(strategy)
    buf = io.BytesIO()
    torch.save({"model": strategy.state_dict(), "extra": strategy.extra_state()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    if forecasting:  # forecasters build their model from their Config bound to the scenario
        fresh = _build_forecaster(name, scenario, seed=123, **overrides)
    else:
        # the backbone the run built (a strategy's own default for the scenario when the contract names none)
        backbone = cls.contract_backbone or (result.backbone if cls.task_type == "classification" else None)
        fresh = build_strategy(name, scenario, backbone=backbone, seed=123, **overrides)
    # as --resume does: no experience starts in the new process before the state is loaded
    load_strategy_state(fresh, saved["model"], saved["extra"])
    fresh.on_resume(scenario.info(t - 1), scenario.train_sets[:t])
    before, after = strategy.state_dict(), fresh.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    extra_before, extra_after = strategy.extra_state(), fresh.extra_state()
    assert extra_before.keys() == extra_after.keys()
    for k in extra_before:
        assert torch.equal(extra_before[k], extra_after[k]), k
    x = batch_of(scenario.test_sets[0], 8).x
    strategy.eval(), fresh.eval()
    _assert_same_prediction(strategy.predict(x), fresh.predict(x))


def _add_to_every_run(monkeypatch, add_on) -> None:
    """Every run's add-ons end with `add_on`, which no strategy refuses (it contributes no loss)."""
    from clbench.engine import runner

    build, problem = runner.create_aux, runner.aux_problem
    monkeypatch.setattr(runner, "create_aux", lambda specs: [*build(specs), add_on])
    monkeypatch.setattr(runner, "aux_problem", lambda s, a: None if a is type(add_on) else problem(s, a))


def _build_forecaster(name: str, scenario, seed: int = 0, **overrides):
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.tasks.forecasting import bind_to_scenario

    torch.manual_seed(seed)
    return create_strategy(name, None, scenario.num_classes, bind_to_scenario(strategy_config(name, overrides), scenario), seed=seed)


def _assert_same_prediction(a, b) -> None:
    """Logits (classification) or per-image detection dicts are equal."""
    if isinstance(a, torch.Tensor):
        assert torch.allclose(a, b)
        return
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            assert torch.allclose(da[k].float(), db[k].float()), k


# --------------------------------------------------------------------------- scenarios
def _build_or_skip(name: str, **kw):
    """Build a scenario; a family such as `digits-{n}` is tested at its smallest valid n."""
    from clbench.config import RunConfig
    from clbench.errors import UsageError

    candidates = [name.replace("{n}", str(n)) for n in (2, 3, 4, 5, 10)] if "{n}" in name else [name]
    for i, concrete in enumerate(candidates):
        try:
            return create_scenario(concrete, RunConfig(**kw) if kw else None, seed=0)
        except DataNotFoundError as e:
            pytest.skip(f"data not present: {e}")
        except UsageError:
            if i == len(candidates) - 1:
                raise


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_sampled_training_flops_equal_counting_every_step(name, tmp_path, fast_config_for):
    """The profiler's default sampling (a few counted steps per step shape and experience)
    gives exactly the FLOPs of counting every step, for every registered strategy."""
    from clbench.edge.profiler import EdgeProfiler

    cls = STRATEGIES.get(name)
    records = {}
    for mode in ("all", "sample"):
        spec = RunSpec(strategy=name, scenario=cls.contract_scenario, seed=0, strategy_overrides=dict(cls.contract_overrides),
                       run=fast_config_for(tmp_path / mode, epochs=2, limit_train_batches=3, backbone=cls.contract_backbone))
        result = run(spec, profiler=EdgeProfiler(flops=mode))
        assert result.status == "completed", result.error
        records[mode] = result.edge["per_experience"]
    assert [r["train_flops_exp"] for r in records["sample"]] == [r["train_flops_exp"] for r in records["all"]]
    counted, steps = (sum(r[k] for r in records["sample"]) for k in ("flops_counted_steps", "steps"))
    assert counted < steps, "sampling counted every step: nothing was extrapolated"


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_scenario_contract(name):
    s = _build_or_skip(name)
    if s.task_type == "detection":
        _check_detection_scenario(s)
        return
    if s.task_type == "forecasting":
        _check_forecast_scenario(s)
        return
    t = s.num_experiences
    assert t == len(s.train_sets) == len(s.test_sets) == len(s.increments) >= 2
    assert sum(s.increments) == s.num_classes == len(s.class_order) == len(set(s.class_order))

    # the experiences partition the class positions 0..C-1, in order
    classes = [set(s.experience_classes(i)) for i in range(t)]
    assert set().union(*classes) == set(range(s.num_classes))
    assert sum(len(c) for c in classes) == s.num_classes
    for i in range(t):
        assert set(dataset_labels(s.train_sets[i]).tolist()) == classes[i], f"train set of experience {i}"
        assert set(dataset_labels(s.test_sets[i]).tolist()) <= classes[i], f"test set of experience {i}"
        assert len(s.test_sets[i]) > 0
        info = s.info(i)
        assert set(info.seen_classes) == set().union(*classes[: i + 1])
        assert set(info.classes) == classes[i] and info.num_experiences == t


def _check_detection_scenario(s) -> None:
    """Tasks partition the classes in order; each task's images hold boxes of its classes only;
    one full test set covers every class."""
    t = s.num_experiences
    assert t == len(s.train_sets) == len(s.increments) >= 2 and len(s.test_sets) == 1
    assert sum(s.increments) == s.num_classes == len(s.class_names)
    for i in range(t):
        classes = set(s.experience_classes(i))
        labels = [set(target["labels"].tolist()) for target in s.train_sets[i].targets]
        assert labels and all(found and found <= classes for found in labels), f"train set of task {i}"
        info = s.info(i)
        assert set(info.classes) == classes and info.seen_classes == tuple(range(sum(s.increments[: i + 1])))
    assert set().union(*s.test_set.label_sets) == set(range(s.num_classes))


def _check_forecast_scenario(s) -> None:
    """Experiences of (lookback, horizon) windows with float targets; each test part starts after
    its training part plus a gap of `horizon` steps; no classes."""
    t = s.num_experiences
    assert t == len(s.train_sets) == len(s.test_sets) >= 2 and s.num_classes == 0 and s.scaler
    for i in range(t):
        train, test = s.train_sets[i], s.test_sets[i]
        assert len(train) > 0 and len(test) > 0
        assert train.x.shape[1:] == test.x.shape[1:] == (s.input_shape[0], s.lookback)
        assert train.y.shape[1:] == (s.horizon,) and train.y.is_floating_point()
        assert int(test.starts.min()) >= int(train.starts.max()) + s.lookback + 2 * s.horizon  # the gap
        assert s.info(i).classes == () and s.info(i).num_experiences == t


def _labels_of(dataset) -> list:
    if hasattr(dataset, "label_sets"):  # detection: per image, its box labels
        return [t["labels"].tolist() for t in dataset.targets]
    return dataset_labels(dataset).tolist()


# generated detection pools are large (up to 3,200 images); the generator's determinism is
# tested in tests/scenarios/test_shapes.py, so one split per setting stands for the family here
DETERMINISM_NAMES = [n for n in SCENARIO_NAMES if not n.startswith("shapes-") or n in ("shapes-2+2", "shapes-2+2-absent")]


@pytest.mark.parametrize("name", DETERMINISM_NAMES)
def test_scenario_is_deterministic_under_seed(name):
    a = _build_or_skip(name)
    b = _build_or_skip(name)
    assert a.class_order == b.class_order
    for da, db in zip(a.train_sets + a.test_sets, b.train_sets + b.test_sets):
        assert _labels_of(da) == _labels_of(db)
        if hasattr(da, "x"):
            assert torch.equal(da.x, db.x)
        else:
            assert torch.equal(torch.as_tensor(da[0][0]), torch.as_tensor(db[0][0]))


@pytest.mark.parametrize("name", [n for n in SCENARIO_NAMES if n.startswith("synthetic")])
def test_seeded_class_order_is_a_reproducible_permutation(name):
    a = _build_or_skip(name, class_order="seed:3")
    b = _build_or_skip(name, class_order="seed:3")
    natural = _build_or_skip(name, class_order="natural")
    assert a.class_order == b.class_order
    assert sorted(a.class_order) == natural.class_order
    assert a.class_order != natural.class_order  # 4+ classes: the identity shuffle is unlikely and fixed by the seed


# --------------------------------------------------------------------------- add-ons
@pytest.mark.parametrize("name", AUX_NAMES)
def test_aux_contract(name, strategy_factory, build_strategy, synthetic_scenario, batch_of):
    from clbench.engine.runner import create_aux

    try:
        (aux,) = create_aux([(name, {})])
    except Exception as e:  # an add-on must build from its defaults
        pytest.fail(f"add-on {name!r} does not build with default parameters: {e}")
    if aux.contract_backbone is None:
        strategy = strategy_factory("naive")
    else:
        strategy = build_strategy("naive", synthetic_scenario, aux.contract_backbone)
    aux.setup(strategy)
    shapes = [(n, tuple(p.shape)) for n, p in strategy.named_parameters()]
    aux.setup(strategy)  # idempotent: a second call wraps nothing twice
    assert [(n, tuple(p.shape)) for n, p in strategy.named_parameters()] == shapes

    for i in range(synthetic_scenario.num_experiences):
        info = synthetic_scenario.info(i)
        strategy.on_experience_start(info)
        aux.on_experience_start(strategy, info)
        batch = batch_of(synthetic_scenario.train_sets[i], 8)
        term = aux.loss(batch, strategy(batch.x), strategy)
        if term is not None:
            assert term.dim() == 0 and math.isfinite(float(term.detach())), f"experience {i}: {term}"
        aux.on_experience_end(strategy, info)
