"""Continual forecasting: error metrics on hand-built matrices, the statsmodels window scenarios
(values at the right indices, the train/test gap, eras in order), a co2-4 run through the
runner (MSE matrix, edge figures, leaderboard row, resume) and the refusals."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from clbench.tasks import forecasting as F
from clbench.cli import main
from clbench.engine.runner import RunSpec, create_scenario, run
from clbench.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- metrics
# R[i][j]: MSE on experience j after training experience i
R = [[4.0, 9.0, 9.0],
     [1.0, 2.0, 9.0],
     [3.0, 2.5, 1.0]]


def test_error_metrics_by_hand():
    assert F.final_average_error(R) == pytest.approx((3.0 + 2.5 + 1.0) / 3)
    # f_j = R[T-1][j] - min_{j<=i<T-1} R[i][j]: experience 0's best was 1.0 (after experience 1)
    assert F.forgetting_per_experience(R) == pytest.approx([3.0 - 1.0, 2.5 - 2.0])
    assert F.average_forgetting(R) == pytest.approx(1.25)
    assert F.relative_forgetting(R) == pytest.approx((2.0 / 4.0 + 0.5 / 2.0) / 2)
    # BWT_err against the diagonal: experience 0 ends below its just-learned error (negative part)
    assert F.backward_transfer_error(R) == pytest.approx(((3.0 - 4.0) + (2.5 - 2.0)) / 2)
    assert F.plasticity_error(R) == pytest.approx((4.0 + 2.0 + 1.0) / 3)


def test_error_metric_signs():
    forgot = [[1.0, 5.0], [3.0, 0.5]]  # error on experience 0 grew: positive forgetting and BWT_err
    improved = [[2.0, 5.0], [1.0, 0.5]]  # it shrank: negative
    assert F.average_forgetting(forgot) == pytest.approx(2.0) and F.backward_transfer_error(forgot) == pytest.approx(2.0)
    assert F.average_forgetting(improved) == pytest.approx(-1.0) and F.backward_transfer_error(improved) == pytest.approx(-1.0)
    assert all(spec.higher_is_better is False for spec in F.ERROR_METRICS.values())
    one = [[1.0, 2.0]]
    assert math.isnan(F.average_forgetting(one)) and math.isnan(F.backward_transfer_error(one))
    assert F.to_original_scale([[1.0, 2.0]], [2.0, 10.0], 2) == [[4.0, 200.0]]


# --------------------------------------------------------------------------- scenarios
@pytest.fixture(scope="module")
def co2():
    return create_scenario("co2-4")


@pytest.fixture(scope="module")
def domains():
    return create_scenario("ts-domains-4")


def test_co2_windows_are_the_series_at_the_right_indices(co2):
    from clbench.scenarios.forecast import load_co2

    values, week, missing = load_co2()
    assert missing > 0 and not np.isnan(values).any() and "interpolation" in co2.describe()["missing_values"]
    first_train = values[: int(co2.train_sets[0].starts.max()) + co2.lookback + co2.horizon]
    mean, std = first_train.mean(), first_train.std()  # the scaler: experience 1's training part only
    assert co2.scales == pytest.approx([std] * 4)
    for data in (co2.train_sets[2], co2.test_sets[3]):
        for k in (0, 17, len(data) - 1):
            t = int(data.starts[k])
            x, y = data[k]
            np.testing.assert_allclose(x[0].numpy(), (values[t : t + 52] - mean) / std, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(y.numpy(), (values[t + 52 : t + 56] - mean) / std, rtol=1e-5, atol=1e-4)
            assert x[1].eq(0).all() and x[2].numpy().tolist() == week[t : t + 52].tolist()


def test_co2_eras_are_consecutive_with_a_gap_and_never_shuffled(co2):
    L, H = co2.lookback, co2.horizon
    era = 2284 // 4
    last_step = -1
    for i in range(co2.num_experiences):
        train, test = co2.train_sets[i], co2.test_sets[i]
        for part in (train, test):
            assert torch.equal(part.starts, torch.sort(part.starts).values)  # chronological order
            assert bool((part.starts[1:] - part.starts[:-1] == 1).all())  # every window, no holes
        assert int(train.starts[0]) == i * era and int(test.starts[-1]) + L + H == (i + 1) * era
        assert int(train.starts[0]) > last_step  # after the previous era's last test step
        last_train_step = int(train.starts[-1]) + L + H - 1
        assert int(test.starts[0]) == last_train_step + 1 + H  # the gap of H: no shared step
        last_step = int(test.starts[-1]) + L + H - 1


def test_domains_are_four_series_each_scaled_on_its_own_training_part(domains):
    from clbench.scenarios.forecast import load_domains

    series = load_domains()
    assert domains.series_names == [name for name, _, _ in series] == ["sunspots", "nile", "elnino", "elec_equip"]
    for i, (_, values, _) in enumerate(series):
        train = domains.train_sets[i]
        stop = int(train.starts[-1]) + domains.lookback + domains.horizon
        part = values[:stop]
        assert domains.scales[i] == pytest.approx(part.std())
        t = int(train.starts[5])
        np.testing.assert_allclose(train[5][0][0].numpy(), (values[t : t + 12] - part.mean()) / part.std(), rtol=1e-5, atol=1e-5)
        assert train.x[:, 1].eq(i).all() and domains.test_sets[i].x[:, 1].eq(i).all()
    assert domains.train_sets[0].x[:, 2].eq(-1).all() and domains.train_sets[2].x[:, 2].max() == 11  # yearly: no month


def test_macro_variables_arrive_one_per_experience_on_one_timeline():
    from clbench.scenarios.forecast import MACRO_VARIABLES, load_macro

    macro = create_scenario("macro-vars-4")
    variables, quarter = load_macro()
    assert macro.stream == "variable-incremental" and macro.series_names == list(MACRO_VARIABLES)
    assert (macro.lookback, macro.horizon, macro.num_series, macro.season_slots) == (8, 2, 4, 4)
    first_train = macro.train_sets[0].starts
    for i, name in enumerate(MACRO_VARIABLES):
        train, test = macro.train_sets[i], macro.test_sets[i]
        assert torch.equal(train.starts, first_train)  # the same time steps for every variable
        stop = int(train.starts[-1]) + 8 + 2
        part = variables[name][:stop]
        assert macro.scales[i] == pytest.approx(part.std())
        t = int(train.starts[7])
        np.testing.assert_allclose(train[7][0][0].numpy(), (variables[name][t : t + 8] - part.mean()) / part.std(),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(train[7][1].numpy(), (variables[name][t + 8 : t + 10] - part.mean()) / part.std(),
                                   rtol=1e-5, atol=1e-5)
        assert train.x[:, 1].eq(i).all() and torch.equal(train.x[7, 2], torch.tensor(quarter[t : t + 8], dtype=torch.float32))
        assert int(test.starts[0]) >= stop + 2  # a gap of H steps after the last training target
    assert macro.describe()["stream"] == "variable-incremental"


def test_instance_normalisation_makes_the_forecast_follow_a_shift_of_the_window(domains):
    from clbench.strategies.stella_mlp import StellaLike

    torch.manual_seed(0)
    plain, normed = StellaLike(12, 3, 4, 12, 8, 16), StellaLike(12, 3, 4, 12, 8, 16, instance_norm=True)
    normed.load_state_dict(plain.state_dict())
    x = domains.train_sets[2].x[:5]
    shifted = x.clone()
    shifted[:, 0] += 7.0  # the values only; series index and month stay
    assert torch.allclose(normed(shifted), normed(x) + 7.0, atol=1e-4)
    assert not torch.allclose(plain(shifted), plain(x) + 7.0, atol=1e-2)
    scaled = x.clone()
    scaled[:, 0] *= 3.0
    assert torch.allclose(normed(scaled), 3.0 * normed(x), atol=1e-3)


def test_scenario_describes_its_protocol_and_is_deterministic(co2):
    d = co2.describe()
    assert d["task_type"] == "forecasting" and d["lookback"] == 52 and d["horizon"] == 4
    assert "experience 1" in d["scaler"] and d["stream"] == "segment-incremental"
    again = create_scenario("co2-4")
    for a, b in zip(co2.train_sets + co2.test_sets, again.train_sets + again.test_sets):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_missing_statsmodels_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "statsmodels.datasets.co2", None)
    with pytest.raises(UsageError, match=r"pip install 'clbench\[forecast\]'"):
        create_scenario("co2-4")


# --------------------------------------------------------------------------- runs
def _spec(tmp_path, strategy="stella_mlp", **kw):
    from clbench.config import RunConfig

    run_cfg = RunConfig(epochs=1, limit_train_batches=2, batch_size=16, progress=False, accelerator="cpu",
                        output_dir=str(tmp_path))
    return RunSpec(strategy=strategy, scenario="co2-4", run=run_cfg, **kw)


def test_co2_run_stores_an_mse_matrix_edge_figures_and_a_leaderboard_row(tmp_path):
    from clbench.reporting import leaderboard, render
    from clbench.reporting.results import load

    result = run(_spec(tmp_path))
    assert result.status == "completed", result.error
    f = result.forecasting
    assert result.accuracy_matrix == [] and result.metrics == {} and result.backbone == "stella_like_mlp"
    for key in ("mse_matrix", "mae_matrix", "mse_matrix_original", "mae_matrix_original"):
        assert len(f[key]) == 4 and all(len(row) == 4 and all(math.isfinite(v) for v in row) for row in f[key])
    assert f["mse_matrix_original"][0][0] == pytest.approx(f["mse_matrix"][0][0] * f["scales"][0] ** 2)
    assert f["metrics"]["mse"]["final_avg_error"] == pytest.approx(np.mean(f["mse_matrix"][-1]))
    assert "experience 1" in f["scaler"] and len(f["initial_mse"]) == 4
    assert result.strategy_config["lookback"] == 52 and result.strategy_config["horizon"] == 4
    edge = result.edge["per_experience"]
    assert len(edge) == 4 and all(r["train_flops_exp"] > 0 for r in edge) and edge[-1]["trainable_params"] < 12_000
    (path,) = list(tmp_path.rglob("*.json"))
    board = leaderboard.build([load(path)])
    (row,) = board.rows
    assert row.cells["final_mse"].mean == pytest.approx(f["metrics"]["mse"]["final_avg_error"])
    assert row.cells["final_avg_acc"].mean is None and "Final MSE" in render.to_markdown(board)
    from clbench.reporting import plots

    written = plots.save_all([load(path)], tmp_path / "plots", board)
    names = {p.name for p in written}
    # errors, not accuracies: MSE curves, matrices, forgetting and old-vs-new, and the Pareto plots
    assert not any("_curves" in n and "_mse_" not in n for n in names)
    assert {"co2-4_mse_curves.png", "co2-4_pareto_train_flops_total.png"} <= names


@pytest.mark.parametrize("strategy, key, value", [("stella_mlp", "d_model", 0), ("stella_er", "replay_batch_size", 0)])
def test_bad_forecaster_settings_are_named(strategy, key, value):
    from clbench.engine.runner import strategy_config

    with pytest.raises(UsageError, match=f"{key}={value} is invalid"):
        strategy_config(strategy, {key: value})


def test_resumed_forecasting_run_ends_like_an_uninterrupted_one(tmp_path, resume_pair):
    whole, resumed = resume_pair(lambda out, resume: _spec(out, strategy="stella_er", resume=resume), tmp_path,
                                 stop_after=1)
    assert resumed.status == "completed"
    assert resumed.forecasting["mse_matrix"] == whole.forecasting["mse_matrix"]
    assert resumed.forecasting["initial_mse"] == whole.forecasting["initial_mse"]


def test_window_set_from_the_cli_must_match_the_scenario(tmp_path):
    with pytest.raises(UsageError, match="lookback=10 does not match scenario 'co2-4'; expected 52"):
        run(_spec(tmp_path, strategy_overrides={"lookback": 10}))


@pytest.mark.parametrize("strategy, scenario, expected", [
    ("naive", "co2-4", "expected a forecasting strategy"),
    ("stella_mlp", "synthetic-2", "expected a classification strategy"),
])
def test_mismatched_task_types_are_refused_with_exit_2(strategy, scenario, expected, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--strategy", strategy, "--scenario", scenario, "--accelerator", "cpu", "--quiet",
                 "--output-dir", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0] and repr(strategy) in lines[0]
    assert not out.exists() or not list(out.rglob("*.json"))


def test_terminal_summary_prints_the_mse_matrix_and_error_metrics():
    import io

    from clbench.reporting.report import print_result
    from clbench.reporting.results import RunResult
    from clbench.tasks.forecasting import summarise_errors

    R = [[0.5, 0.9], [0.6, 0.4]]
    r = RunResult(strategy="stella_mlp", scenario="co2-4", backbone="m", seed=0, status="completed",
                  forecasting={"mse_matrix": R, "metrics": {"mse": summarise_errors(R)}})
    buf = io.StringIO()
    print_result(r, file=buf)
    text = buf.getvalue()
    assert "MSE matrix" in text and "accuracy matrix" not in text
    assert " 0.6000  0.4000" in text and "final_avg_error        0.5000" in text and "forgetting             0.1000" in text
