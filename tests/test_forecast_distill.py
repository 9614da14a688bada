"""Distillation add-ons on forecasters (logit, feature and relation distillation): what stella_mlp and
stella_er accept and refuse, logit_mse / feature_kd / relation_kd against hand-computed values
on the forecast and the embedding the output Linear reads, and a stella_er run end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from clbench.scenarios.forecast import VALUE
from clbench.strategies.stella_mlp import season_index, series_index
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger

from clbench.auxiliary.distill import FeatureKD, LogitMSE, RelationKD, relation_kd
from clbench.cli import main
from clbench.engine.runner import (
    RunSpec,
    aux_problem,
    create_scenario,
    create_strategy,
    run,
    strategy_config,
)
from clbench.errors import UsageError
from clbench.registry import AUXILIARY, STRATEGIES
from clbench.tasks.forecasting import bind_to_scenario

pytestmark = pytest.mark.usefixtures("one_thread")

SCENARIO = "ts-domains-4"  # builds in milliseconds (co2-4 imports statsmodels)
ACCEPTED = {"logit_mse", "feature_kd", "relation_kd"}


@pytest.fixture(scope="module")
def domains():
    return create_scenario(SCENARIO)


def _forecaster(name, scenario, aux=(), **overrides):
    torch.manual_seed(0)
    cfg = bind_to_scenario(strategy_config(name, overrides), scenario)
    return create_strategy(name, None, scenario.num_classes, cfg, aux=list(aux), seed=0)


def _second_experience(strategy, scenario):
    """Start experiences 0 and 1: the add-ons' teacher is the model as it was at the second start."""
    for i in range(2):
        strategy.on_experience_start(scenario.info(i))


def _nudge(model):
    """Move the student away from its snapshot (as training would)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _embedding(model, x):
    """StellaLike's h (the input of its output Linear), recomputed by hand without hooks."""
    values = x[:, VALUE]
    if model.instance_norm:
        values = (values - values.mean(1, keepdim=True)) / (values.var(1, unbiased=False, keepdim=True) + model.EPS).sqrt()
    h = model.history(values) + model.series(series_index(x, model.series.num_embeddings))
    if model.season is not None:
        h = h + model.season(season_index(x, model.season.num_embeddings))
    return h + model.mlp(torch.relu(h))


# --------------------------------------------------------------------------- what is accepted
@pytest.mark.parametrize("strategy", ["stella_mlp", "stella_er"])
def test_forecasters_accept_the_forecast_distillation_add_ons_and_name_why_not_the_rest(strategy):
    cls = STRATEGIES.get(strategy)
    problems = {a: aux_problem(cls, AUXILIARY.get(a)) for a in AUXILIARY.names()}
    assert {a for a, p in problems.items() if p is None} == ACCEPTED
    assert "a softmax over forecast steps is meaningless" in problems["logit_kd"]
    assert "has no classes" in problems["multi_teacher"] and "[N, C, H, W]" in problems["freq_kd"]
    assert "does not accept add-on 'quantize'" in problems["quantize"]
    # classification strategies keep their pairings: the declaration is the forecasters' own
    assert aux_problem(STRATEGIES.get("naive"), AUXILIARY.get("logit_kd")) is None
    assert "head(backbone(x))" in aux_problem(STRATEGIES.get("lord"), AUXILIARY.get("logit_mse"))


def test_logit_kd_on_a_forecaster_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--strategy", "stella_mlp", "--scenario", SCENARIO, "--aux", "logit_kd", "--accelerator", "cpu",
                 "--quiet", "--output-dir", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "'logit_kd'" in lines[0] and "'stella_mlp'" in lines[0] and "softmax over forecast steps" in lines[0]
    assert not out.exists() or not list(out.rglob("*.json"))


def test_feature_kd_layer_names_a_backbone_module_and_a_forecaster_has_none(domains):
    with pytest.raises(UsageError, match="feature_kd layer='mlp' names a backbone module, and strategy 'stella_mlp' has no backbone"):
        _forecaster("stella_mlp", domains, [FeatureKD(layer="mlp")])


@pytest.mark.parametrize("add_on", [FeatureKD, RelationKD])
def test_feature_add_ons_refuse_a_forecaster_that_declares_no_features(domains, add_on):
    from clbench.strategies.stella_mlp import StellaMLP

    class Featureless(StellaMLP):
        features_at = None

    cfg = bind_to_scenario(strategy_config("stella_mlp", {}), domains)
    with pytest.raises(UsageError, match="distils features, and strategy 'stella_mlp' declares none"):
        Featureless(None, 0, cfg, aux=[add_on()])
    assert Featureless(None, 0, cfg, aux=[LogitMSE()]).aux[0].name == "logit_mse"


# --------------------------------------------------------------------------- the terms, by hand
def test_logit_mse_is_the_mse_between_student_and_teacher_forecasts(domains, batch_of):
    strategy = _forecaster("stella_mlp", domains, [LogitMSE()])
    (add_on,) = strategy.aux
    batch = batch_of(domains.train_sets[0], 8)
    strategy.on_experience_start(domains.info(0))
    assert add_on.teacher is None
    assert strategy.total_loss(batch, 0).item() == pytest.approx(F.mse_loss(strategy.model(batch.x), batch.y).item())
    assert add_on.loss(batch, strategy.step_output, strategy) is None  # the first experience has no teacher

    strategy.on_experience_start(domains.info(1))
    teacher = copy.deepcopy(strategy.model)
    _nudge(strategy.model)
    batch = batch_of(domains.train_sets[1], 8)
    total = strategy.total_loss(batch, 0)
    with torch.no_grad():
        student, old = strategy.model(batch.x), teacher(batch.x)
    expected = ((student - old) ** 2).mean()  # every horizon step of every window: no class mask
    assert student.shape == (8, domains.horizon)
    term = add_on.loss(batch, strategy.step_output, strategy)
    assert term.item() == pytest.approx(expected.item(), rel=1e-5) and term.item() > 0
    assert total.item() == pytest.approx(F.mse_loss(student, batch.y).item() + 0.1 * expected.item(), rel=1e-5)
    assert term.requires_grad  # it trains the student


def test_stella_er_distils_its_replayed_windows_with_samples_all(domains, batch_of):
    strategy = _forecaster("stella_er", domains, [LogitMSE(samples="all")], replay_batch_size=5)
    (add_on,) = strategy.aux
    strategy.on_experience_start(domains.info(0))
    first = batch_of(domains.train_sets[0], 8)
    strategy.buffer.add(x=first.x, y=torch.zeros(8, dtype=torch.long), target=first.y)
    strategy.on_experience_start(domains.info(1))
    teacher = copy.deepcopy(strategy.model)
    _nudge(strategy.model)
    batch = batch_of(domains.train_sets[1], 6)
    strategy.total_loss(batch, 0)
    view = strategy.step_view
    assert (view.current, view.replayed) == (6, 5)
    with torch.no_grad():
        expected = ((strategy.model(view.x) - teacher(view.x)) ** 2).mean()
    assert add_on.loss(batch, strategy.step_output, strategy).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("instance_norm", [False, True])
def test_feature_and_relation_kd_use_the_embedding_the_output_layer_reads(domains, batch_of, instance_norm):
    fk, rk = FeatureKD(), RelationKD(min_rows=8)
    strategy = _forecaster("stella_mlp", domains, [fk, rk], instance_norm=instance_norm)
    _second_experience(strategy, domains)
    teacher = copy.deepcopy(strategy.model)
    _nudge(strategy.model)
    batch = batch_of(domains.train_sets[1], 8)
    strategy.total_loss(batch, 0)
    out = strategy.step_output
    with torch.no_grad():
        h_s, h_t = _embedding(strategy.model, batch.x), _embedding(teacher, batch.x)
    assert out.features.shape == (8, strategy.cfg.d_model)
    assert torch.allclose(out.features, h_s, atol=1e-6)
    expected_feature = ((F.normalize(h_s, dim=1) - F.normalize(h_t, dim=1)) ** 2).mean()
    assert fk.loss(batch, out, strategy).item() == pytest.approx(expected_feature.item(), rel=1e-5)
    assert rk.loss(batch, out, strategy).item() == pytest.approx(relation_kd(h_s, h_t).item(), rel=1e-5)
    assert not strategy.model.out._forward_pre_hooks and not teacher.out._forward_pre_hooks  # hooks removed


def test_without_add_ons_the_step_is_the_plain_forecast(domains, batch_of):
    strategy = _forecaster("stella_mlp", domains)
    strategy.on_experience_start(domains.info(0))
    batch = batch_of(domains.train_sets[0], 8)
    assert strategy.total_loss(batch, 0).item() == pytest.approx(F.mse_loss(strategy.model(batch.x), batch.y).item())
    assert strategy.step_output is None  # nothing kept for add-ons


# --------------------------------------------------------------------------- end to end
class _Terms(Logger, Callback):
    """Per experience, the names of the metrics logged while it trained."""

    def __init__(self):
        super().__init__()
        self.by_experience: dict[int, set[str]] = {}
        self.current = -1

    @property
    def name(self):
        return "terms"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.by_experience.setdefault(self.current, set()).update(metrics)

    def on_train_start(self, trainer, pl_module):
        self.current = pl_module.experience.index


def test_stella_er_with_logit_mse_runs_end_to_end(tmp_path, fast_config_for, domains):
    terms = _Terms()
    spec = RunSpec("stella_er", SCENARIO, run=fast_config_for(tmp_path), seed=0, aux=[("logit_mse", {"samples": "all"})])
    result = run(spec, callbacks=[terms], loggers=[terms])
    assert result.status == "completed", result.error
    matrix = result.forecasting["mse_matrix"]
    t = domains.num_experiences
    assert len(matrix) == t and all(len(row) == t and all(math.isfinite(v) for v in row) for row in matrix)
    assert result.aux == [{"name": "logit_mse", "samples": "all"}]
    assert set(terms.by_experience) == set(range(t))
    assert "train/aux/logit_mse" not in terms.by_experience[0]  # no teacher yet
    assert all("train/aux/logit_mse" in terms.by_experience[i] for i in range(1, t))


def test_a_resumed_forecaster_distillation_run_ends_like_an_uninterrupted_one(tmp_path, fast_config_for, resume_pair):
    """The forecaster's teacher snapshot is saved with the checkpoint and rebuilt on resume."""
    def spec(out, resume):
        return RunSpec("stella_er", SCENARIO, run=fast_config_for(out), seed=3, resume=resume,
                       aux=[("logit_mse", {}), ("feature_kd", {})])

    whole, resumed = resume_pair(spec, tmp_path)
    assert resumed.status == "completed" and resumed.forecasting["mse_matrix"] == whole.forecasting["mse_matrix"]


def test_sweep_skips_forecasters_paired_with_an_add_on_they_refuse():
    from clbench.engine.sweep import compatible_strategies

    kept, skipped = compatible_strategies(["stella_mlp", "stella_er"], "ts-domains-4", aux=["logit_kd"])
    assert kept == [] and set(skipped) == {"stella_mlp", "stella_er"}
    assert "softmax over forecast steps" in skipped["stella_er"]
    assert compatible_strategies(["stella_mlp", "stella_er"], "ts-domains-4", aux=["logit_mse"]) == (
        ["stella_mlp", "stella_er"], {})
