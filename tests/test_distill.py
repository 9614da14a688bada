"""Distillation add-ons: losses against hand-computed values, the
samples they distil, feature maps caught by hooks, multi-teacher weights, and runs end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from clbench import config as C
from clbench.edge.flops import haar_dwt2_flops, measure_flops

from clbench.auxiliary.distill import (
    FeatureKD,
    FrequencyKD,
    LayerTap,
    LogitKD,
    RelationKD,
    feature_mimicry,
    frequency_kd,
    logit_kd,
    relation_kd,
    similarity_matrix,
)
from clbench.auxiliary.multi_teacher import (
    MultiTeacher,
    WeightingAgent,
    standardised_rewards,
    teacher_state,
    teacher_weights,
)
from clbench.engine.runner import RunSpec, run
from clbench.models.wavelets import haar_dwt_conv
from clbench.types import ExperienceInfo, Output


# --------------------------------------------------------------------------- the losses, by hand
def test_logit_kd_equals_the_hand_computed_kl():
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    assert logit_kd(student, teacher, 1.0).item() == pytest.approx(kl, rel=1e-6)
    # tau = 2 softens the teacher to (sqrt3, 1) / (sqrt3 + 1) and multiplies by 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    assert logit_kd(student, teacher, 2.0).item() == pytest.approx(4 * kl2, rel=1e-6)


def test_feature_mimicry_normalises_embeddings():
    # (3, 4) -> (0.6, 0.8) against (1, 0): ((-0.4)^2 + 0.8^2) / 2 = 0.4
    assert feature_mimicry(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.4)
    assert feature_mimicry(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]), "none").item() == pytest.approx(10.0)


def test_similarity_matrix_and_relation_losses_by_hand():
    g = similarity_matrix(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert torch.allclose(g, torch.tensor([[1.0, 2**-0.5], [2**-0.5, 1.0]]))
    # G_s = I, G_t = all ones: two off-diagonal errors of 1, over B^2 = 4
    eye, same = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert relation_kd(eye, same, relation="mse").item() == pytest.approx(0.5)
    # KL rows with tau = 1: student rows softmax(1, 0), teacher rows softmax(1, 1) = (1/2, 1/2)
    q = math.e / (math.e + 1)
    row = 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))
    assert relation_kd(eye, same, temperature=1.0).item() == pytest.approx(row, rel=1e-6)
    # without the diagonal, two samples leave one entry per row: nothing to match
    assert relation_kd(eye, same, temperature=1.0, exclude_diagonal=True).item() == pytest.approx(0.0, abs=1e-7)
    e = torch.randn(9, 5)
    assert relation_kd(e, 3 * e).item() == pytest.approx(0.0, abs=1e-6)  # cosine geometry ignores scale


def test_frequency_kd_splits_low_and_detail_bands():
    zeros = torch.zeros(1, 1, 4, 4)
    flat = torch.ones(1, 1, 4, 4)  # LL = (1+1+1+1)/2 = 2 everywhere, no detail
    assert frequency_kd(zeros, flat).item() == pytest.approx(1.0 * 2**2)
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(2, 2).view(1, 1, 4, 4)  # D3 = 2, the rest 0
    assert frequency_kd(zeros, checker).item() == pytest.approx(0.5 * 4 / 3)  # mean over [D1|D2|D3]
    assert frequency_kd(zeros, checker, high_weight=0.0).item() == 0.0
    # levels=2: LL2 of the flat map is 4 (one value); the high term averages the two levels' details (0)
    assert frequency_kd(zeros, flat, levels=2).item() == pytest.approx(4.0**2)
    # the FFT form: a constant 4x4 map has only its DC magnitude 16, in the low band (4 of 12 bins)
    assert frequency_kd(zeros, flat, domain="fft").item() == pytest.approx(16.0**2 / 4)


def test_the_haar_convolution_is_counted_by_the_profiler():
    x = torch.rand(2, 3, 8, 8)
    assert measure_flops(lambda: haar_dwt_conv(x)) == 2 * haar_dwt2_flops(3, 8, 8)


# --------------------------------------------------------------------------- multi-teacher weights
def test_teacher_weights_by_hand():
    y = torch.tensor([1, 3])
    logits = [torch.zeros(2, 2), torch.zeros(2, 4)]  # CE ln 2 and ln 4 where the class is known
    equal = teacher_weights("equal", logits, [2, 4], y)
    assert torch.equal(equal, torch.full((2, 2), 0.5))
    conf = teacher_weights("confidence", logits, [2, 4], y)
    # sample 0: exp(-ln 2) : exp(-ln 4) = 2 : 1; sample 1 (class 3): only teacher 1 has seen it
    assert torch.allclose(conf, torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0]]))
    owner = teacher_weights("task_owner", logits, [2, 4], y, owner=torch.tensor([1, -1]))
    assert torch.equal(owner, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


def _info(index: int, per: int = 2, n: int = 3) -> ExperienceInfo:
    classes = tuple(range(index * per, (index + 1) * per))
    return ExperienceInfo(index, classes, tuple(range((index + 1) * per)), n, n * per)


@pytest.mark.parametrize("kept, owners", [(1, [0, 0, 0, 0, -1, -1]), (2, [1, 1, 0, 0, -1, -1])])
def test_task_owner_is_the_snapshot_after_the_samples_experience(tiny_backbone, kept, owners):
    from clbench.engine.runner import create_strategy, strategy_config

    strategy = create_strategy("naive", tiny_backbone, 6, strategy_config("naive", {}))
    mt = MultiTeacher(teachers=kept, policy="task_owner")
    mt.setup(strategy)
    for i in range(3):
        strategy.on_experience_start(_info(i))
        mt.on_experience_start(strategy, _info(i))
    assert [after for _, _, after in mt.snapshots] == [1, 0][:kept]
    assert [n for _, n, _ in mt.snapshots] == [4, 2][:kept]  # each teacher distils the classes it had seen
    # classes 0-1 (experience 0): its snapshot when kept, else the oldest kept; 4-5: current, no owner
    assert mt.owners(torch.arange(6)).tolist() == owners


# --------------------------------------------------------------------------- MTKD-RL's agent (policy "rl")
def test_rewards_are_the_standardised_negative_loss_clipped_to_0_1():
    # -loss = (-1, -2, -3): mean -2, std 1 -> (1, 0, -1) -> clipped (1, 0, 0)
    assert standardised_rewards(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1.0, 0.0, 0.0]
    # -loss = (0, -4): mean -2, std 2*sqrt(2) -> (0.707, -0.707)
    assert standardised_rewards(torch.tensor([0.0, 4.0])).tolist() == pytest.approx([2**-0.5, 0.0])
    assert standardised_rewards(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]  # no spread
    assert standardised_rewards(torch.tensor([2.0])).tolist() == [0.0]


def test_teacher_state_by_hand():
    # the teacher knew 2 of 4 classes; sample 0 is of class 1 (known), sample 1 of class 3 (never seen)
    features = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = Output(torch.tensor([[0.0, math.log(3.0), 9.0], [0.0, 0.0, 9.0]]), features)
    student = Output(torch.zeros(2, 4), torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    state = teacher_state(student, teacher, known=2, num_classes=4, y=torch.tensor([1, 3]), temperature=1.0)
    assert state.shape == (2, 3 + 2 + 4)
    assert state[:, 0].tolist() == pytest.approx([1.0, 0.0])  # cosine of the embeddings
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # p_t = (1/4, 3/4) against p_s = (1/2, 1/2)
    assert state[:, 1].tolist() == pytest.approx([kl, 0.0], abs=1e-6)
    assert state[:, 2].tolist() == pytest.approx([-math.log(0.75), math.log(2.0)])  # CE; unseen class: uniform guess
    assert state[:, 3:5].tolist() == features.tolist()
    assert torch.allclose(state[:, 5:], torch.tensor([[0.0, math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_agent_learns_only_from_rewarded_samples_and_leaves_no_gradients():
    torch.manual_seed(0)
    mt = MultiTeacher(policy="rl", teachers=1)
    mt.agent = WeightingAgent(1, 4)
    states = [torch.randn(3, 4)]
    before = [p.detach().clone() for p in mt.agent.parameters()]
    mt.pending = [(states, torch.zeros(3))]
    mt.register_buffer("agent_updates", torch.zeros((), dtype=torch.long))
    mt.update_agent()
    assert all(torch.equal(a, b) for a, b in zip(before, mt.agent.parameters()))  # reward 0: nothing learned
    w_before = mt.agent(states)[0]
    mt.pending = [(states, torch.ones(3))] * 5
    mt.update_agent()
    assert (mt.agent(states)[0] > w_before).all()  # rewarded choices are made more likely
    assert all(p.grad is None for p in mt.agent.parameters())  # the strategy's optimiser will not move it
    assert int(mt.agent_updates) == 6 and mt.pending == []


def test_rl_weights_are_all_one_in_an_experiences_first_epoch(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("naive")
    rl, equal = MultiTeacher(policy="rl", teachers=1), MultiTeacher(policy="equal", teachers=1)
    for a in (rl, equal):
        a.setup(strategy)
    for i in range(2):
        info = synthetic_scenario.info(i)
        strategy.on_experience_start(info)
        for a in (rl, equal):
            a.on_experience_start(strategy, info)
    torch.manual_seed(1)
    with torch.no_grad():  # a student that has moved away from its snapshot
        for p in strategy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = batch_of(synthetic_scenario.train_sets[1], 8)
    out = strategy(batch.x)
    rl_loss, equal_loss = rl.loss(batch, out, strategy).item(), equal.loss(batch, out, strategy).item()
    assert equal_loss > 0
    assert rl_loss == pytest.approx(equal_loss, rel=1e-6)  # one teacher: equal weighs it 1 too
    assert len(rl.pending) == 1 and rl.pending[0][0][0].shape == (8, 3 + strategy.backbone.num_features + 4)


def test_after_the_first_epoch_the_agents_weights_scale_each_term(strategy_factory, synthetic_scenario, batch_of,
                                                                 monkeypatch):
    from clbench.auxiliary.distill import kd_per_sample
    from clbench.models.freeze import teacher_outputs

    strategy = strategy_factory("naive")
    rl = MultiTeacher(policy="rl", teachers=1)
    rl.setup(strategy)
    for i in range(2):
        strategy.on_experience_start(synthetic_scenario.info(i))
        rl.on_experience_start(strategy, synthetic_scenario.info(i))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in strategy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = batch_of(synthetic_scenario.train_sets[1], 8)
    out = strategy(batch.x)
    rl.loss(batch, out, strategy)  # epoch 0: a step for the agent to learn from
    monkeypatch.setattr(type(strategy), "current_epoch", property(lambda self: 1))
    loss = rl.loss(batch, out, strategy)
    assert int(rl.agent_updates) == 1  # the first epoch's step was learned from when epoch 1 began
    t = teacher_outputs(rl.teachers[0], batch.x)
    state = teacher_state(out, t, 2, 4, batch.y, 4.0)
    w_kd, w_feat = rl.agent([state])
    kd = kd_per_sample(out.logits[:, :2], t.logits[:, :2], 4.0)
    feat = (out.features - t.features).pow(2).mean(dim=1)
    expected = (w_kd[:, 0] * kd + 5.0 * w_feat[:, 0] * feat).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.allclose(w_kd, torch.ones_like(w_kd))


# --------------------------------------------------------------------------- what is distilled
def test_every_term_is_zero_while_the_student_equals_its_teacher(strategy_factory, synthetic_scenario, batch_of):
    """At the start of an experience the snapshot is the student: nothing to distil yet."""
    add_ons = [LogitKD(), FeatureKD(), RelationKD(min_rows=2), MultiTeacher(policy="confidence")]
    strategy = strategy_factory("naive")
    for a in add_ons:
        a.setup(strategy)
    for i in range(2):
        info = synthetic_scenario.info(i)
        strategy.on_experience_start(info)
        for a in add_ons:
            a.on_experience_start(strategy, info)
    batch = batch_of(synthetic_scenario.train_sets[0], 8)
    for a in add_ons:
        term = a.loss(batch, strategy(batch.x), strategy)
        assert term is not None and term.item() == pytest.approx(0.0, abs=1e-6), a.name


class _Spy(LogitKD):
    name = "spy"

    def teacher_output(self, x):
        self.seen = x
        return super().teacher_output(x)


@pytest.mark.parametrize("samples, rows", [("current", "current"), ("replay", "replay"), ("all", "all")])
def test_er_shows_add_ons_its_replayed_samples(strategy_factory, synthetic_scenario, batch_of, samples, rows):
    strategy = strategy_factory("er", replay_batch_size=5)
    spy = _Spy(samples=samples)
    strategy.aux.append(spy)
    for i in range(2):
        info = synthetic_scenario.info(i)
        strategy.on_experience_start(info)
        spy.on_experience_start(strategy, info)
        if i == 0:
            first = batch_of(synthetic_scenario.train_sets[0], 8)
            strategy.buffer.add(x=first.x, y=first.y)
    batch = batch_of(synthetic_scenario.train_sets[1], 6)
    strategy.total_loss(batch, 0)
    view = strategy.step_view
    assert (view.current, view.replayed) == (6, 5)
    assert strategy.step_output.logits.shape[0] == 6  # add-ons' `out` is the current batch
    expected = {"current": view.x[:6], "replay": view.x[6:], "all": view.x}[rows]
    assert torch.equal(spy.seen, expected)


# --------------------------------------------------------------------------- feature maps
def test_layer_tap_catches_the_students_map_and_ignores_teachers_and_evaluation(build_strategy, synthetic_scenario):
    strategy = build_strategy("naive", synthetic_scenario, "clbench_convnet")
    tap = LayerTap(strategy.backbone, "body")
    x = torch.rand(4, 1, 8, 8)
    strategy(x)
    inp, out = tap.take(x)
    assert inp is x and torch.allclose(out, strategy.backbone.body(x))
    assert tap.take(x) is None  # taken once per step
    teacher = strategy.frozen_copy()
    teacher["backbone"](x)  # the copied hook sees a module that is not the student's
    strategy.eval()
    strategy(x)
    with torch.no_grad():
        strategy.train()
        strategy(x)
    assert tap.calls == []
    with torch.no_grad():  # the same path in the snapshot
        assert torch.equal(tap.output_of(teacher["backbone"], x), teacher["backbone"].body(x))


def test_freq_kd_defaults_to_the_last_convolutional_stage(build_strategy, synthetic_scenario):
    strategy = build_strategy("naive", synthetic_scenario, "clbench_convnet")
    fk = FrequencyKD()
    fk.setup(strategy)
    fk.setup(strategy)  # once more: the first hooks are removed, not doubled
    assert fk.report()["layer"] == "body" and fk.report() == {**C.to_dict(fk.cfg), "layer": "body"}
    assert len(strategy.backbone._forward_pre_hooks) == 1


def test_distillation_add_ons_run_end_to_end(tmp_path, fast_config_for):
    records = {}
    for aux in [("relation_kd", {}), ("multi_teacher", {"policy": "task_owner"}), ("freq_kd", {}),
                ("feature_kd", {"layer": "body", "normalize": "channel"})]:
        backbone = None if aux[0] in ("relation_kd", "multi_teacher") else "clbench_convnet"
        spec = RunSpec("er", "synthetic-5", run=fast_config_for(tmp_path / aux[0], backbone=backbone), seed=0, aux=[aux])
        result = run(spec)
        records[aux[0]] = result
        saved = json.loads(next((tmp_path / aux[0]).rglob("*.json")).read_text())
        assert saved["aux"] == [{"name": aux[0], **aux[1]}]
        assert len(result.accuracy_matrix) == 5
    # the report is the resolved Config, defaults included, plus what the add-on found out (the layer)
    assert records["freq_kd"].strategy_report["add_ons"]["freq_kd"] == {**C.to_dict(FrequencyKD.Config()), "layer": "body"}
    assert records["multi_teacher"].strategy_report["add_ons"]["multi_teacher"] == C.to_dict(
        MultiTeacher.Config(teachers=2, policy="task_owner"))
    assert records["feature_kd"].strategy_report["add_ons"]["feature_kd"]["weight"] == 5.0  # resolved from layer=


@pytest.mark.parametrize("aux", [("multi_teacher", {"policy": "task_owner", "teachers": 2}), ("logit_kd", {})])
def test_a_resumed_distillation_run_ends_like_an_uninterrupted_one(tmp_path, aux, resume_pair):
    """Teacher snapshots (and multi_teacher's bookkeeping) are saved with the checkpoint."""
    from clbench.config import RunConfig

    def spec(out, resume):
        cfg = RunConfig(epochs=1, progress=False, output_dir=str(out), limit_train_batches=3)
        return RunSpec("er", "synthetic-5", run=cfg, seed=3, aux=[aux], resume=resume)

    whole, resumed = resume_pair(spec, tmp_path)
    assert resumed.status == "completed" and resumed.accuracy_matrix == whole.accuracy_matrix


def test_an_rl_weighted_run_resumed_ends_like_an_uninterrupted_one(tmp_path, resume_pair):
    """Two epochs, so the agent weighs the second; its parameters and update count are checkpointed."""
    from clbench.config import RunConfig

    aux = ("multi_teacher", {"policy": "rl", "agent_steps": 2})

    def spec(out, resume):
        cfg = RunConfig(epochs=2, progress=False, output_dir=str(out), limit_train_batches=3)
        return RunSpec("er", "synthetic-5", run=cfg, seed=3, aux=[aux], resume=resume)

    whole, resumed = resume_pair(spec, tmp_path)
    assert resumed.status == "completed" and resumed.accuracy_matrix == whole.accuracy_matrix
    report = whole.strategy_report["add_ons"]["multi_teacher"]
    # 4 experiences with teachers x 2 epochs x 3 steps, each learned from once
    assert report == {**C.to_dict(MultiTeacher.Config(policy="rl", agent_steps=2)), "agent_updates": 24}
    assert report["teachers"] == 2 and report["policy"] == "rl"
    assert resumed.strategy_report["add_ons"]["multi_teacher"] == report


def test_distillation_is_refused_for_strategies_with_their_own_forward(tiny_backbone):
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.engine.sweep import compatible_strategies
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match="add-on 'logit_kd' distils snapshots of backbone and head, and strategy 'lord'"):
        create_strategy("lord", tiny_backbone, 4, strategy_config("lord", {}), aux=[LogitKD()])
    assert create_strategy("er", tiny_backbone, 4, strategy_config("er", {}), aux=[LogitKD()]).aux[0].name == "logit_kd"
    # a sweep plans around it: the pair is skipped with the reason, not run and failed
    kept, skipped = compatible_strategies(["er", "fdinet", "er_clfd", "lord"], "synthetic32-3", aux=["multi_teacher"])
    assert kept == ["er", "fdinet"] and set(skipped) == {"er_clfd", "lord"}
    assert "head(backbone(x))" in skipped["lord"]
