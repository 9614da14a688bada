"""The experience loop: a fresh Trainer per experience, masked evaluation, optimiser reset, global step."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from clbench.datasets import make_loader
from clbench.engine.runner import RunSpec, run
from clbench.tasks.classification import evaluate


class FitSpy(pl.Callback):
    """Per fit: batches trained, the optimiser object, its state when training starts and ends."""

    def __init__(self):
        self.fits: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.fits.append(
            {
                "optimizer": opt,
                "state_at_start": len(opt.state),
                "params_match_model": {id(p) for g in opt.param_groups for p in g["params"]}
                == {id(p) for p in pl_module.parameters() if p.requires_grad},
                "batches": 0,
                "experience": pl_module.experience.index,
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fits[-1]["batches"] += 1

    def on_train_end(self, trainer, pl_module):
        self.fits[-1]["state_at_end"] = len(trainer.optimizers[0].state)


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory, fast_config_for):
    """naive on synthetic-5, 2 epochs x 2 batches per experience, with snapshots after each experience."""
    spy = FitSpy()
    snapshots, offsets = [], []

    def after_experience(i, result, strategy):
        snapshots.append({k: v.detach().clone() for k, v in strategy.backbone.state_dict().items()})
        offsets.append(strategy.global_step_offset)

    spec = RunSpec("naive", "synthetic-5", run=fast_config_for(tmp_path_factory.mktemp("runner"), epochs=2), seed=0)
    result = run(spec, callbacks=[spy], on_experience=after_experience)
    return result, spy, snapshots, offsets


def test_every_experience_is_trained(spied_run):
    """A reused Trainer would stop after its first max_epochs: later experiences would train 0 steps."""
    result, spy, snapshots, _ = spied_run
    assert result.status == "completed"
    assert [f["experience"] for f in spy.fits] == [0, 1, 2, 3, 4]
    assert [f["batches"] for f in spy.fits] == [4] * 5  # 2 epochs x 2 batches, in every experience
    for i in range(1, len(snapshots)):
        changed = [k for k in snapshots[i] if not torch.equal(snapshots[i][k], snapshots[i - 1][k])]
        assert changed, f"experience {i} left the backbone unchanged"


def test_optimizer_is_fresh_per_experience(spied_run):
    _, spy, _, _ = spied_run
    optimizers = [f["optimizer"] for f in spy.fits]
    assert len({id(o) for o in optimizers}) == len(optimizers)
    assert all(f["state_at_start"] == 0 for f in spy.fits)  # no momentum carried across experiences
    assert all(f["state_at_end"] > 0 for f in spy.fits)  # ...though SGD momentum did build state
    assert all(f["params_match_model"] for f in spy.fits)  # including the head rows grown this experience


def test_global_step_offset_grows_by_each_fit(spied_run):
    _, spy, _, offsets = spied_run
    assert offsets == [4, 8, 12, 16, 20]


def test_accuracy_matrix_rows_and_masking_in_a_run(spied_run):
    result, *_ = spied_run
    m = result.accuracy_matrix
    assert len(m) == 5 and all(len(r) == 5 for r in m)
    for i in range(5):
        assert all(a == 0.0 for a in m[i][i + 1 :]), "unseen experiences must score 0 (their logits are masked)"
        assert m[i][i] > 0.5  # separable clusters: the current experience is learned
    assert result.initial_accuracy == [0.0] * 5


def test_evaluation_scores_only_seen_classes(strategy_factory, synthetic_scenario):
    strategy = strategy_factory("naive")
    strategy.on_experience_start(synthetic_scenario.info(1))  # head grows to all 4 classes
    assert strategy.head.out_features == 4
    with torch.no_grad():
        strategy.head.fc.bias[3] = 1e4  # an unseen class that would win every argmax
    loaders = [make_loader(d, 64, shuffle=False) for d in synthetic_scenario.test_sets]

    masked = evaluate(strategy, loaders, n_seen=2)
    expected = []
    for d in synthetic_scenario.test_sets:
        batch = next(iter(make_loader(d, len(d), shuffle=False)))
        pred = strategy.predict_logits(batch.x)[:, :2].argmax(1)
        expected.append(float((pred == batch.y).float().mean()))
    assert masked == pytest.approx(expected)
    assert masked[1] == 0.0 and masked[0] > 0.0
    unmasked = evaluate(strategy, loaders, n_seen=4)
    assert unmasked[0] == 0.0  # class 3 wins everywhere once it may be predicted
    assert strategy.training  # evaluation restores the train mode


class MetricsAtTrainEnd(pl.Callback):
    def __init__(self):
        self.seen: list[set[str]] = []

    def on_train_end(self, trainer, pl_module):
        self.seen.append(set(trainer.callback_metrics))


@pytest.mark.parametrize("name", ["er", "lwf"])
def test_manual_step_equals_lightnings_automatic_loop(name, tmp_path, fast_config_for, monkeypatch):
    """`CLStrategy.training_step` optimises by hand; the same run through Lightning's automatic
    optimisation (closure, zero_grad, backward, step) must give bit-identical weights."""
    from clbench.base import CLStrategy

    def run_once(folder):
        weights = {}
        spec = RunSpec(name, "synthetic-5", run=fast_config_for(tmp_path / folder, epochs=2), seed=3)
        result = run(spec, on_experience=lambda i, res, s: weights.update(s.state_dict()))
        return result.accuracy_matrix, weights

    manual = run_once("manual")
    init = CLStrategy.__init__

    def automatic_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.automatic_optimization = True

    monkeypatch.setattr(CLStrategy, "__init__", automatic_init)
    monkeypatch.setattr(CLStrategy, "training_step", CLStrategy.total_loss)
    automatic = run_once("automatic")
    assert manual[0] == automatic[0]
    assert manual[1].keys() == automatic[1].keys()
    for key in manual[1]:
        assert torch.equal(manual[1][key], automatic[1][key]), key


def test_nothing_is_logged_without_a_logger(tmp_path, fast_config_for):
    """`self.log` costs about 1 ms a call: loss terms are logged only for an attached logger."""
    watch = MetricsAtTrainEnd()
    run(RunSpec("er", "synthetic-2", run=fast_config_for(tmp_path), seed=0), callbacks=[watch])
    assert watch.seen and all(not names for names in watch.seen)


def test_one_entry_point_scan_serves_every_trainer_of_a_run(monkeypatch, tmp_path, fast_config_for):
    """Lightning scans installed distributions for callback factories in every Trainer; a run scans once."""
    from lightning_fabric.utilities import registry

    calls = []
    real_scan = registry.entry_points

    def counting_scan(**selection):
        calls.append(selection)
        return real_scan(**selection)

    monkeypatch.setattr(registry, "entry_points", counting_scan)
    spy = FitSpy()
    run(RunSpec("naive", "synthetic-5", run=fast_config_for(tmp_path), seed=0), callbacks=[spy])
    assert len(spy.fits) == 5 and len(calls) == 1  # five Trainers, one scan
    assert registry.entry_points is counting_scan  # restored after the run


class _LearningRates(pl.Callback):
    def __init__(self):
        self.per_epoch: list[list[float]] = []

    def on_fit_start(self, trainer, pl_module):
        self.per_epoch.append([])

    def on_train_epoch_start(self, trainer, pl_module):
        self.per_epoch[-1].append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step", "multistep"])
def test_lr_schedules_over_each_fits_epochs(schedule, tmp_path, fast_config_for):
    import math

    lrs = _LearningRates()
    cfg = fast_config_for(tmp_path, epochs=4)
    overrides = {"lr": 0.1, "lr_schedule": schedule, "lr_step_epochs": 2, "lr_step_gamma": 0.5,
                 "lr_milestones": (1, 3)}
    result = run(RunSpec("naive", "synthetic-2", run=cfg, strategy_overrides=overrides), callbacks=[lrs])
    assert result.status == "completed", result.error
    # stepped after each epoch, every fit afresh: CosineAnnealingLR with T_max = 4 epochs; StepLR
    # halving every 2 epochs; MultiStepLR halving at epochs 1 and 3
    expected = {"constant": [0.1] * 4, "step": [0.1, 0.1, 0.05, 0.05], "multistep": [0.1, 0.05, 0.05, 0.025],
                "cosine": [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]}[schedule]
    assert len(lrs.per_epoch) == 2
    for fit in lrs.per_epoch:
        assert fit == pytest.approx(expected, abs=1e-12)


def test_an_unknown_lr_schedule_is_a_usage_error():
    from clbench.config import StrategyConfig
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match="lr_schedule='linear' is invalid; expected one of: constant, cosine, step, multistep"):
        StrategyConfig(lr_schedule="linear")
    with pytest.raises(UsageError, match="lr_schedule='multistep' needs lr_milestones"):
        StrategyConfig(lr_schedule="multistep")
    for milestones in ((11, 8), (0, 8), (8, 8)):
        with pytest.raises(UsageError, match=r"lr_milestones=.* is invalid; expected increasing epochs >= 1"):
            StrategyConfig(lr_schedule="multistep", lr_milestones=milestones)
    with pytest.raises(UsageError, match="lr_step_gamma=0 is invalid"):
        StrategyConfig(lr_step_gamma=0)


class CountingDataset(torch.utils.data.Dataset):
    """A test set that counts how often it is read."""

    def __init__(self, dataset):
        self.dataset, self.reads = dataset, 0
        self.targets = dataset.targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads += 1
        return self.dataset[i]


def test_test_sets_of_unseen_experiences_score_zero_without_a_pass(strategy_factory, synthetic_scenario):
    strategy = strategy_factory("naive")
    strategy.on_experience_start(synthetic_scenario.info(0))
    sets = [CountingDataset(d) for d in synthetic_scenario.test_sets]
    loaders = [make_loader(d, 64, shuffle=False) for d in sets]
    row = evaluate(strategy, loaders, n_seen=len(synthetic_scenario.info(0).seen_classes))
    assert row[1] == 0.0 and sets[1].reads == 0  # its classes are all masked: nothing to score
    assert sets[0].reads == len(sets[0])
    # a set whose labels are not known without reading it is scored as before
    unknown = CountingDataset(synthetic_scenario.test_sets[1])
    del unknown.targets
    assert evaluate(strategy, [make_loader(unknown, 64, shuffle=False)], n_seen=2) == [0.0]
    assert unknown.reads == len(unknown)
    assert evaluate(strategy, loaders, n_seen=0) == [0.0, 0.0] and sets[0].reads == len(sets[0])


def test_evaluation_leaves_the_global_random_stream_alone(strategy_factory, synthetic_scenario):
    strategy = strategy_factory("naive")
    strategy.on_experience_start(synthetic_scenario.info(1))
    loaders = [make_loader(d, 16, shuffle=False) for d in synthetic_scenario.test_sets]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    evaluate(strategy, loaders, n_seen=4)
    assert torch.equal(torch.get_rng_state(), before)


def test_results_are_bit_identical_without_filling_uninitialised_memory(tmp_path, fast_config_for, monkeypatch):
    from clbench.engine import runner

    def matrix(fill: bool):
        monkeypatch.setattr(runner, "FILL_UNINITIALIZED_MEMORY", fill)
        r = run(RunSpec("er", "synthetic-2", run=fast_config_for(tmp_path / str(fill), epochs=2)))
        assert torch.utils.deterministic.fill_uninitialized_memory is fill
        return r.accuracy_matrix, r.metrics

    assert matrix(True) == matrix(False)


def test_download_of_a_detection_run_names_no_backbone(capsys):
    from clbench.cli import main

    assert main(["download", "--strategy", "gfl_finetune", "--scenario", "shapes-2+2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "weights: none needed (gfl_finetune builds its own model from its settings)"
    assert out[1].startswith("data: shapes-2+2 ready (2 experiences)")


def test_a_run_freezes_older_objects_for_its_collections_and_thaws_them(tmp_path, fast_config_for, monkeypatch):
    import gc

    from clbench.engine import runner

    frozen_during = []
    real_train = runner._train

    def spy(*args, **kwargs):
        frozen_during.append(gc.get_freeze_count())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "_train", spy)
    assert gc.get_freeze_count() == 0
    run(RunSpec("naive", "synthetic-2", run=fast_config_for(tmp_path)))
    assert len(frozen_during) == 2 and all(n > 0 for n in frozen_during)  # the libraries' objects, frozen
    assert gc.get_freeze_count() == 0  # thawed after the run


def test_run_start_collects_only_what_an_earlier_run_of_the_process_left(monkeypatch):
    """The full collection before a run freezes the process's objects is skipped for the process's first
    run (nothing of an earlier run to free; 0.3 s with Avalanche imported) and made for every later one."""
    import gc

    from clbench.engine import runner

    collections = []
    monkeypatch.setattr(runner, "_runs_started_in_process", 0)
    monkeypatch.setattr(runner.gc, "collect", lambda *a: collections.append(a) or 0)
    frozen_before = gc.get_freeze_count()
    with runner._collections_scan_only_this_run():
        assert gc.get_freeze_count() > frozen_before  # the run's collections skip what existed before it
    assert collections == [] and gc.get_freeze_count() == frozen_before
    with runner._collections_scan_only_this_run():
        pass
    assert collections == [()] and gc.get_freeze_count() == frozen_before


def test_a_phase_of_zero_epochs_is_skipped_and_one_without_epochs_takes_the_runs(fast_run_config, strategy_factory,
                                                                                  synthetic_scenario, monkeypatch):
    """`Phase.epochs=None` means the run's epochs; 0 (a phase switched off by its setting) must not
    fall back to the run's epochs: the phase is not fitted at all."""
    from clbench.engine import runner
    from clbench.types import Phase
    from dataclasses import replace

    strategy = strategy_factory("naive")
    monkeypatch.setattr(strategy, "phases", lambda info: [Phase("train"), Phase("off", epochs=0), Phase("two", epochs=2)])
    fitted = []
    monkeypatch.setattr(runner, "_fit", lambda trainer, strategy, loader: fitted.append((strategy.phase.name, trainer.max_epochs)))
    runner._train(strategy, synthetic_scenario.info(0), synthetic_scenario.train_sets[0], replace(fast_run_config, epochs=3),
                  seed=0, callbacks=[], loggers=[])
    assert fitted == [("train", 3), ("two", 2)]
