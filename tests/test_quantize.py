"""The `quantize` add-on: quantizer arithmetic, calibrators, BN folding, the PTQ snapshot and its records."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from clbench.auxiliary.quantize import (
    Quantize,
    activation_range,
    affine_params,
    bops,
    channel_kurtosis,
    diverse_top,
    fake_quant_weight,
    fold_batchnorm,
    fold_conv_bn,
    kurtosis_assignment,
    model_size_bytes,
    quantize_affine,
    quantize_symmetric,
    salient_selection,
    weight_max_abs,
)
from clbench.errors import UsageError


# --------------------------------------------------------------------------- quantizers
def test_affine_grid_hand_values():
    x = torch.tensor([-1.0, 0.0, 0.4, 1.6, 2.0, 5.0])
    x_hat, q, s, z = quantize_affine(x, 2, -1.0, 2.0)  # s = 3 / 3 = 1, z = round(1 / 1) = 1
    assert s == pytest.approx(1.0) and z == 1
    assert q.tolist() == [0, 1, 1, 3, 3, 3]  # 5 clamps to the top level
    assert x_hat.tolist() == pytest.approx([-1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    s8, z8 = affine_params(-1.0, 2.0, 8)
    assert s8 == pytest.approx(3 / 255) and z8 == 85  # round(1 / (3/255)) = 85
    # a non-negative range is the unsigned grid: zero point 0, 0 exactly representable
    s_u, z_u = affine_params(0.0, 3.0, 2)
    assert (s_u, z_u) == (pytest.approx(1.0), 0)
    # a range that excludes 0 is widened to contain it
    assert affine_params(1.0, 3.0, 2) == affine_params(0.0, 3.0, 2)


def test_symmetric_restricted_grid_per_channel():
    w = torch.tensor([[-3.0, 1.4, 0.6], [0.5, -0.2, 0.1]])
    max_abs = w.abs().amax(dim=1, keepdim=True)
    x_hat, q, s = quantize_symmetric(w, 3, max_abs)  # 3 bits: levels -3..3
    assert s.flatten().tolist() == pytest.approx([1.0, 0.5 / 3])
    assert q.tolist() == [[-3, 1, 1], [3, -1, 1]]
    assert x_hat[1].tolist() == pytest.approx([0.5, -0.5 / 3, 0.5 / 3])
    # restricted range: never the level -4 of the full signed 3-bit grid, even for -10
    _, q_out, _ = quantize_symmetric(torch.tensor([-10.0, 10.0]), 3, torch.tensor(3.0))
    assert q_out.tolist() == [-3, 3]
    # per-channel: each output channel has its own scale
    conv_w = torch.randn(4, 2, 3, 3) * torch.tensor([1.0, 10.0, 0.1, 3.0]).reshape(4, 1, 1, 1)
    w_hat, n_scales = fake_quant_weight(conv_w, 8)
    assert n_scales == 4
    steps = conv_w.abs().amax(dim=(1, 2, 3)) / 127
    assert ((w_hat - conv_w).abs().amax(dim=(1, 2, 3)) <= steps / 2 + 1e-6).all()
    # per-group for Linear weights: one scale per group of inputs (10 inputs, groups of 4: 3 groups)
    lin_w = torch.randn(5, 10)
    g_hat, g_scales = fake_quant_weight(lin_w, 4, "minmax", group_size=4)
    assert g_scales == 15 and g_hat.shape == lin_w.shape


# --------------------------------------------------------------------------- calibrators
def test_calibrators_clip_an_outlier():
    torch.manual_seed(0)
    w = torch.randn(1, 1000)
    w[0, 0] = 40.0  # one outlier
    top = weight_max_abs(w, 4, "minmax")
    assert float(top) == 40.0
    assert float(weight_max_abs(w, 4, "percentile", 99.0)) < 40.0
    m = weight_max_abs(w, 4, "mse")
    assert float(m) / 40.0 < 1.0  # the mse search clips
    err = lambda max_abs: float(((quantize_symmetric(w, 4, max_abs)[0] - w) ** 2).sum())  # noqa: E731
    assert err(m) < err(top)
    w_mse, _ = fake_quant_weight(w, 4, "mse")
    w_minmax, _ = fake_quant_weight(w, 4, "minmax")
    assert ((w_mse - w) ** 2).sum() < ((w_minmax - w) ** 2).sum()

    # activations: per tensor, asymmetric; non-negative ones keep lo = 0
    a = torch.randn(20000)
    a[0] = 60.0
    lo, hi = float(a.min()), float(a.max())
    assert activation_range(lo, hi, a, 4, "minmax") == (lo, hi)
    p_lo, p_hi = activation_range(lo, hi, a, 4, "percentile", 99.99)
    assert lo < p_lo < 0 < p_hi < hi
    m_lo, m_hi = activation_range(lo, hi, a, 4, "mse")
    assert m_hi < hi
    err_a = lambda r: float(((quantize_affine(a, 4, *r)[0] - a) ** 2).sum())  # noqa: E731
    assert err_a((m_lo, m_hi)) < err_a((lo, hi))
    relu = a.clamp(min=0)
    assert activation_range(0.0, float(relu.max()), relu, 8, "percentile")[0] == 0.0


# --------------------------------------------------------------------------- BN folding
def test_bn_folding_is_exact_in_eval_mode():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Conv2d(5, 2, 1), nn.BatchNorm2d(2)).eval()
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    single = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)).eval()
    ref = single(x)
    fold_conv_bn(single[0], single[1])
    assert torch.allclose(single[0](x), ref, atol=1e-5)
    assert fold_batchnorm(model, lambda: model(x)) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(model(x), expected, atol=1e-5)


# --------------------------------------------------------------------------- the PTQ snapshot
def _trained_start(strategy, scenario, batch_of, aux):
    info = scenario.info(0)
    strategy.on_experience_start(info)
    aux.on_experience_start(strategy, info)
    batch = batch_of(scenario.train_sets[0], 64)
    aux.loss(batch, strategy(batch.x), strategy)
    return info, batch


def _snapshot_error(strategy, scenario, batch_of, **params) -> float:
    aux = Quantize(**params)
    _, batch = _trained_start(strategy, scenario, batch_of, aux)
    data, _ = aux._calibration_data(strategy, scenario.info(0))
    snapshot, _ = aux._quantized_snapshot(strategy, data)
    fp32 = strategy.predict_logits(batch.x)
    quantized = aux._predict(strategy, snapshot, batch.x)
    return float((quantized - fp32).abs().max() / fp32.abs().max())


def test_eight_bits_track_fp32_and_two_bits_do_not(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("naive")
    strategy.eval()
    err8 = _snapshot_error(strategy, synthetic_scenario, batch_of, weight_bits=8, act_bits=8, quantize_first_last=True)
    err2 = _snapshot_error(strategy, synthetic_scenario, batch_of, weight_bits=2, act_bits=2, quantize_first_last=True)
    assert err8 < 0.03
    assert err2 > 5 * err8


def test_ptq_hook_leaves_the_fp32_model_bit_identical(build_strategy, synthetic_scenario, batch_of):
    # a BatchNorm conv net with a replay buffer: folding, calibration and buffer reads must not write back
    from clbench.models.backbones import ConvNet
    from clbench.models.freeze import eval_mode

    torch.manual_seed(0)
    convnet = ConvNet(in_chans=1, width=8)  # clbench_convnet, narrower
    strategy = build_strategy("er", synthetic_scenario, convnet, buffer_size=16)
    aux = Quantize(preset="W4A8")
    info, batch = _trained_start(strategy, synthetic_scenario, batch_of, aux)
    strategy.buffer.add(x=batch.x[:16], y=batch.y[:16])
    strategy.train()
    before = {k: v.clone() for k, v in strategy.state_dict().items()}
    modes = [m.training for m in strategy.modules()]
    rng = torch.get_rng_state()
    buffer_rng = strategy.buffer.generator.get_state()

    def evaluate(predict):  # as the runner's: the strategy in eval mode, modes restored
        with eval_mode(strategy):
            logits = predict(batch.x)[:, :2]
        return [float((logits.argmax(1) == batch.y).float().mean()), 0.0]

    record = aux.after_evaluation(strategy, info, evaluate)
    after = strategy.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in strategy.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(strategy.buffer.generator.get_state(), buffer_rng)
    assert record["bn_folded"] == 3 and record["weight_bits"] == 4 and record["weight_calib"] == "mse"
    assert record["calib_sources"]["buffer"] == 16 and record["calib_samples"] == 64 + 16
    assert record["size_bytes"] < record["size_bytes_fp32"] and record["bops"] < record["bops_fp32"]


def test_size_and_bops_formulas_on_a_hand_model(strategy_factory, synthetic_scenario, batch_of):
    # (n_w, b_w, scales, zero points, zero-point bytes): ceil(n_w b_w / 8) + 4 scales + zp bytes
    assert model_size_bytes([(40, 4, 5, 1, 1)], unquantized_params=7) == 20 + 20 + 1 + 28
    assert model_size_bytes([(3, 3, 1, 0, 1)], 0) == math.ceil(9 / 8) + 4
    assert bops([(100, 4, 8)], total_macs=110) == 100 * 32 + 10 * 1024
    # the tiny MLP: Linear 64->32 (first layer) + head Linear 32->2, both kept at 8 bits;
    # per layer: weights at 1 byte, one scale per output channel + the input's scale and zero point
    strategy = strategy_factory("naive")
    aux = Quantize(preset="W4A4")
    _trained_start(strategy, synthetic_scenario, batch_of, aux)
    data, _ = aux._calibration_data(strategy, synthetic_scenario.info(0))
    _, info = aux._quantized_snapshot(strategy, data)
    body = 64 * 32 + 4 * (32 + 1) + 1
    head = 32 * 2 + 4 * (2 + 1) + 1
    assert info["size_bytes"] == body + head + 4 * (32 + 2)  # biases stay FP32
    assert info["size_bytes_fp32"] == 4 * (64 * 32 + 32 + 32 * 2 + 2)
    assert info["macs"] == 64 * 32 + 32 * 2
    assert info["bops"] == info["macs"] * 8 * 8


def test_size_and_bops_of_a_folded_conv_net_by_hand(build_strategy, synthetic_scenario, batch_of):
    # ConvNet(width=8) on 1x8x8 inputs: 3x3 convs 1->8 (stride 1, 8x8 out), 8->16 and 16->32 (stride 2:
    # 4x4 and 2x2 out), each with a BatchNorm that folds into it, then the head Linear 32->2
    from clbench.models.backbones import ConvNet

    torch.manual_seed(0)
    strategy = build_strategy("naive", synthetic_scenario, ConvNet(in_chans=1, width=8))
    aux = Quantize(preset="W4A4")
    _trained_start(strategy, synthetic_scenario, batch_of, aux)
    data, _ = aux._calibration_data(strategy, synthetic_scenario.info(0))
    snapshot, info = aux._quantized_snapshot(strategy, data)
    weights = [8 * 1 * 9, 16 * 8 * 9, 32 * 16 * 9, 2 * 32]  # 72, 1152, 4608, 64
    macs = [72 * 8 * 8, 1152 * 4 * 4, 4608 * 2 * 2, 64]
    assert info["quantized_layers"] == 4 and info["bn_folded"] == 3
    assert info["macs"] == sum(macs) == 41536  # folded BatchNorms, ReLUs and pooling count no MACs
    # first conv and head at 8 bits, the middle convs at 4; per layer one scale per output channel,
    # plus the input's scale and 1-byte zero point; the folded biases (8 + 16 + 32) and the head's stay FP32
    quantized = [72 + 4 * (8 + 1) + 1, 1152 // 2 + 4 * (16 + 1) + 1, 4608 // 2 + 4 * (32 + 1) + 1, 64 + 4 * (2 + 1) + 1]
    assert info["size_bytes"] == sum(quantized) + 4 * (8 + 16 + 32 + 2) == 3500
    # FP32: the parameters before folding (the BatchNorms' weight and bias; running statistics are buffers)
    assert info["size_bytes_fp32"] == 4 * (sum(weights) + 2 * (8 + 16 + 32) + 2)
    assert info["weight_bits_avg"] == pytest.approx((8 * (72 + 64) + 4 * (1152 + 4608)) / sum(weights))
    assert info["bops"] == macs[0] * 8 * 8 + (macs[1] + macs[2]) * 4 * 4 + macs[3] * 8 * 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in snapshot.modules())


def test_channel_smoothing_leaves_the_conv_layers_macs_alone(build_strategy, synthetic_scenario, batch_of):
    # the same ConvNet as above with the head Linear smoothed: its extra calibration pass must not
    # change the conv layers' one-sample input shapes, so the BOPs stay those counted by hand
    from clbench.models.backbones import ConvNet

    torch.manual_seed(0)
    strategy = build_strategy("naive", synthetic_scenario, ConvNet(in_chans=1, width=8))
    aux = Quantize(preset="W4A4", smooth="hadamard_channel")
    _trained_start(strategy, synthetic_scenario, batch_of, aux)
    data, _ = aux._calibration_data(strategy, synthetic_scenario.info(0))
    _, info = aux._quantized_snapshot(strategy, data)
    macs = [72 * 8 * 8, 1152 * 4 * 4, 4608 * 2 * 2, 64]
    assert info["smoothed_layers"] == 1 and info["macs"] == sum(macs)
    assert info["bops"] == macs[0] * 8 * 8 + (macs[1] + macs[2]) * 4 * 4 + macs[3] * 8 * 8 < info["bops_fp32"]


def test_loss_hook_adds_nothing_and_draws_no_global_random_numbers(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("naive")
    aux = Quantize(calib_samples=4)
    info = synthetic_scenario.info(0)
    strategy.on_experience_start(info)
    aux.on_experience_start(strategy, info)
    batch = batch_of(synthetic_scenario.train_sets[0], 16)  # a loader draws a seed: before the check
    out = strategy(batch.x)
    rng = torch.get_rng_state()
    for _ in range(3):
        assert aux.loss(batch, out, strategy) is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(n <= 2 for n in aux._filled.values())  # 4 samples over 2 classes


def test_calibration_reservoir_keeps_a_uniform_sample_of_each_class():
    from clbench.types import Batch

    aux = Quantize(calib_samples=4)
    aux._per_class = 2
    kept = torch.zeros(6)
    for seed in range(300):  # which of a class's six samples survive: each with probability 2/6
        aux._reservoir, aux._filled, aux._seen = {}, {}, {}
        aux._generator.manual_seed(seed)
        for start in (0, 3):  # two batches: values 0-2 then 3-5 of class 0, one class-1 sample each
            x = torch.tensor([[start + 0.0], [start + 1.0], [start + 2.0], [-1.0]])
            aux.loss(Batch(x, torch.tensor([0, 0, 0, 1])), None, None)
        assert aux._filled == {0: 2, 1: 2} and aux._seen == {0: 6, 1: 2}
        assert sorted(aux._reservoir[1].view(-1).tolist()) == [-1.0, -1.0]
        values = aux._reservoir[0].view(-1).long()
        assert len(set(values.tolist())) == 2  # two distinct samples, never one twice
        kept[values] += 1
    assert torch.all((kept / 300 - 1 / 3).abs() < 0.1), kept


# --------------------------------------------------------------------------- through the runner and the CLI
def test_run_stores_one_record_per_experience(tmp_path, fast_config_for):
    from clbench.engine.runner import RunSpec, run

    result = run(RunSpec(strategy="er", scenario="synthetic-2", run=fast_config_for(tmp_path),
                         aux=[("quantize", {"preset": "W8A8"})]))
    records = result.aux_results["quantize"]
    assert result.status == "completed" and len(records) == 2
    for i, (record, row) in enumerate(zip(records, result.accuracy_matrix)):
        assert record["experience"] == i and len(record["accuracy"]) == 2
        assert record["accuracy_fp32"] == row
        assert record["delta_acc"] == pytest.approx(record["avg_acc_fp32"] - record["avg_acc"])
    assert records[0]["accuracy"][1] == 0.0  # the second experience is unseen after the first
    assert records[0]["forgetting"] is None
    assert records[1]["forgetting"] == pytest.approx(max(0.0, records[0]["accuracy"][0] - records[1]["accuracy"][0]))
    assert result.aux[0]["name"] == "quantize"
    report = result.strategy_report["add_ons"]["quantize"]  # the add-on's report() reaches the run JSON
    assert report["mode"] == "ptq" and report["weight_bits"] == report["act_bits"] == 8


@pytest.mark.parametrize("spec, bad", [("quantize:weight_bits=0", "weight_bits=0"), ("quantize:preset=W3A9", "W3A9"),
                                       ("quantize:act_calib=median", "median")])
def test_cli_rejects_a_bad_value_in_one_line(tmp_path, capsys, spec, bad):
    from clbench.cli import main

    out = tmp_path / "out"
    code = main(["run", "--strategy", "naive", "--scenario", "synthetic-2", "--accelerator", "cpu", "--quiet",
                 "--aux", spec, "--output-dir", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and bad in err[0], err
    assert not out.exists() or not list(out.rglob("*.json"))


def test_options_are_checked():
    with pytest.raises(UsageError, match="contradicts"):
        Quantize(preset="W4A8", weight_bits=8)
    assert Quantize(bits=4).report()["weight_bits"] == 4 and Quantize(bits=4).weight_calib == "mse"
    report = Quantize().report()
    assert report.items() >= {"mode": "ptq", "weight_bits": 8, "act_bits": 8, "first_last_bits": [8, 8],
                              "weight_calib": "minmax", "act_calib": "percentile", "percentile": 99.99,
                              "group_size": 0, "calib_samples": 512, "fold_bn": True, "mixed": "none",
                              "calib_select": "balanced"}.items()
    # the whole resolved Config is reported (the run JSON's record of the settings), and nothing else
    assert report == {**dataclasses.asdict(Quantize().cfg), "first_last_bits": [8, 8]}


# --------------------------------------------------------------------------- kurtosis mixed precision
def test_channel_kurtosis_by_hand():
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    # row 2: mean 1/2, deviations (-1/2, -1/2, -1/2, 3/2): m2 = 3/4, m4 = 21/16, kappa = 21/16 / (9/16)
    assert channel_kurtosis(w).tolist() == pytest.approx([1.0, 7 / 3, 0.0])


def test_the_heaviest_tailed_channels_get_the_high_bits_within_the_budget():
    kurtosis = [torch.tensor([5.0, 1.0, 9.0]), torch.tensor([7.0, 2.0])]
    # 10 weights per channel in layer 0, 20 in layer 1: 70 weights, budget 0.4 -> 28
    high = kurtosis_assignment(kurtosis, [10, 20], 0.4)
    assert [m.tolist() for m in high] == [[False, False, True], [False, False]]  # 9 (10) fits, 7 (20 more) does not
    high = kurtosis_assignment(kurtosis, [10, 20], 0.5)  # 35: 9 then 7 fit (30)
    assert [m.tolist() for m in high] == [[False, False, True], [True, False]]


def test_mixed_precision_snapshot_reports_the_realised_bits(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("naive")
    aux = Quantize(preset="W4A8", mixed="kurtosis", high_fraction=0.5, quantize_first_last=True)
    _trained_start(strategy, synthetic_scenario, batch_of, aux)
    first = next(m for m in strategy.backbone.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():  # channels 0-15: one outlier each (heavy tails); the rest and the head: +-1
        first.weight.copy_(torch.tensor([1.0, -1.0]).repeat(32, 32))
        first.weight[:16] = 0.1
        first.weight[:16, 0] = 10.0
        head = strategy.head.fc.weight
        head.copy_(torch.tensor([1.0, -1.0]).repeat(2, 16))
    data, _ = aux._calibration_data(strategy, synthetic_scenario.info(0))
    snapshot, info = aux._quantized_snapshot(strategy, data)
    assert info["high_bit_channels"] == 16  # 16 x 64 = 1024 weights of the 2112 fit in half of them
    assert info["weight_bits_avg"] == pytest.approx((1024 * 8 + 1088 * 4) / 2112)
    # an outlier channel at 8 bits keeps its small weights (0.1 on a grid of 10/127), at 4 bits they vanish
    quantized = next(m for m in snapshot.modules() if isinstance(m, nn.Linear))
    assert quantized.weight[0, 1].item() == pytest.approx(10 / 127, rel=1e-5)


# --------------------------------------------------------------------------- salient calibration data
def test_diverse_top_takes_the_best_of_each_cluster():
    embeddings = torch.tensor([[0.0, 0.0], [0.0, 0.1], [10.0, 10.0], [10.0, 10.1]])
    scores = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert diverse_top(embeddings, scores, 2, seed=0) == [1, 2]
    assert diverse_top(embeddings, scores, 4, seed=0) == [0, 1, 2, 3]


def test_gradient_scores_are_each_samples_squared_gradient_norm(strategy_factory, synthetic_scenario):
    from clbench.auxiliary.quantize import gradient_scores

    strategy = strategy_factory("naive")
    strategy.on_experience_start(synthetic_scenario.info(0))
    data = synthetic_scenario.train_sets[0]
    scores = gradient_scores(strategy, data.x[:3], data.y[:3])
    assert all(p.grad is None for p in strategy.parameters())  # scoring leaves no gradients behind
    strategy.eval()
    torch.nn.functional.cross_entropy(strategy(data.x[1:2]).logits, data.y[1:2]).backward()
    by_hand = sum(float((p.grad.double() ** 2).sum()) for p in strategy.parameters() if p.grad is not None)
    assert scores[1].item() == pytest.approx(by_hand, rel=1e-9) and (scores > 0).all()


def test_salient_selection_drops_score_outliers_and_fills_every_class(strategy_factory, synthetic_scenario, monkeypatch):
    import clbench.auxiliary.quantize as Q

    strategy = strategy_factory("naive")
    strategy.on_experience_start(synthetic_scenario.info(0))
    data = synthetic_scenario.train_sets[0]
    pool = {c: [data.x[i] for i in range(len(data.y)) if int(data.y[i]) == c][:30] for c in (0, 1)}
    # hand-set scores: the candidates in pool order, the first of class 0 an outlier
    scores = torch.arange(60, dtype=torch.float64)
    scores[0] = 1e6
    monkeypatch.setattr(Q, "gradient_scores", lambda strategy, x, y: scores)
    chosen, dropped = salient_selection(strategy, pool, 10, seed=0)
    assert dropped == 1 and len(chosen) == 10
    assert not any(torch.equal(x, pool[0][0]) for x in chosen)
    labels = [next(c for c in pool if any(torch.equal(x, t) for t in pool[c])) for x in chosen]
    assert labels.count(0) == labels.count(1) == 5


# --------------------------------------------------------------------------- QAT
def test_qat_wraps_once_and_trains_through_fake_quant(strategy_factory, synthetic_scenario, batch_of):
    from clbench.auxiliary.quantize import QATLinear

    strategy = strategy_factory("naive")
    aux = Quantize(mode="qat", preset="W4A4", quantize_first_last=True)
    names = [(n, tuple(p.shape)) for n, p in strategy.named_parameters()]
    aux.setup(strategy)
    aux.setup(strategy)
    assert [(n, tuple(p.shape)) for n, p in strategy.named_parameters()] == names
    info = synthetic_scenario.info(0)
    strategy.on_experience_start(info)
    aux.on_experience_start(strategy, info)  # the grown head's new Linear is converted too
    assert isinstance(strategy.head.fc, QATLinear) and strategy.head.fc.q_w_bits == 4
    batch = batch_of(synthetic_scenario.train_sets[0], 16)
    strategy.train()
    loss = nn.functional.cross_entropy(strategy(batch.x).logits, batch.y)
    loss.backward()
    assert torch.isfinite(loss) and strategy.head.fc.weight.grad is not None
    strategy.eval()
    with torch.no_grad():
        quantized = strategy(batch.x).logits
        plain = nn.functional.linear(strategy.backbone(batch.x), strategy.head.fc.weight, strategy.head.fc.bias)
    assert not torch.allclose(quantized, plain)  # evaluation sees the 4-bit model
    aux.loss(batch, strategy(batch.x), strategy)  # keeps one input for the BOPs count
    before = {k: v.clone() for k, v in strategy.state_dict().items()}
    record = aux.after_evaluation(strategy, info, lambda predict: [0.0, 0.0])
    assert all(torch.equal(v, strategy.state_dict()[k]) for k, v in before.items())
    assert record["mode"] == "qat" and record["quantized_layers"] == 2
    assert record["macs"] == 64 * 32 + 32 * 2 and record["bops"] == record["macs"] * 4 * 4
    assert aux.report().items() >= {"mode": "qat", "weight_bits": 4, "act_bits": 4, "first_last_bits": [4, 4]}.items()


# --------------------------------------------------------------------------- FP32-to-quantized distillation
def test_scale_gradient_is_lsq_with_a_straight_through_round():
    from clbench.auxiliary.quantize import quantize_rows

    w = torch.tensor([[0.3, -1.0, 2.6]])
    theta = torch.zeros(1, 1, requires_grad=True)
    s0 = torch.tensor([[0.5]])
    w_hat = quantize_rows(w, s0 * theta.exp(), 3, ste=True)  # 3 bits: levels -3..3
    # w/s = 0.6, -2, 5.2 -> q = 1, -2, 3 (clipped)
    assert torch.equal(w_hat, torch.tensor([[0.5, -1.0, 1.5]]))
    w_hat.sum().backward()
    # d w_hat / d s = q - w/s inside the grid, +-qmax where clipped; d s / d theta = s
    expected = ((1 - 0.6) + (-2 - -2.0) + 3) * 0.5
    assert theta.grad.item() == pytest.approx(expected)


def test_tunable_scales_start_at_the_calibrated_snapshot(strategy_factory, synthetic_scenario, batch_of):
    from clbench.auxiliary.quantize import _ptq_layers

    strategy = strategy_factory("naive")
    strategy.eval()
    aux = Quantize(preset="W4A4", quantize_first_last=True)
    _, batch = _trained_start(strategy, synthetic_scenario, batch_of, aux)
    data, _ = aux._calibration_data(strategy, synthetic_scenario.info(0))
    snapshot, _ = aux._quantized_snapshot(strategy, data)
    baked = aux._predict(strategy, snapshot, batch.x)
    layers = _ptq_layers(snapshot)
    for w in layers:
        w.start_learning()
    assert torch.equal(aux._predict(strategy, snapshot, batch.x), baked)  # theta = 0: the same function
    for w in layers:
        w.finish_learning()
    assert torch.equal(aux._predict(strategy, snapshot, batch.x), baked)
    assert all(w.log_w_scale is None and not any(True for _ in w.parameters() if _.requires_grad) for w in layers)


def test_distilling_the_scales_moves_the_quantized_model_towards_fp32(build_strategy, synthetic_scenario, batch_of):
    from clbench.auxiliary.distill import logit_kd
    from clbench.models.backbones import ConvNet
    from clbench.models.freeze import eval_mode

    torch.manual_seed(0)
    strategy = build_strategy("er", synthetic_scenario, ConvNet(in_chans=1, width=8), buffer_size=16)
    plain, tuned = Quantize(preset="W2A4"), Quantize(preset="W2A4", distill_steps=30, distill_batch=16)
    info, batch = _trained_start(strategy, synthetic_scenario, batch_of, plain)
    optimizer = torch.optim.Adam(strategy.parameters(), lr=0.01)
    for _ in range(20):  # confident logits: an untrained net's are all alike, and so would be its quantized copy's
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(strategy(batch.x).logits[:, :2], batch.y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tuned.on_experience_start(strategy, info)
    tuned.loss(batch, strategy(batch.x), strategy)
    strategy.buffer.add(x=batch.x[:16], y=batch.y[:16])
    before = {k: v.clone() for k, v in strategy.state_dict().items()}
    rng = torch.get_rng_state()
    gaps = {}

    def evaluate_for(aux):
        def evaluate(predict):  # as the runner's; also measures the gap to FP32 on the calibration inputs
            with eval_mode(strategy):
                data, _ = aux._calibration_data(strategy, info)
                gaps.setdefault(aux, []).append(float(logit_kd(predict(data), strategy.predict_logits(data), 2.0)))
                logits = predict(batch.x)[:, :2]
            return [float((logits.argmax(1) == batch.y).float().mean()), 0.0]
        return evaluate

    record_plain = plain.after_evaluation(strategy, info, evaluate_for(plain))
    record = tuned.after_evaluation(strategy, info, evaluate_for(tuned))
    distill = record["distill"]
    assert distill["steps"] == 30 and distill["relation_term"] and distill["tuned_scales"] > 0
    assert distill["loss_last"] < distill["loss_first"]
    assert distill["accuracy_before"] == record_plain["accuracy"]  # tuning starts from the plain PTQ snapshot
    # gaps: [quantized, FP32 row] per call; the tuned call also scored the untuned snapshot first
    assert gaps[tuned][0] == pytest.approx(gaps[plain][0])
    assert gaps[tuned][1] < 0.5 * gaps[plain][0]
    # only the snapshot's scales moved: the FP32 model and the global random stream are untouched
    assert all(torch.equal(before[k], v) for k, v in strategy.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in strategy.parameters())
    assert record["size_bytes"] == record_plain["size_bytes"] and record["bops"] == record_plain["bops"]


def test_distillation_options_are_checked():
    with pytest.raises(UsageError, match="distill_steps=5 needs mode=ptq"):
        Quantize(mode="qat", distill_steps=5)
    with pytest.raises(UsageError, match="distill_steps=-1"):
        Quantize(distill_steps=-1)
    with pytest.raises(UsageError, match="distill_batch=1"):
        Quantize(distill_steps=2, distill_batch=1)
    assert Quantize(distill_steps=10).report()["distill_steps"] == 10


def test_a_distilled_run_trains_exactly_as_a_run_without_the_add_on(tmp_path, fast_config_for):
    from clbench.engine.runner import RunSpec, run

    plain = run(RunSpec(strategy="er", scenario="synthetic-2", run=fast_config_for(tmp_path / "plain")))
    result = run(RunSpec(strategy="er", scenario="synthetic-2", run=fast_config_for(tmp_path / "q"),
                         aux=[("quantize", {"preset": "W4A8", "distill_steps": 3})]))
    assert result.accuracy_matrix == plain.accuracy_matrix
    for record in result.aux_results["quantize"]:
        assert record["distill"]["steps"] == 3 and len(record["distill"]["accuracy_before"]) == 2
    assert result.strategy_report["add_ons"]["quantize"]["distill_steps"] == 3


# --------------------------------------------------------------------------- outlier smoothing
def test_hadamard_is_an_orthonormal_block_rotation():
    from clbench.auxiliary.quantize import hadamard

    h4 = hadamard(4) * 2  # Sylvester: [[1,1,1,1],[1,-1,1,-1],[1,1,-1,-1],[1,-1,-1,1]]
    assert torch.equal(h4, torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]))
    h = hadamard(192)  # 192 = 3 x 64: three 64 x 64 blocks of +-1/8
    assert torch.allclose(h @ h.T, torch.eye(192), atol=1e-6)
    assert torch.equal(h[:64, 64:], torch.zeros(64, 128)) and set(h[:64, :64].abs().unique().tolist()) == {0.125}
    assert torch.equal(hadamard(3), torch.eye(3))  # no power-of-two block: no rotation


def test_smoothing_factors_by_hand():
    from clbench.auxiliary.quantize import smoothing_factors

    weight = torch.tensor([[1.0, -4.0], [0.5, 2.0]])  # column maxima 1, 4
    s = smoothing_factors(torch.tensor([4.0, 1.0]), weight, alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5]))  # sqrt(4)/sqrt(1), sqrt(1)/sqrt(4)
    assert torch.equal(smoothing_factors(torch.tensor([0.0, 1.0]), weight, 0.5)[0], torch.tensor(1.0))


def _outlier_snapshot_error(strategy, scenario, batch_of, **params) -> tuple[float, dict]:
    """Max logit error against FP32, relative, on inputs whose first pixel is a large outlier."""
    from clbench.types import Batch

    aux = Quantize(quantize_first_last=True, **params)
    info = scenario.info(0)
    strategy.on_experience_start(info)
    aux.on_experience_start(strategy, info)
    raw = batch_of(scenario.train_sets[0], 64)
    x = raw.x.clone()
    x.view(len(x), -1)[:, 0] = 40.0
    aux.loss(Batch(x, raw.y), strategy(x), strategy)
    data, _ = aux._calibration_data(strategy, info)
    snapshot, record = aux._quantized_snapshot(strategy, data)
    fp32 = strategy.predict_logits(x)
    return float((aux._predict(strategy, snapshot, x) - fp32).abs().max() / fp32.abs().max()), record


def test_a_hadamard_rotation_spreads_an_input_outlier(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("naive")
    strategy.eval()
    plain, _ = _outlier_snapshot_error(strategy, synthetic_scenario, batch_of, weight_bits=8, act_bits=4)
    rotated, record = _outlier_snapshot_error(strategy, synthetic_scenario, batch_of, weight_bits=8, act_bits=4,
                                              smooth="hadamard")
    smoothed, _ = _outlier_snapshot_error(strategy, synthetic_scenario, batch_of, weight_bits=8, act_bits=4,
                                          smooth="hadamard_channel")
    assert rotated < 0.8 * plain and smoothed < 0.5 * plain  # measured: 0.68x and 0.33x
    # both Linear layers (64 -> 32, head 32 -> 2) rotate; a fast transform: n log2(n) additions per row
    assert record["smoothed_layers"] == 2 and record["smoothing_ops"] == 64 * 6 + 32 * 5
    # at 16 bits rotation and channel smoothing leave the function as it was
    exact, record = _outlier_snapshot_error(strategy, synthetic_scenario, batch_of, weight_bits=16, act_bits=16,
                                            act_calib="minmax", smooth="hadamard_channel")
    assert exact < 1e-3 and record["smoothing_ops"] == 64 * 6 + 32 * 5 + 64 + 32


def test_smoothing_options_are_checked():
    with pytest.raises(UsageError, match="smooth='rotate'"):
        Quantize(smooth="rotate")
    with pytest.raises(UsageError, match="needs mode=ptq"):
        Quantize(mode="qat", smooth="hadamard")
    with pytest.raises(UsageError, match="smooth_alpha=1"):
        Quantize(smooth="hadamard_channel", smooth_alpha=1)
    assert Quantize(smooth="hadamard_channel").report()["smooth_alpha"] == 0.5
