"""RanPAC: fixed random projection, streamed G and Q, ridge chosen on an 80/20 split, closed-form readout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clbench.strategies.ranpac import RIDGES, choose_ridge, ridge_solution

from clbench.engine.runner import RunSpec, create_scenario, run


def test_ridge_choice_and_readout_equal_the_closed_form_on_a_small_example():
    rng = np.random.default_rng(0)
    h = np.maximum(rng.normal(size=(40, 6)), 0)
    y = np.eye(3)[rng.integers(0, 3, size=40)]
    # by hand: fit on rows 0..31, validate on rows 32..39, for every ridge
    errors = []
    for ridge in RIDGES:
        w = np.linalg.inv(h[:32].T @ h[:32] + ridge * np.eye(6)) @ (h[:32].T @ y[:32])
        errors.append(np.mean((h[32:] @ w - y[32:]) ** 2))
    expected_ridge = RIDGES[int(np.argmin(errors))]
    ridge = choose_ridge(torch.from_numpy(h), torch.from_numpy(y))
    assert ridge == expected_ridge
    g, q = h.T @ h, h.T @ y
    expected = np.linalg.inv(g + ridge * np.eye(6)) @ q
    got = ridge_solution(torch.from_numpy(g), torch.from_numpy(q), ridge).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def ranpac_run(tmp_path_factory, fast_config_for):
    snapshots = []

    def keep(i, result, strategy):
        snapshots.append({"projection": strategy.projection.clone(), "backbone": {k: v.clone() for k, v in strategy.backbone.state_dict().items()},
                          "adapters": {k: v.clone() for k, v in strategy.adaptation.adapters.state_dict().items()},
                          "strategy": strategy})

    cfg = fast_config_for(tmp_path_factory.mktemp("ranpac"), backbone="clbench_vit_tiny", epochs=1, limit_train_batches=None)
    spec = RunSpec("ranpac", "digits32-5", run=cfg, seed=0, strategy_overrides={"bottleneck": 8, "projection_dim": 64})
    result = run(spec, on_experience=keep)
    assert result.status == "completed", result.error
    return result, snapshots


def test_streamed_g_and_q_equal_the_batch_computation_over_all_data(ranpac_run):
    _, snapshots = ranpac_run
    strategy = snapshots[-1]["strategy"]
    scenario = create_scenario("digits32-5")
    x = torch.cat([s.x for s in scenario.train_sets])
    y = torch.cat([s.y for s in scenario.train_sets])
    h = strategy.random_features(x).double()  # the features are fixed once the first task is over
    onehot = torch.nn.functional.one_hot(y, 10).double()
    assert torch.allclose(strategy.gram, h.T @ h, rtol=1e-5)
    assert torch.allclose(strategy.targets, h.T @ onehot, rtol=1e-5)
    assert torch.allclose(strategy.readout, ridge_solution(strategy.gram, strategy.targets, strategy.ridge).float())
    assert strategy.ridge in RIDGES
    sample = x[:5]
    assert torch.allclose(strategy.predict_logits(sample), strategy.random_features(sample) @ strategy.readout)


def test_the_projection_is_random_fixed_and_seeded(ranpac_run):
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone

    _, snapshots = ranpac_run
    w = snapshots[0]["projection"]
    assert w.shape == (64, 64)
    assert all(torch.equal(s["projection"], w) for s in snapshots[1:])
    assert abs(w.mean().item()) < 0.06 and abs(w.std().item() - 1) < 0.06  # N(0, 1) entries
    cfg = strategy_config("ranpac", {"projection_dim": 64, "bottleneck": 8})

    def projection(seed):
        vit = build_backbone("clbench_vit_tiny", in_chans=3, img_size=32)
        return create_strategy("ranpac", vit, 10, cfg, seed=seed).projection

    assert torch.equal(projection(0), w) and not torch.equal(projection(1), w)


def test_backbone_frozen_and_adapter_tuned_in_the_first_task_only(ranpac_run):
    result, snapshots = ranpac_run
    first = snapshots[0]
    for s in snapshots[1:]:
        assert all(torch.equal(s["backbone"][k], first["backbone"][k]) for k in first["backbone"])
        assert all(torch.equal(s["adapters"][k], first["adapters"][k]) for k in first["adapters"])
    assert first["adapters"]["adapters.0.up.weight"].abs().sum() > 0
    phases = [{s["phase"] for s in r["flops_step_shapes"]} for r in result.edge["per_experience"]]
    assert phases[0] == {"adapt", "statistics"} and all(p == {"statistics"} for p in phases[1:])
