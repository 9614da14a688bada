"""DER++: stored logits frozen at insertion, the full- and stored-width MSE, one forward per step, and
train-step FLOPs 1.5x ER's."""

from __future__ import annotations

import pytest
import torch
from clbench.edge.flops import measure_flops
from clbench.strategies._replay import pad_logits
from clbench.strategies.der_pp import stored_logit_mse

from clbench.errors import UsageError
from clbench.types import Batch


def build(name, scenario, build_strategy, **cfg):
    from clbench.models.backbones import build_backbone

    torch.manual_seed(0)
    return build_strategy(name, scenario, backbone=build_backbone("resnet18_cifar_nf8"), **cfg)


def step(strategy, batch):
    strategy.step_losses(batch)
    strategy.on_train_batch_end(None, batch, 0)


def test_stored_logit_mse_uses_only_the_stored_columns():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    replay = {"logits": torch.tensor([[0.0, 2.0, 9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]),
              "width": torch.tensor([2, 4])}
    # row 0: (1-0)^2 + 0 over 2 columns; row 1: 4 ones over 4 columns -> 5 / 6
    assert stored_logit_mse(logits, replay).item() == pytest.approx(5 / 6)


def test_pad_logits_appends_zero_columns_up_to_the_class_count():
    logits = torch.tensor([[1.5, -2.0], [0.25, 3.0]])
    assert pad_logits(logits, 5).tolist() == [[1.5, -2.0, 0.0, 0.0, 0.0], [0.25, 3.0, 0.0, 0.0, 0.0]]
    assert pad_logits(logits, 2).tolist() == logits.tolist()  # a head that has every class already


def test_stored_logits_never_change(scenario, build_strategy, batch_of):
    s = build("der_pp", scenario, build_strategy, buffer_size=20, replay_batch_size=8)
    s.on_experience_start(scenario.info(0))
    step(s, batch_of(scenario.train_sets[0], 20))
    first = {k: v.clone() for k, v in s.buffer.all().items()}
    s.on_experience_start(scenario.info(1))
    loader = iter(torch.utils.data.DataLoader(range(len(scenario.train_sets[1])), batch_size=8))
    for idx in loader:
        x, y = scenario.train_sets[1].x[idx], scenario.train_sets[1].y[idx]
        from clbench.types import Batch

        step(s, Batch(x, y))
        s.backbone.conv1.weight.data.add_(0.1)  # the network moves, stored logits must not
    now = s.buffer.all()
    kept = (now["x"] == first["x"]).flatten(1).all(dim=1)
    assert 0 < kept.sum() < len(kept)  # some old rows survived, some were replaced
    assert torch.equal(now["logits"][kept], first["logits"][kept])
    assert (first["width"] == 2).all() and (now["width"][~kept] == 4).all()


def test_der_pp_step_costs_one_and_a_half_er_steps(scenario, build_strategy, batch_of):
    flops = {}
    for name in ("er", "der_pp"):
        s = build(name, scenario, build_strategy, buffer_size=32, replay_batch_size=8)
        s.on_experience_start(scenario.info(0))
        step(s, batch_of(scenario.train_sets[0], 32))
        batch = batch_of(scenario.train_sets[0], 8)
        flops[name] = measure_flops(lambda: sum(s.step_losses(batch).values()).backward())
    assert flops["der_pp"] / flops["er"] == pytest.approx(1.5, abs=0.01)


@pytest.mark.parametrize("width, expected", [("full", (1 + 0 + 9 + 16) / 4), ("seen", (1 + 0) / 2)])
def test_logit_mse_by_hand_through_step_losses(strategy_factory, synthetic_scenario, batch_of, width, expected):
    """One stored sample from the first task (logits [0, 2], width 2); the head has grown to 4 classes
    and outputs [1, 2, 3, 4] for every input: full width matches the later classes against 0."""
    s = strategy_factory("der_pp", alpha=1.0, beta=0.0, buffer_size=1, replay_batch_size=1, logit_width=width)
    s.on_experience_start(synthetic_scenario.info(0))
    x = synthetic_scenario.train_sets[0].x[:1]
    s.buffer.add(x=x, y=torch.tensor([0]), logits=torch.tensor([[0.0, 2.0, 0.0, 0.0]]), width=torch.tensor([2]))
    s.on_experience_start(synthetic_scenario.info(1))
    with torch.no_grad():
        s.head.fc.weight.zero_()
        s.head.fc.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    losses = s.step_losses(batch_of(synthetic_scenario.train_sets[1], 4))
    assert losses["logit_mse"].item() == pytest.approx(expected)


def test_logit_width_defaults_to_full_and_is_checked(strategy_factory):
    assert strategy_factory("der_pp").cfg.logit_width == "full"
    with pytest.raises(UsageError, match="logit_width"):
        strategy_factory("der_pp", logit_width="all")


@pytest.mark.parametrize("joint, forwards", [(True, 1), (False, 3)])
def test_one_forward_per_training_step(scenario, build_strategy, batch_of, joint, forwards):
    s = build("der_pp", scenario, build_strategy, buffer_size=16, replay_batch_size=4, joint_forward=joint)
    s.on_experience_start(scenario.info(0))
    step(s, batch_of(scenario.train_sets[0], 16))
    calls = []
    hook = s.backbone.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    try:
        step(s, batch_of(scenario.train_sets[0], 8))
    finally:
        hook.remove()
    assert len(calls) == forwards and sum(calls) == 8 + 4 + 4
    assert s.step_view is None or s.step_view.current == 8  # add-ons see the current rows first


def test_joint_forward_gives_the_separate_passes_losses_without_batchnorm(build_strategy, synthetic_scenario, batch_of):
    """The tiny MLP has no BatchNorm: one combined forward and three separate ones agree term by term,
    and so do the stored logits of the current batch."""
    from clbench.models.backbones import build_backbone

    results = []
    for joint in (True, False):
        torch.manual_seed(0)
        backbone = build_backbone("clbench_mlp_tiny", in_chans=1, img_size=8)
        s = build_strategy("der_pp", synthetic_scenario, backbone=backbone, buffer_size=8, replay_batch_size=4,
                           joint_forward=joint)
        s.on_experience_start(synthetic_scenario.info(0))
        step(s, batch_of(synthetic_scenario.train_sets[0], 8))
        s.on_experience_start(synthetic_scenario.info(1))
        batch = batch_of(synthetic_scenario.train_sets[1], 8)
        losses = s.step_losses(batch)
        results.append(({k: v.item() for k, v in losses.items()}, s.step_logits.clone()))
    (joint_losses, joint_logits), (separate_losses, separate_logits) = results
    assert joint_losses.keys() == separate_losses.keys() == {"ce", "logit_mse", "replay_ce"}
    for k in joint_losses:
        assert joint_losses[k] == pytest.approx(separate_losses[k], rel=1e-5), k
    assert torch.allclose(joint_logits, separate_logits, atol=1e-6)


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("draws", [1, 2])
def test_replay_draws_one_feeds_both_replay_terms_from_the_same_rows(build_strategy, synthetic_scenario, batch_of,
                                                                      joint, draws):
    """replay_draws=1 (Avalanche's DER): the label term is the CE of the very rows the logit term replays;
    2 (the paper): a second, independent draw. Checked against the network's own logits computed here."""
    import torch.nn.functional as F
    from clbench.models.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("clbench_mlp_tiny", in_chans=1, img_size=8)
    s = build_strategy("der_pp", synthetic_scenario, backbone=backbone, buffer_size=8, replay_batch_size=4,
                       joint_forward=joint, replay_draws=draws, alpha=1.0, beta=1.0, logit_width="seen")
    s.on_experience_start(synthetic_scenario.info(0))
    step(s, batch_of(synthetic_scenario.train_sets[0], 8))
    stored = s.buffer.all()
    picks = iter([[0, 1, 2, 3], [4, 5, 6, 7]])
    calls = []

    def fixed_draw():
        calls.append(1)
        rows = torch.tensor(next(picks))
        return {k: v[rows] for k, v in stored.items()}

    s.draw = fixed_draw
    s.on_experience_start(synthetic_scenario.info(1))
    losses = s.step_losses(batch_of(synthetic_scenario.train_sets[1], 8))
    assert len(calls) == draws
    with torch.no_grad():
        logits = s(stored["x"]).logits  # no BatchNorm in the MLP: row by row the same as inside the step
    label_rows = slice(0, 4) if draws == 1 else slice(4, 8)
    expected_ce = F.cross_entropy(logits[label_rows], stored["y"][label_rows]).item()
    assert losses["replay_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    expected_mse = ((logits[:4, :2] - stored["logits"][:4, :2]) ** 2).mean().item()  # first-task rows: width 2
    assert losses["logit_mse"].item() == pytest.approx(expected_mse, rel=1e-5)


def test_replay_draws_is_checked(strategy_factory):
    assert strategy_factory("der_pp").cfg.replay_draws == 2
    with pytest.raises(UsageError, match=r"replay_draws=3 is invalid; expected 1 or 2"):
        strategy_factory("der_pp", replay_draws=3)
