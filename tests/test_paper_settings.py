"""`--paper-settings` is the whole published protocol: per method, one scenario's resolved settings against
values typed from the paper (the method notes), never read back from the code; the global batch and its
gradient accumulation; the published number in the result JSON and on the leaderboard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clbench.engine.runner import (
    RunSpec,
    accumulate_grad_batches,
    describe_accumulation,
    published_number,
    resolve_sources,
    run,
)
from clbench.config import RunConfig
from clbench.errors import UsageError
from clbench.registry import STRATEGIES

ORIG = "vit_base_patch16_224.orig_in21k"  # PrePrompt's code: the original ViT-B_16.npz (IN-21k)
PILOT = "vit_base_patch16_224.augreg_in21k"  # PILOT's vit_base_patch16_224_in21k
MAMMOTH = "resnet18_cifar"  # Mammoth's ResNet-18, 3x3 stem, from scratch

# strategy, scenario, then the paper's protocol: backbone, image size, normalisation, class order, epochs,
# batch, global batch, optimiser, lr, schedule, and the method options the paper fixes
PROTOCOLS = [
    ("preprompt", "cifar100-10", ORIG, 224, "inception", "natural", 50, 24, 8 * 24, "adam", 0.03 * 24 / 256, "step",
     {"prompt_length": 5, "prompt_blocks": 5, "prompt_momentum": 0.01, "calibration_epochs": 30,
      "calibration_batch": 120, "lr_step_epochs": 30, "head_lr_scale": 0.1}),
    ("l2p", "imagenet-r-10", PILOT, 224, "none", "paper", 10, 32, 32, "adam", 0.03 * 16 / 256, "constant",
     {"pool_size": 10, "prompt_length": 5, "top_k": 5}),
    ("dualprompt", "imagenet-r-10", PILOT, 224, "none", "paper", 10, 24, 24, "adam", 0.001, "constant", {}),
    ("coda_prompt", "imagenet-r-10", PILOT, 224, "none", "paper", 50, 128, 128, "adam", 0.001, "coda_cosine",
     {"pool_size": 100}),
    ("aper", "cifar100-20", PILOT, 224, "none", "paper", 20, 48, 48, "sgd", 0.01, "cosine",
     {"bottleneck": 64, "momentum": 0.9, "weight_decay": 5e-4}),
    ("ranpac", "cifar100-10", PILOT, 224, "none", "paper", 20, 48, 48, "sgd", 0.01, "cosine",
     {"bottleneck": 64, "projection_dim": 10_000}),
    ("ease", "cifar100-20", PILOT, 224, "none", "paper", 20, 48, 48, "sgd", 0.025, "cosine",
     {"bottleneck": 64, "weight_decay": 5e-4}),
    ("tuna", "cifar100-20", PILOT, 224, "none", "paper", 15, 16, 16, "sgd", 0.01, "cosine",
     {"bottleneck": 16, "momentum": 0.9, "weight_decay": 5e-4, "align_epochs": 30}),
    ("tuna", "imagenet-r-10", PILOT, 224, "none", "paper", 10, 32, 32, "sgd", 0.02, "cosine", {"orthogonality": 0.001}),
    ("daf", "cifar100-20", PILOT, 224, "none", "paper", 15, 16, 16, "sgd", 0.01, "cosine",
     {"bottleneck": 16, "select_prior": True}),
    ("saef", "imagenet-r-10", PILOT, 224, "none", "paper", 10, 32, 32, "sgd", 0.02, "cosine",
     {"bottleneck": 16, "exit_entropy": 1.0}),
    ("sgds", "cifar100-20", PILOT, 224, "none", "paper", 15, 16, 16, "sgd", 0.01, "cosine",
     {"bottleneck": 64, "units_per_class": 8}),
    ("etag", "cifar100-b50-10", MAMMOTH, None, "dataset", "paper", 100, 128, 128, "adam", 1e-3, "step",
     {"weight_decay": 2e-4, "lr_step_epochs": 30, "generator_epochs": 100, "generator_lr": 1e-4, "temperature": 3.0}),
    ("lord", "cifar10-5", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.03, "constant",
     {"momentum": 0.0, "buffer_size": 200, "alpha": 0.1, "beta": 0.5}),
    ("clfd", "cifar10-5", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.1, "constant",
     {"momentum": 0.0, "buffer_size": 125}),
    ("der_pp_clfd", "tinyimagenet-10", MAMMOTH, None, "dataset", "natural", 100, 32, 32, "sgd", 0.03, "constant",
     {"buffer_size": 125, "alpha": 0.1, "beta": 0.5}),
    ("er_ace_clfd", "tinyimagenet-10", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.03, "constant",
     {"buffer_size": 125}),
    ("cls_er_clfd", "cifar10-5", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.1, "constant",
     {"reg_weight": 0.15, "stable_update_freq": 0.2, "plastic_update_freq": 0.9, "stable_alpha": 0.999}),
    ("fdinet", "cifar10-5", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.1, "constant",
     {"buffer_size": 125}),
    ("er", "cifar10-5", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.1, "constant",
     {"momentum": 0.0, "buffer_size": 200}),
    ("der_pp", "cifar10-5", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.03, "constant",
     {"momentum": 0.0, "buffer_size": 125, "alpha": 0.2, "beta": 0.5}),
    ("er_ace", "tinyimagenet-10", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.03, "constant",
     {"buffer_size": 125}),
    ("icarl", "cifar10-5", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.1, "constant",
     {"buffer_size": 200, "wd_reg": 1e-5}),
    ("cls_er", "tinyimagenet-10", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.1, "constant",
     {"reg_weight": 0.1, "stable_update_freq": 0.1, "plastic_update_freq": 0.16}),
    ("lwf", "cifar10-5", MAMMOTH, None, "dataset", "natural", 50, 32, 32, "sgd", 0.01, "constant",
     {"weight_decay": 5e-4, "alpha": 3.0, "temperature": 2.0, "warmup": True}),
    ("ewc", "tinyimagenet-10", MAMMOTH, None, "dataset", "natural", 100, 32, 32, "sgd", 0.03, "constant",
     {"ewc_lambda": 25.0, "gamma": 1.0}),
]


@pytest.mark.parametrize("row", PROTOCOLS, ids=[f"{r[0]}-{r[1]}" for r in PROTOCOLS])
def test_paper_settings_resolve_to_the_papers_protocol(row):
    strategy, scenario, backbone, size, norm, order, epochs, batch, global_batch, opt, lr, schedule, options = row
    run_cfg, cfg, sources = resolve_sources(RunSpec(strategy, scenario, paper_settings=True))
    assert run_cfg.backbone == backbone
    assert (run_cfg.image_size, run_cfg.normalization, run_cfg.class_order) == (size, norm, order)
    assert (run_cfg.epochs, run_cfg.batch_size, run_cfg.global_batch_size) == (epochs, batch, global_batch)
    assert (cfg.optimizer, cfg.lr_schedule) == (opt, schedule)
    assert cfg.lr == pytest.approx(lr)
    for key, value in options.items():
        assert getattr(cfg, key) == pytest.approx(value), key
    # the protocol's own values come from the paper settings, not from defaults that could drift
    for key in ("epochs", "batch_size", "global_batch_size", "class_order"):
        assert sources["run_config"][key] == "paper settings", key


def test_simplecil_paper_settings_are_the_backbone_and_pilots_class_order():
    run_cfg, _, _ = resolve_sources(RunSpec("simplecil", "imagenet-r-10", paper_settings=True))
    assert (run_cfg.backbone, run_cfg.image_size, run_cfg.normalization, run_cfg.class_order) == (PILOT, 224, "none", "paper")


def test_paper_order_of_the_pilot_benchmarks_is_numpys_seed_1993_permutation():
    from clbench.scenarios.base import seeded_permutation

    np.random.seed(1993)
    assert seeded_permutation(100, 1993) == [int(c) for c in np.random.permutation(100)]


# ---- the published numbers, typed from the notes
PUBLISHED = [
    ("preprompt", "cifar100-10", "final_avg_acc", 0.9374),
    ("preprompt", "imagenet-r-10", "final_avg_acc", 0.7509),
    ("l2p", "imagenet-r-10", "final_avg_acc", 0.6977),
    ("dualprompt", "imagenet-r-10", "final_avg_acc", 0.6718),
    ("coda_prompt", "imagenet-r-10", "final_avg_acc", 0.7227),
    ("simplecil", "cifar100-20", "final_avg_acc", 0.8126),
    ("aper", "cifar100-20", "final_avg_acc", 0.8515),
    ("ranpac", "cifar100-10", "final_avg_acc", 0.922),
    ("ease", "imagenet-r-10", "final_avg_acc", 0.7617),
    ("tuna", "cifar100-20", "avg_incremental_acc", 0.9444),
    ("daf", "cifar100-20", "avg_incremental_acc", 0.9115),
    ("saef", "imagenet-r-10", "avg_incremental_acc", 0.8454),
    ("etag", "cifar100-b50-5", "avg_incremental_acc", 0.6799),
    ("clfd", "cifar10-5", "final_avg_acc", 0.5576),
    ("der_pp_clfd", "cifar10-5", "final_avg_acc", 0.5881),
    ("er_ace_clfd", "tinyimagenet-10", "final_avg_acc", 0.1588),
    ("cls_er_clfd", "cifar10-5", "final_avg_acc", 0.5998),
    ("der_pp", "cifar10-5", "final_avg_acc", 0.5309),
    ("er_ace", "cifar10-5", "final_avg_acc", 0.5612),
    ("cls_er", "cifar10-5", "final_avg_acc", 0.5357),
    ("er", "cifar10-5", "final_avg_acc", 0.4479),
    ("icarl", "cifar10-5", "final_avg_acc", 0.4902),
    ("lwf", "cifar10-5", "final_avg_acc", 0.1961),
    ("ewc", "cifar10-5", "final_avg_acc", 0.1949),
]


@pytest.mark.parametrize("strategy,scenario,metric,value", PUBLISHED)
def test_published_numbers_are_declared_beside_the_settings(strategy, scenario, metric, value):
    p = published_number(STRATEGIES.get(strategy), scenario)
    assert p["metric"] == metric and p["value"] == pytest.approx(value) and p["source"]


def test_every_published_number_names_a_metric_and_a_scenario_with_paper_settings():
    from clbench.metrics import METRICS

    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        for scenario, p in (vars(cls).get("PUBLISHED") or {}).items():
            assert scenario in cls.PAPER_SETTINGS, (name, scenario)
            assert p["metric"] in METRICS and 0 < p["value"] <= 1 and p["source"], (name, scenario)


def test_methods_without_a_readable_table_declare_none_and_none_is_inherited():
    for name in ("sgds", "lord", "fdinet", "der_pp_fdinet"):
        assert not vars(STRATEGIES.get(name)).get("PUBLISHED")
        assert published_number(STRATEGIES.get(name), "cifar10-5") is None  # not ER's, its base class


# ---- global batch and accumulation
def test_global_batch_becomes_accumulated_batches_per_device():
    cfg = RunConfig(batch_size=24, global_batch_size=192)
    assert accumulate_grad_batches(cfg, 1) == 8
    assert accumulate_grad_batches(cfg, 2) == 4
    assert accumulate_grad_batches(cfg, 8) == 1
    assert accumulate_grad_batches(RunConfig(batch_size=24), 4) == 1
    assert describe_accumulation(cfg, 2) == {"global_batch_size": 192, "batch_size": 24, "devices": 2,
                                             "accumulate_grad_batches": 4}


def test_a_global_batch_that_does_not_divide_is_one_line():
    with pytest.raises(UsageError) as e:
        RunConfig(batch_size=24, global_batch_size=100)
    assert "\n" not in str(e.value) and "global_batch_size=100" in str(e.value)
    with pytest.raises(UsageError) as e:
        accumulate_grad_batches(RunConfig(batch_size=24, global_batch_size=72), 2)
    assert str(e.value) == ("global_batch_size=72 is not divisible by batch_size x devices (24 x 2 = 48); "
                            "expected a multiple of 48")


def test_a_run_with_a_global_batch_steps_once_per_k_batches_and_records_it(tmp_path, fast_config_for):
    import pytorch_lightning as pl

    fits = []

    class Steps(pl.Callback):
        def on_train_end(self, trainer, module):
            fits.append((trainer.global_step, trainer.num_training_batches))

    cfg = fast_config_for(tmp_path, epochs=1, batch_size=8, global_batch_size=16, limit_train_batches=3)
    result = run(RunSpec("naive", "synthetic-2", run=cfg, seed=0), callbacks=[Steps()])
    assert fits and all(batches == 3 and steps == 2 for steps, batches in fits)  # batches 1+2, then 3 alone
    assert result.environment["gradient_accumulation"] == {"global_batch_size": 16, "batch_size": 8, "devices": 1,
                                                           "accumulate_grad_batches": 2}


def test_accumulated_gradient_is_the_mean_over_the_global_batch():
    """Two batches of 4 at k = 2 give the gradient of the mean loss over the 8 samples."""
    from clbench.base import CLStrategy

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    x = torch.randn(8, 3)
    full = ((x @ w) ** 2).mean()
    (g_full,) = torch.autograd.grad(full, w)

    class Fake:
        accumulate_grad_batches = 2

        class trainer:
            num_training_batches = 2

    zeros, steps, grads = [], [], torch.zeros(3)
    for i in range(2):
        zero, step, k = CLStrategy.accumulation(Fake, i)
        zeros.append(zero)
        steps.append(step)
        (g,) = torch.autograd.grad(((x[4 * i:4 * i + 4] @ w) ** 2).mean() / k, w)
        grads += g
    assert zeros == [True, False] and steps == [False, True]
    torch.testing.assert_close(grads, g_full)


def test_a_strategy_that_steps_its_own_way_refuses_accumulation():
    from clbench.engine.runner import _check_accumulation

    assert STRATEGIES.get("naive").accumulates_gradients()
    assert STRATEGIES.get("preprompt").accumulates_gradients()
    own = next(n for n in ("aper", "ease", "ranpac") if not STRATEGIES.get(n).accumulates_gradients())
    with pytest.raises(UsageError) as e:
        _check_accumulation(STRATEGIES.get(own), RunConfig(batch_size=16, global_batch_size=32))
    assert "\n" not in str(e.value) and f"strategy {own!r}" in str(e.value)


# ---- the published number in the result and on the leaderboard
def test_a_paper_settings_run_stores_the_published_number(tmp_path, fast_config_for, monkeypatch):
    naive = STRATEGIES.get("naive")
    monkeypatch.setattr(naive, "PAPER_SETTINGS", {"synthetic-2": {"epochs": 1}}, raising=False)
    monkeypatch.setattr(naive, "PUBLISHED", {"synthetic-2": {"metric": "final_avg_acc", "value": 0.5,
                                                             "source": "Table 9"}}, raising=False)
    result = run(RunSpec("naive", "synthetic-2", run=fast_config_for(tmp_path), paper_settings=True, seed=0))
    from clbench.reporting.results import result_path

    stored = json.loads(result_path(tmp_path, result).read_text())
    assert stored["published"] == {"metric": "final_avg_acc", "value": 0.5, "source": "Table 9"}
    plain = run(RunSpec("naive", "synthetic-2", run=fast_config_for(tmp_path / "plain"), seed=0))
    assert plain.published is None


def test_the_leaderboard_shows_the_published_number_beside_the_measured_one():
    from clbench.metrics import summarise
    from clbench.reporting import leaderboard as L
    from clbench.reporting import render as R
    from clbench.reporting.results import RunResult

    def result(seed, paper):
        r = RunResult("preprompt", "cifar100-10", "vit", seed, status="completed", paper_settings=paper)
        r.accuracy_matrix = [[0.9, 0.0], [0.9, 0.9]]
        r.scenario_info = {"num_experiences": 2}
        r.metrics = summarise(r.accuracy_matrix)
        r.edge = {"per_experience": [], "totals": {}}
        if paper:
            r.published = {"metric": "final_avg_acc", "value": 0.9374, "source": "README table"}
        return r

    md = R.to_markdown(L.build([result(0, True)]))
    assert R.PUBLISHED_NOTE in md
    assert "- preprompt: published final acc 93.74% (README table); measured 90.0%" in md
    assert "published final acc 93.74%" in R.to_html(L.build([result(0, True)]), results=[])
    assert "published" not in R.to_markdown(L.build([result(0, False)]))  # a run without --paper-settings


def test_preprompt_on_a_vit_shallower_than_its_prompt_blocks_suggests_the_depth():
    from clbench.engine.runner import create_strategy
    from clbench.models.backbones import build_backbone

    vit = build_backbone("clbench_vit_tiny", in_chans=3, img_size=32)
    with pytest.raises(UsageError) as e:
        create_strategy("preprompt", vit, 10)
    assert "\n" not in str(e.value) and "--set prompt_blocks=4" in str(e.value)
    assert str(e.value).startswith("prompt_blocks=5 is invalid")
