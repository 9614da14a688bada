"""Online EWC: the quadratic penalty, its zero points, the Fisher estimate (vectorised and looped) and its online accumulation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from clbench.strategies import ewc

from clbench.engine.runner import RunSpec, run
from clbench.types import Batch


def _params(strategy):
    return {n: p for n, p in strategy.named_parameters()}


def test_penalty_is_zero_during_the_first_task(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("ewc")
    strategy.on_experience_start(synthetic_scenario.info(0))
    assert strategy.penalty().item() == 0.0
    terms = strategy.step_losses(batch_of(synthetic_scenario.train_sets[0]))
    assert terms["ewc"].item() == 0.0


def test_penalty_is_zero_at_the_anchor_and_grows_away_from_it(tmp_path, fast_config_for):
    captured = {}
    run(RunSpec("ewc", "synthetic-2", run=fast_config_for(tmp_path), seed=0),
        on_experience=lambda i, r, s: captured.setdefault(i, (s.penalty().item(), {k: v.clone() for k, v in s.fisher.items()})))
    strategy_penalty_after_0, fisher_0 = captured[0]
    assert strategy_penalty_after_0 == 0.0  # anchored at the weights just consolidated
    assert fisher_0 and all((f >= 0).all() for f in fisher_0.values())
    assert any(f.sum() > 0 for f in fisher_0.values())


def test_penalty_equals_lambda_sum_f_delta_squared(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("ewc", ewc_lambda=7.0)
    strategy.on_experience_start(synthetic_scenario.info(0))
    params = _params(strategy)
    torch.manual_seed(1)
    strategy.fisher = {n: torch.rand_like(p) for n, p in params.items()}
    strategy.anchor = {n: p.detach().clone() for n, p in params.items()}
    deltas = {n: 0.1 * torch.randn_like(p) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.add_(deltas[n])
    expected = sum(float((strategy.fisher[n] * deltas[n] ** 2).sum()) for n in params)
    assert strategy.penalty().item() == pytest.approx(expected, rel=1e-5)
    terms = strategy.step_losses(batch_of(synthetic_scenario.train_sets[0]))
    assert terms["ewc"].item() == pytest.approx(7.0 * expected, rel=1e-5)

    # rows added to the head after the anchor have no anchor: they are not penalised
    strategy.on_experience_start(synthetic_scenario.info(1))
    assert strategy.head.out_features == 4
    before = strategy.penalty().item()
    with torch.no_grad():
        strategy.head.fc.weight[2:] += 5.0
    assert strategy.penalty().item() == pytest.approx(before, rel=1e-6)


def test_fisher_is_the_mean_of_p_times_squared_log_likelihood_gradients(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("ewc")
    strategy.on_experience_start(synthetic_scenario.info(0))
    batch = batch_of(synthetic_scenario.train_sets[0], 3)
    strategy.accumulate_fisher(batch)
    strategy.on_experience_end(synthetic_scenario.info(0), synthetic_scenario.train_sets[0])

    params = _params(strategy)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(3):
        log_p = F.log_softmax(strategy(batch.x[i : i + 1]).logits, dim=1)[0, batch.y[i]]
        grads = torch.autograd.grad(log_p, list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            expected[n] += log_p.exp().detach() * g**2 / 3
    assert strategy.fisher.keys() == expected.keys()
    for n in expected:
        assert torch.allclose(strategy.fisher[n], expected[n], atol=1e-7), n
    assert strategy.training  # the estimate runs in eval mode and restores the mode


def test_fisher_samples_caps_the_estimate(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("ewc", fisher_samples=2)
    strategy.on_experience_start(synthetic_scenario.info(0))
    strategy.accumulate_fisher(batch_of(synthetic_scenario.train_sets[0], 5))
    assert strategy._fisher_count == 2


def test_online_accumulation_f_gamma_f_plus_f_new(strategy_factory, synthetic_scenario):
    strategy = strategy_factory("ewc", gamma=0.5)
    info0, info1 = synthetic_scenario.info(0), synthetic_scenario.info(1)
    strategy.on_experience_start(info0)
    w = "head.fc.weight"
    old_shape = strategy.head.fc.weight.shape  # 2 x d
    f_first = torch.full(old_shape, 4.0)
    strategy._fisher_new, strategy._fisher_count = {w: f_first * 2}, 2  # sums over 2 samples
    strategy.on_experience_end(info0, synthetic_scenario.train_sets[0])
    assert torch.equal(strategy.fisher[w], f_first)
    assert torch.equal(strategy.anchor[w], strategy.head.fc.weight.detach())

    strategy.on_experience_start(info1)  # the head grows to 4 rows
    f_new = torch.full(strategy.head.fc.weight.shape, 1.0)
    strategy._fisher_new, strategy._fisher_count = {w: f_new * 4}, 4
    strategy.on_experience_end(info1, synthetic_scenario.train_sets[1])
    f = strategy.fisher[w]
    assert f.shape[0] == 4
    assert torch.equal(f[:2], 0.5 * f_first[:2] + 1.0)  # gamma * F_old + F_new on the old rows
    assert torch.equal(f[2:], torch.ones_like(f[2:]))  # only F_new on the rows added this experience
    assert strategy._fisher_new == {} and strategy._fisher_count == 0


def test_linear_and_vectorised_fisher_equal_the_per_sample_loop_through_a_run(tmp_path, fast_config_for, monkeypatch):
    """The whole wiring (fisher phase -> training_step -> accumulate_fisher -> on_experience_end),
    once on each path: the linear-layer product (this MLP's default), vmap (the linear path made
    unavailable) and the per-sample loop (vmap made unavailable too): the same consolidated Fisher
    after each experience."""
    def fishers(name, **patch):
        with monkeypatch.context() as m:
            for attr, value in patch.items():
                m.setattr(ewc, attr, value)
            captured = {}
            run(RunSpec("ewc", "synthetic-2", run=fast_config_for(tmp_path / name), seed=0),
                on_experience=lambda i, r, s: captured.setdefault(i, ({k: v.clone() for k, v in s.fisher.items()}, s.fisher_path)))
        return captured

    calls = []
    vectorised = ewc.vectorised_fisher_sum
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback on this network
        linear = fishers("linear")
        fast = fishers("vmap", linear_layers=lambda *a: None,
                       vectorised_fisher_sum=lambda *a: calls.append(1) or vectorised(*a))
    assert all(path == "linear" for _, path in linear.values())
    assert calls and all(path == "vmap" for _, path in fast.values())

    def unavailable(*args):
        raise RuntimeError("vmap cannot run here")

    with pytest.warns(RuntimeWarning, match="falling back"):
        slow = fishers("loop", linear_layers=lambda *a: None, vectorised_fisher_sum=unavailable)
    assert all(path == "loop" for _, path in slow.values())
    assert linear.keys() == fast.keys() == slow.keys() == {0, 1}
    for i in fast:
        assert linear[i][0].keys() == fast[i][0].keys() == slow[i][0].keys()
        for n in fast[i][0]:
            assert (fast[i][0][n] > 0).any(), n
            assert torch.allclose(fast[i][0][n], slow[i][0][n], rtol=1e-5, atol=1e-10), (i, n)
            assert torch.allclose(linear[i][0][n], slow[i][0][n], rtol=1e-5, atol=1e-10), (i, n)


def test_linear_fisher_equals_the_loop_in_float64_through_accumulate_fisher(strategy_factory, synthetic_scenario, batch_of):
    """The linear-layer path through the method's own hook, float64: the per-sample loop's sum to
    rounding, on an MLP whose ReLUs are in place (the output gradients are those of the Linear
    outputs, taken before the in-place op)."""
    made = []
    for linear in (True, False):
        torch.manual_seed(0)
        s = strategy_factory("ewc")
        s.on_experience_start(synthetic_scenario.info(0))
        s.double()
        if not linear:
            s.linear_fisher, s.vectorised_fisher = False, False  # the loop
        batch = batch_of(synthetic_scenario.train_sets[0], 7)
        s.accumulate_fisher(Batch(batch.x.double(), batch.y))
        made.append(s)
    fast, slow = made
    assert fast.fisher_path == "linear" and slow.fisher_path == "loop"
    assert fast._fisher_new.keys() == slow._fisher_new.keys() and fast._fisher_count == slow._fisher_count == 7
    for n in slow._fisher_new:
        assert torch.allclose(fast._fisher_new[n], slow._fisher_new[n], rtol=1e-12, atol=1e-300), n


def test_linear_fisher_handles_token_inputs_and_refuses_what_it_cannot_split():
    """Linear layers applied to (batch, tokens, features) inputs: per-sample gradients summed over
    tokens (float64, equal to the loop). A layer called twice, or a parameter outside a Linear,
    leaves the linear path (None)."""
    from types import SimpleNamespace

    class Tokens(torch.nn.Module):
        def __init__(self, twice=False):
            super().__init__()
            self.mix, self.out, self.twice = torch.nn.Linear(3, 5), torch.nn.Linear(5, 4), twice

        def forward(self, x):
            h = torch.tanh(self.mix(x.reshape(len(x), 2, 3)))
            if self.twice:
                h = torch.tanh(self.out.weight.T[None] @ self.out(h).transpose(1, 2)).transpose(1, 2)
            return SimpleNamespace(logits=self.out(h).mean(1))

    torch.manual_seed(0)
    model = Tokens().double()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    params = dict(model.named_parameters())
    fast, slow = ewc.linear_fisher_sum(model, params, x, y), ewc.looped_fisher_sum(model, params, x, y)
    for n in slow:
        assert torch.allclose(fast[n], slow[n], rtol=1e-12, atol=1e-300), n
    assert ewc.linear_fisher_agrees(model, params, x, y)
    twice = Tokens(twice=True).double()
    assert ewc.linear_fisher_sum(twice, dict(twice.named_parameters()), x, y) is None
    model.scale = torch.nn.Parameter(torch.ones(()))
    assert ewc.linear_layers(model, dict(model.named_parameters())) is None


def test_a_network_mixing_its_batch_fails_the_check_and_uses_vmap(strategy_factory, synthetic_scenario, batch_of):
    """Samples that interact in eval mode (a layer subtracting the batch mean) make the one-backward
    product differ from per-sample gradients: the first-batch check catches it and vmap runs."""
    s = strategy_factory("ewc")
    s.on_experience_start(synthetic_scenario.info(0))
    body = s.backbone

    class BatchCentred(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = self.inner(x)
            return h - h.mean(0, keepdim=True) if len(h) > 1 else h

    s.backbone = BatchCentred(body)
    s.accumulate_fisher(batch_of(synthetic_scenario.train_sets[0], 6))
    assert s.linear_fisher is False and s.fisher_path == "vmap"


def test_vectorised_fisher_equals_the_loop_with_batchnorm_in_eval_mode(scenario, build_strategy, batch_of):
    """A BatchNorm CNN: the estimate runs in eval mode (running statistics, untouched), where vmap runs.
    In float64 the two sums agree to rounding (float32 differs in the 5th digit: batched vs single convolutions)."""
    from clbench.models.backbones import build_backbone

    made = []
    for vectorised in (True, False):
        torch.manual_seed(0)
        s = build_strategy("ewc", scenario, backbone=build_backbone("resnet18_cifar_nf8"))
        s.vectorised_fisher = vectorised
        s.on_experience_start(scenario.info(0))
        s.double().train()
        stats = {k: v.clone() for k, v in s.state_dict().items() if "running" in k}
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            batch = batch_of(scenario.train_sets[0], 6)
            s.accumulate_fisher(Batch(batch.x.double(), batch.y))
        assert s.training and all(torch.equal(v, s.state_dict()[k]) for k, v in stats.items())
        s.on_experience_end(scenario.info(0), scenario.train_sets[0])
        made.append(s)
    fast, slow = made
    assert fast.vectorised_fisher and fast.fisher.keys() == slow.fisher.keys()
    assert sum(float(f.sum()) for f in fast.fisher.values()) > 0
    for n in fast.fisher:
        assert torch.allclose(fast.fisher[n], slow.fisher[n], rtol=1e-10, atol=1e-20), n
    assert all(torch.equal(fast.anchor[n], slow.anchor[n]) for n in fast.anchor)
