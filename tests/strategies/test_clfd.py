"""CLFD: faithfulness checks 1-6, the code-domain crop, the schedule and the `clfd` front."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pywt
import torch
from clbench.edge.flops import measure_flops
from clbench.strategies.clfd import (
    FrequencyEncoder,
    crop_and_flip,
    initial_keep_probs,
    new_class_keep_probs,
)

from clbench.engine.runner import RunSpec, create_scenario, run
from clbench.models.wavelets import haar_dwt, haar_dwt_conv, haar_idwt


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads make small convs 50x slower
    yield
    torch.set_num_threads(previous)


def build(name, scenario, build_strategy, **cfg):
    from clbench.models.backbones import build_backbone

    torch.manual_seed(0)
    return build_strategy(name, scenario, backbone=build_backbone("resnet18_cifar_nf8"), **cfg)


def fill(strategy, scenario, batch_of, n=64):
    """One step on the first n training samples, then their insertion (DER++ stores that step's logits)."""
    batch = batch_of(scenario.train_sets[0], n)
    with torch.no_grad():
        strategy.step_losses(batch)
    strategy.on_train_batch_end(None, batch, 0)


# ---------------------------------------------------------------- check 1: the encoder
@pytest.mark.parametrize("transform", [haar_dwt, haar_dwt_conv], ids=["sliced", "grouped_conv"])
def test_haar_matches_pywavelets_and_inverts(transform):
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    ll, details = transform(x)
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    assert torch.allclose(ll, (a + b + c + d) / 2)
    ca, (ch, cv, cd) = pywt.dwt2(x.numpy(), "haar", axes=(-2, -1))
    assert np.allclose(ll.numpy(), ca)
    d1, d2, d3 = details.chunk(3, dim=1)
    assert np.allclose(d1.numpy(), cv) and np.allclose(d2.numpy(), ch) and np.allclose(d3.numpy(), cd)
    assert torch.allclose((ll**2).sum() + (details**2).sum(), (x**2).sum())  # orthonormal: energy conserved
    assert (haar_idwt(ll, details) - x).abs().max() < 1e-5


def test_encoder_shape_and_parameter_count():
    enc = FrequencyEncoder(3)
    assert enc(torch.rand(5, 3, 32, 32)).shape == (5, 3, 16, 16)
    assert sum(p.numel() for p in enc.parameters()) == 24
    assert sum(p.numel() for p in FrequencyEncoder().parameters()) == 24  # RGB by default


# ---------------------------------------------------------------- check 2: FLOPs
def test_clfd_er_step_costs_a_quarter_of_er(scenario, build_strategy, batch_of):
    er = build("er", scenario, build_strategy, buffer_size=16, replay_batch_size=8)
    clfd = build("er_clfd", scenario, build_strategy, buffer_size=16, replay_batch_size=8)
    flops = {}
    for name, s in (("er", er), ("clfd", clfd)):
        s.on_experience_start(scenario.info(0))
        fill(s, scenario, batch_of)
        batch = batch_of(scenario.train_sets[0], 8)
        flops[name] = measure_flops(lambda: sum(s.step_losses(batch).values()).backward())
    assert flops["clfd"] / flops["er"] == pytest.approx(0.25, abs=0.01)


# ---------------------------------------------------------------- check 3: the code buffer
def test_code_buffer_holds_four_times_the_images_in_the_same_bytes(scenario, build_strategy, batch_of):
    s = build("er_clfd", scenario, build_strategy, buffer_size=10)
    s.on_experience_start(scenario.info(0))
    fill(s, scenario, batch_of, n=100)
    assert s.buffer.capacity == 40 and len(s.buffer) == 40
    image_bytes = 10 * 3 * 32 * 32 * 4
    assert s.buffer.fields["x"].shape[1:] == (3, 16, 16)
    assert s.buffer.fields["x"].numel() * s.buffer.fields["x"].element_size() == image_bytes


# ---------------------------------------------------------------- check 4 + schedule, on a real stream
@pytest.fixture(scope="module")
def stream(tmp_path_factory, scenario):
    from clbench.config import RunConfig

    snapshots = []

    def capture(i, result, strategy):
        snapshots.append({
            "encoder": {k: v.clone() for k, v in strategy.encoder.state_dict().items()},
            "codes": strategy.buffer.all()["x"].clone(),
            "num_seen": strategy.buffer.num_seen,
            "keep_probs": strategy.keep_probs.clone(),
            "strategy": strategy,
        })

    cfg = RunConfig(epochs=3, batch_size=16, accelerator="cpu", limit_train_batches=3, progress=False,
                    output_dir=str(tmp_path_factory.mktemp("clfd")), backbone="resnet18_cifar_nf8")
    result = run(RunSpec("er_clfd", "synthetic32-3", run=cfg, strategy_overrides={"buffer_size": 10}), on_experience=capture)
    assert result.status == "completed", result.error
    return snapshots


def test_encoder_frozen_after_task_zero_and_task_zero_codes_stay_valid(stream, scenario):
    first, last = stream[0], stream[-1]
    for k in first["encoder"]:
        assert torch.equal(first["encoder"][k], last["encoder"][k])
    # every code stored in task 0 is the frozen encoder's code of a task-0 training image
    enc = FrequencyEncoder(3)
    enc.load_state_dict(last["encoder"])
    with torch.no_grad():
        codes = enc(scenario.train_sets[0].x).flatten(1)
    stored = first["codes"].flatten(1)
    distance = torch.cdist(stored, codes, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert len(stored) > 0 and distance.max() < 1e-4


def test_reservoir_counter_covers_all_of_task_zero(stream):
    assert stream[0]["num_seen"] == 3 * 3 * 16  # 3 epochs x 3 batches x 16, not just the refill epoch


def test_keep_probs_follow_activation_counts_after_warmup(stream):
    s = stream[-1]["strategy"]
    seen = torch.arange(6)
    a = s.activation_counts[seen]
    expected = 1 - torch.exp(-2 * a / a.max(dim=1, keepdim=True).values.clamp_min(1))
    assert torch.allclose(stream[-1]["keep_probs"][seen], expected)


# ---------------------------------------------------------------- check 5: feature selection
def test_kwta_at_test_time_and_zero_keep_probability_blocks_a_unit(scenario, build_strategy, batch_of):
    s = build("er_clfd", scenario, build_strategy, buffer_size=10)
    s.on_experience_start(scenario.info(0))
    x = batch_of(scenario.test_sets[0], 16).x
    s.eval()
    with torch.no_grad():
        h = s(x).features
    assert ((h != 0).sum(dim=1) <= math.floor(0.6 * 64)).all()
    s.train()
    batch = batch_of(scenario.train_sets[0], 16)
    s.keep_probs[:, :] = 1.0
    s.keep_probs[batch.y[0], 5] = 0.0
    before = s.activation_counts.clone()
    out = s.current_output(batch)
    assert (out.features[batch.y == batch.y[0], 5] == 0).all()
    assert s.activation_counts[batch.y[0], 5] == before[batch.y[0], 5]
    assert (s.activation_counts - before).sum() == (out.features != 0).sum()


# ---------------------------------------------------------------- check 6: new-class probabilities
def test_new_class_keep_probs_match_the_formula_by_hand():
    a = torch.tensor([[4.0, 0.0, 2.0], [1.0, 3.0, 3.0]], dtype=torch.float64)
    s = torch.tensor([0.5, -0.2], dtype=torch.float64)
    p = new_class_keep_probs(a, s)
    sbar = ((0.5 + 1) + (-0.2 + 1)) / 2
    lo, hi = a[1], a[0]  # least similar: class 1 (s=-0.2), most similar: class 0
    expected = []
    for j in range(3):
        p_minus = math.exp(-float(lo[j]) * (sbar / 0.8) / 3.0)
        p_plus = 1 - math.exp(-float(hi[j]) * (1.5 / sbar) / 4.0)
        expected.append((p_minus + p_plus) / 2)
    assert torch.allclose(p, torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_initial_mask_is_a_prefix_of_floor_d_times_0_66():
    assert int(initial_keep_probs(512, 0.6, 1.1).sum()) == 337
    p = initial_keep_probs(64, 0.6, 1.1)
    assert int(p.sum()) == 42 and p[:42].eq(1).all()


# ---------------------------------------------------------------- code-domain augmentation
def test_crop_pads_with_the_code_of_a_black_image(scenario, build_strategy):
    s = build("er_clfd", scenario, build_strategy, buffer_size=10, pad_pixel=(-1.0, -2.0, 0.5))
    z = torch.rand(64, 3, 16, 16) + 10  # far from any fill value
    fill_code = s.black_code(z)
    assert not torch.allclose(fill_code, torch.zeros(3))
    out = crop_and_flip(z, fill_code, 2)
    assert out.shape == z.shape
    border = out != out.clamp_min(9)  # values that came from the padding
    assert border.any()
    channel_fill = fill_code.view(1, 3, 1, 1).expand_as(out)
    assert torch.equal(out[border], channel_fill[border])


# ---------------------------------------------------------------- the front and the combos
@pytest.mark.parametrize("base", ["er", "der_pp", "er_ace", "cls_er"])
def test_clfd_front_builds_the_base_combination(base, scenario, build_strategy, batch_of):
    s = build("clfd", scenario, build_strategy, base=base, buffer_size=10, replay_batch_size=8)
    assert type(s).registry_name == ("clfd" if base == "er" else f"{base}_clfd")
    s.on_experience_start(scenario.info(0))
    fill(s, scenario, batch_of, n=16)
    s.on_experience_start(scenario.info(1))
    terms = s.step_losses(batch_of(scenario.train_sets[1], 8))
    assert len(terms) >= 2 and all(torch.isfinite(v) for v in terms.values())
    assert s.buffer.fields["x"].shape[1:] == (3, 16, 16)


def test_clfd_rejects_unknown_base_and_one_channel_backbones(scenario, build_strategy):
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match="base="):
        build("clfd", scenario, build_strategy, base="lwf")
    digits = create_scenario("digits-5")
    with pytest.raises(UsageError, match="3 input channels"):
        build_strategy("er_clfd", digits)


# ---------------------------------------------------------------- new-class probabilities through the hooks, when they apply
class _KeepProbs:
    """Lightning callback: keep_probs and similarity at the first batch of every epoch (after the
    module's epoch-start hook) and at every epoch start (before it: what the previous epoch's end left)."""

    def __init__(self):
        import pytorch_lightning as pl

        self.at = {}
        outer = self

        class Callback(pl.Callback):
            def on_train_epoch_start(self, trainer, s):
                outer.at[(s.experience.index, trainer.current_epoch, "start")] = (s.keep_probs.clone(), s.similarity.clone())

            def on_train_batch_start(self, trainer, s, batch, batch_idx):
                if batch_idx == 0:
                    outer.at[(s.experience.index, trainer.current_epoch, "batch")] = (s.keep_probs.clone(), s.similarity.clone())

        self.callback = Callback()


def _constant_colour_scenario():
    """2 tasks x 2 classes of 32x32 images of one colour per class: the low-frequency band of a
    constant image of colour v is 2v on every position of its channel, so the cosine between two
    classes' summed bands is the cosine of their colours, whatever the number of images."""
    from clbench.scenarios.base import class_incremental_from_tensors

    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])

    def draw(n):
        y = torch.arange(4).repeat_interleave(n)
        return colours[y].view(-1, 3, 1, 1).expand(-1, 3, 32, 32).contiguous(), y

    return class_incremental_from_tensors("colours", draw(16), draw(4), increments=[2, 2], class_order=[0, 1, 2, 3],
                                          default_backbone="resnet18_cifar_nf8")


def test_new_class_probs_are_set_from_similarity_at_the_end_of_epoch_one(build_strategy):
    """Through the hooks in the runner's order (3 epochs per task, warm-up ends after epoch 1.2):
    task 0 uses the prefix mask; in task 1 the new classes start at 0.6, and the end of epoch 1 sets
    P[i] = (p- + p+)/2 from their similarity to the old classes; epoch 2's end then applies the
    post-warm-up rule. The old classes' activation counts are set by hand after task 0."""
    from clbench.config import RunConfig
    from clbench.datasets import make_loader
    from clbench.engine.runner import make_trainer
    from clbench.models.backbones import build_backbone
    from clbench.types import Phase

    colours = _constant_colour_scenario()
    torch.manual_seed(0)
    s = build_strategy("er_clfd", colours, backbone=build_backbone("resnet18_cifar_nf8"), buffer_size=4, replay_batch_size=8)
    run_cfg = RunConfig(epochs=3, batch_size=16, accelerator="cpu", limit_train_batches=1, progress=False)
    seen = _KeepProbs()
    hand_counts = torch.zeros(2, 64)
    hand_counts[0, :32] = 2.0  # old class 0 relies on units 0-31 (max 2)
    hand_counts[1] = 1.0  # old class 1 on every unit equally
    for i in range(2):
        info = colours.info(i)
        s.on_experience_start(info)
        data = s.training_data(info, colours.train_sets[i])
        for p_index, phase in enumerate(s.phases(info)):
            s.phase = phase
            loader = make_loader(s.phase_data(phase, data), run_cfg.batch_size, shuffle=True, seed=10 * i + p_index)
            make_trainer(run_cfg, phase.epochs or run_cfg.epochs, [seen.callback], info, phase).fit(s, train_dataloaders=loader)
        s.phase = Phase()
        s.on_experience_end(info, colours.train_sets[i])
        if i == 0:
            s.activation_counts[:2] = hand_counts
    prefix = torch.zeros(64)
    prefix[:42] = 1.0  # floor(64 * 1.1 * 0.6)
    for epoch in (0, 1):  # task 0 before warm-up ends: the prefix mask
        assert torch.equal(seen.at[(0, epoch, "batch")][0][:2], prefix.expand(2, -1))
    assert torch.equal(seen.at[(1, 0, "batch")][0][2:4], torch.full((2, 64), 0.6))  # task 1, epoch 1: 0.6
    assert torch.equal(seen.at[(1, 0, "batch")][0][:2], seen.at[(1, 0, "start")][0][:2])  # old classes untouched

    keep, similarity = seen.at[(1, 1, "start")]  # what the end of epoch 1 left, before the warm-up rule
    a, b = 1 / math.sqrt(5), 2 / math.sqrt(5)  # cos((1,2,0), (1,0,0)), cos((1,2,0), (0,1,0))
    assert torch.allclose(similarity[2:4, :2], torch.tensor([[1.0, 0.0], [a, b]]), atol=1e-6)
    # class 2 (the colour of class 0): S = (1, 0), sbar = 1.5; least similar old class 1, most similar class 0
    p_minus = math.exp(-1.0 * (1.5 / 1.0) / 1.0)
    p_plus = torch.tensor([1 - math.exp(-2.0 * (2.0 / 1.5) / 2.0)] * 32 + [0.0] * 32)
    assert torch.allclose(keep[2], (p_minus + p_plus) / 2, atol=1e-6)
    # class 3: S = (a, b), sbar = 1 + (a + b)/2; least similar old class 0, most similar class 1
    sbar = 1 + (a + b) / 2
    p_minus = torch.tensor([math.exp(-2.0 * (sbar / (1 + a)) / 2.0)] * 32 + [1.0] * 32)
    p_plus = 1 - math.exp(-1.0 * ((1 + b) / sbar) / 1.0)
    assert torch.allclose(keep[3], (p_minus + p_plus) / 2, atol=1e-6)
    assert torch.equal(seen.at[(1, 1, "batch")][0][2:4], keep[2:4])  # epoch 2 starts with them (no reset)
    # the end of epoch 2 (> 0.4 x 3) replaced them by the activation rule
    assert not torch.allclose(s.keep_probs[2:4], keep[2:4])
    # the low bands were summed over task 0's last epoch and task 1's first only (one batch of 16 each):
    # a constant image of colour v adds 2 v_c on the 256 positions of channel c, 512 sum(v) in all
    colour_sums = torch.tensor([1.0, 1.0, 1.0, 3.0])
    images = s.low_band_sums[:4].sum(1) / (512 * colour_sums)
    assert images[:2].sum().item() == pytest.approx(16) and images[2:].sum().item() == pytest.approx(16)


def test_the_variants_tables_carry_the_published_accuracies_and_the_black_pixel():
    """`published` and `paper_settings` as the CLFD variants build their tables, checked against
    values written out here (the scenarios' normalisation constants give the black pixel)."""
    from clbench.scenarios.cifar import CIFAR10
    from clbench.scenarios.tinyimagenet import MAMMOTH
    from clbench.strategies.clfd import paper_settings, published

    assert published("CLFD-X", 0.5, 0.25) == {
        "cifar10-5": {"metric": "final_avg_acc", "value": 0.5,
                      "source": "CLFD paper (NeurIPS 2024), Table 1, CLFD-X, S-CIFAR-10 Class-IL, buffer 125"},
        "tinyimagenet-10": {"metric": "final_avg_acc", "value": 0.25,
                            "source": "CLFD paper (NeurIPS 2024), Table 1, CLFD-X, S-Tiny-ImageNet Class-IL, buffer 125"},
    }
    black = lambda mean, std: tuple(round(-m / s, 6) for m, s in zip(mean, std))  # noqa: E731
    assert paper_settings({"cifar10-5": {"lr": 0.1}, "tinyimagenet-10": {"lr": 0.03, "pad_pixel": ()}}) == {
        "cifar10-5": {"lr": 0.1, "pad_pixel": black(CIFAR10.mean, CIFAR10.std)},
        "tinyimagenet-10": {"lr": 0.03, "pad_pixel": black(MAMMOTH.mean, MAMMOTH.std)},
    }
    assert black(CIFAR10.mean, CIFAR10.std)[0] < -1.5  # a black pixel lies well below the normalised mean


def test_low_band_sums_are_accumulated_by_the_batch_hook_and_survive_a_resume(scenario, build_strategy, batch_of):
    """Through the batch-end hook: per class, the sum of its images' Haar LL bands (the 2x2 block
    sums / 2 of the orthonormal transform, written here with average pooling); saved and restored."""
    from clbench.types import Phase

    s = build("er_clfd", scenario, build_strategy, buffer_size=10)
    fresh_state = s.extra_state()
    assert "low_band_sums" not in fresh_state
    s.on_experience_start(scenario.info(0))
    s.phase = Phase("train")
    s.accumulate_low_band = True
    batches = [batch_of(scenario.train_sets[0], 8), batch_of(scenario.train_sets[0], 5)]
    for i, batch in enumerate(batches):
        s.on_train_batch_end(None, batch, i)
    expected = torch.zeros(scenario.num_classes, 3 * 16 * 16)
    for batch in batches:
        ll = torch.nn.functional.avg_pool2d(batch.x, 2) * 2
        for x, y in zip(ll, batch.y.tolist()):
            expected[y] += x.flatten()
    assert torch.allclose(s.low_band_sums, expected, atol=1e-5)
    state = s.extra_state()
    assert torch.equal(state["low_band_sums"], s.low_band_sums) and state["low_band_sums"] is not s.low_band_sums
    other = build("er_clfd", scenario, build_strategy, buffer_size=10)
    other.load_extra_state(state)
    state["low_band_sums"] += 1  # a copy, not the saved tensor
    assert torch.allclose(other.low_band_sums, expected, atol=1e-5)
    other.load_extra_state(fresh_state)  # a checkpoint from before any accumulation
    assert other.low_band_sums is None
    # the codes buffer holds 4 codes per nominal image
    assert s.report()["buffer_codes_capacity"] == 40 and s.report()["nominal_buffer_images"] == 10


def test_task_zero_prefix_mask_is_set_in_a_double_precision_run(scenario, build_strategy):
    """The first epoch's prefix mask is written in the strategy's own dtype: a 64-bit run works."""
    from clbench.config import RunConfig
    from clbench.datasets import make_loader
    from clbench.engine.runner import make_trainer

    s = build("er_clfd", scenario, build_strategy, buffer_size=4, replay_batch_size=4)
    info = scenario.info(0)
    s.on_experience_start(info)
    s.phase = s.phases(info)[0]
    run_cfg = RunConfig(epochs=1, batch_size=8, accelerator="cpu", limit_train_batches=1, progress=False, precision="64-true")
    loader = make_loader(s.phase_data(s.phase, s.training_data(info, scenario.train_sets[0])), 8, shuffle=False)
    make_trainer(run_cfg, 1, [], info, s.phase).fit(s, train_dataloaders=loader)
    d = s.keep_probs.shape[1]
    assert s.keep_probs.dtype == torch.float64
    # one epoch of one: the warm-up ends with it, so the activation rule replaced the prefix mask of
    # the current classes; the classes not seen yet keep 1
    a = s.activation_counts[:2]
    assert a.sum() > 0 and torch.allclose(s.keep_probs[:2], 1 - torch.exp(-2 * a / a.max(dim=1, keepdim=True).values.clamp_min(1)))
    assert torch.equal(s.keep_probs[2:], torch.ones(len(s.keep_probs) - 2, d, dtype=torch.float64))
    # the last epoch of task 0 summed the images' low bands (in float32)
    batch = next(iter(loader))
    expected = torch.zeros(len(s.keep_probs), 3 * 16 * 16)
    expected.index_add_(0, batch.y, (torch.nn.functional.avg_pool2d(batch.x.double(), 2) * 2).flatten(1).float())
    assert s.low_band_sums.dtype == torch.float32 and torch.allclose(s.low_band_sums, expected, atol=1e-5)


def test_the_activation_rule_starts_strictly_after_the_warm_up_epochs(scenario, build_strategy):
    """warmup_ratio 0.5 of 2 epochs: the end of epoch 1 (= 0.5 x 2, not past it) keeps the prefix
    mask, the end of epoch 2 applies P = 1 - exp(-2 A / max A)."""
    from clbench.config import RunConfig
    from clbench.datasets import make_loader
    from clbench.engine.runner import make_trainer

    s = build("er_clfd", scenario, build_strategy, buffer_size=4, replay_batch_size=4, warmup_ratio=0.5)
    info = scenario.info(0)
    s.on_experience_start(info)
    s.phase = s.phases(info)[0]
    seen = _KeepProbs()
    run_cfg = RunConfig(epochs=2, batch_size=8, accelerator="cpu", limit_train_batches=1, progress=False)
    loader = make_loader(s.phase_data(s.phase, s.training_data(info, scenario.train_sets[0])), 8, shuffle=False)
    make_trainer(run_cfg, 2, [seen.callback], info, s.phase).fit(s, train_dataloaders=loader)
    d = s.keep_probs.shape[1]
    prefix = (torch.arange(d) < math.floor(d * 1.1 * 0.6)).float()
    assert torch.equal(seen.at[(0, 1, "start")][0][:2], prefix.expand(2, -1))  # what epoch 1's end left
    a = s.activation_counts[:2]
    assert torch.allclose(s.keep_probs[:2], 1 - torch.exp(-2 * a / a.max(dim=1, keepdim=True).values.clamp_min(1)))
    assert not torch.equal(s.keep_probs[:2], prefix.expand(2, -1))
    assert torch.equal(s.keep_probs[2:], torch.ones(len(s.keep_probs) - 2, d))  # only the seen classes' rows follow it


def test_add_ons_see_each_task_end_and_the_reservoir_counts_all_of_task_zero(scenario, batch_of, task_end_recorder):
    """The task-end hook hands the experience to the run's add-ons, and after task 0 the reservoir
    counts every sample of the task (not only those since the refill)."""
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone
    from clbench.types import Phase

    recorder = task_end_recorder
    torch.manual_seed(0)
    s = create_strategy("er_clfd", build_backbone("resnet18_cifar_nf8"), scenario.num_classes,
                        strategy_config("er_clfd", {"buffer_size": 4}), aux=[recorder], seed=0)
    info = scenario.info(0)
    s.on_experience_start(info)
    s.phase = Phase("train")
    for i in range(3):
        s.on_train_batch_end(None, batch_of(scenario.train_sets[0], 6), i)
    s.on_experience_end(info, scenario.train_sets[0])
    assert recorder.ended == [info] and s.buffer.num_seen == 18 and not s.accumulate_low_band


def test_a_class_seen_once_gets_the_activation_rule_with_its_count_of_one(scenario, build_strategy):
    """One epoch on 7 images of one class and 1 of the other: the rarer class's counts are 0 or 1,
    so its P is 1 - exp(-2 A / 1) (the row maximum, 1, divides)."""
    from clbench.config import RunConfig
    from clbench.datasets import InMemoryDataset, make_loader
    from clbench.engine.runner import make_trainer

    s = build("er_clfd", scenario, build_strategy, buffer_size=4, replay_batch_size=4)
    info = scenario.info(0)
    data = scenario.train_sets[0]
    rows = torch.cat([torch.nonzero(data.y == info.classes[0]).flatten()[:7], torch.nonzero(data.y == info.classes[1]).flatten()[:1]])
    s.on_experience_start(info)
    s.phase = s.phases(info)[0]
    run_cfg = RunConfig(epochs=1, batch_size=8, accelerator="cpu", limit_train_batches=1, progress=False)
    loader = make_loader(InMemoryDataset(data.x[rows], data.y[rows]), 8, shuffle=False)
    make_trainer(run_cfg, 1, [], info, s.phase).fit(s, train_dataloaders=loader)
    rare = info.classes[1]
    a = s.activation_counts[rare]
    assert a.max() == 1 and a.sum() > 0
    assert torch.allclose(s.keep_probs[rare], 1 - torch.exp(-2 * a))


def test_the_clfd_front_over_er_logs_its_two_cross_entropies(scenario, build_strategy, batch_of):
    """`clfd` with base=er: CE on the current batch, then CE on replayed codes once the buffer holds some,
    under the names the run logs (train/ce, train/replay_ce)."""
    s = build("clfd", scenario, build_strategy, buffer_size=10, replay_batch_size=4)
    s.on_experience_start(scenario.info(0))
    batch = batch_of(scenario.train_sets[0], 8)
    assert set(s.step_losses(batch)) == {"ce"}  # nothing to replay yet
    fill(s, scenario, batch_of, n=8)
    losses = s.step_losses(batch)
    assert set(losses) == {"ce", "replay_ce"} and all(v.item() > 0 for v in losses.values())


@pytest.mark.parametrize("augment", [False, True])
def test_replayed_codes_are_cropped_and_flipped_only_with_code_augment(augment, scenario, build_strategy, batch_of):
    s = build("er_clfd", scenario, build_strategy, buffer_size=4, replay_batch_size=16, code_augment=augment)
    s.on_experience_start(scenario.info(0))
    fill(s, scenario, batch_of, n=16)
    stored = s.buffer.all()["x"]
    torch.manual_seed(1)
    drawn = s.draw()["x"]
    # every drawn code is a stored one, unchanged, exactly when the augmentation is off
    unchanged = [any(torch.equal(d, z) for z in stored) for d in drawn]
    assert all(unchanged) if not augment else not all(unchanged)


def test_replay_crops_take_every_offset_and_flip_half_of_the_codes(scenario, build_strategy):
    """Through the replay view: each code is padded by 2 with the black code, cropped at an offset
    drawn uniformly from 0..4 on each axis and flipped with probability 1/2; each output is matched
    against the 50 candidates built here from a hand-padded canvas."""
    s = build("er_clfd", scenario, build_strategy, buffer_size=4)
    n, c, h, w, pad = 600, 3, 4, 4, 2
    z = torch.arange(1.0, 1.0 + c * h * w).view(1, c, h, w).expand(n, -1, -1, -1).contiguous()
    black = s.black_code(z)
    canvas = black.view(c, 1, 1).repeat(1, h + 2 * pad, w + 2 * pad)
    canvas[:, pad:pad + h, pad:pad + w] = z[0]
    candidates = {(dy, dx, f): canvas[:, dy:dy + h, dx:dx + w].flip(2) if f else canvas[:, dy:dy + h, dx:dx + w]
                  for dy in range(5) for dx in range(5) for f in (False, True)}
    torch.manual_seed(0)
    out = s.replay_view(z)
    drawn = [next(k for k, v in candidates.items() if torch.equal(o, v)) for o in out]
    assert {dy for dy, _, _ in drawn} == set(range(5)) and {dx for _, dx, _ in drawn} == set(range(5))
    assert sum(f for _, _, f in drawn) / n == pytest.approx(0.5, abs=0.07)
    # the flip is u < 1/2 with u ~ U[0, 1): under seed 479 the 196th code draws u = 0.5 exactly
    torch.manual_seed(479)
    torch.randint(0, 5, (n,)), torch.randint(0, 5, (n,))
    assert float(torch.rand(n)[195]) == 0.5
    torch.manual_seed(479)
    out = s.replay_view(z)
    assert not next(k for k, v in candidates.items() if torch.equal(out[195], v))[2]


def test_the_class_mask_keeps_a_unit_only_when_its_draw_is_below_p(scenario, build_strategy, batch_of):
    """Through the current batch's forward (k-WTA keeping every unit): the features are the
    backbone's times 1[u_j < P[y, j]]. P is a prefix mask (1 on units < 42, 0 after); under seed
    282286 the batch's draw u is exactly 0 at unit 55, which P = 0 must still block (0 < 0 is false)."""
    from clbench.types import Phase

    s = build("er_clfd", scenario, build_strategy, buffer_size=4, kwta_ratio=1.0)
    s.on_experience_start(scenario.info(0))
    s.train()
    s.phase = Phase("train")
    d = s.keep_probs.shape[1]
    s.keep_probs[:] = (torch.arange(d) < 42).float()
    batch = batch_of(scenario.train_sets[0], 8)
    g = torch.Generator().manual_seed(282286)
    assert float(torch.rand(d, generator=g)[55]) == 0.0
    torch.manual_seed(282286)
    out = s.current_output(batch)
    with torch.no_grad():
        raw = s.backbone(s.encoder(batch.x))  # batch statistics, as in the step
    assert torch.allclose(out.features[:, :42], raw[:, :42], atol=1e-6)
    assert (raw[:, 55] > 0).any() and (out.features[:, 42:] == 0).all()


def test_the_class_mask_and_the_counts_apply_only_to_training_steps_of_the_train_phase(scenario, build_strategy, batch_of):
    """With P = 0 everywhere a masked step would zero every feature: the current batch's output is
    masked (and counted) only in training mode during the train phase."""
    from clbench.types import Phase

    s = build("er_clfd", scenario, build_strategy, buffer_size=4)
    s.on_experience_start(scenario.info(0))
    s.keep_probs.zero_()
    batch = batch_of(scenario.train_sets[0], 8)
    for training, phase in ((False, "train"), (True, "warmup")):
        s.train(training)
        s.phase = Phase(phase)
        with torch.no_grad():
            out = s.current_output(batch)
        assert (out.features != 0).any(), (training, phase)
        assert s.activation_counts.sum() == 0, (training, phase)
    s.train()
    s.phase = Phase("train")
    with torch.no_grad():
        assert (s.current_output(batch).features == 0).all()


def test_the_encoder_trains_in_task_zero_and_is_frozen_from_the_next_task_start(scenario, build_strategy):
    s = build("er_clfd", scenario, build_strategy, buffer_size=4)
    s.on_experience_start(scenario.info(0))
    assert all(p.requires_grad for p in s.encoder.parameters())
    s.on_experience_end(scenario.info(0), scenario.train_sets[0])
    s.encoder.requires_grad_(True)  # even if something re-enabled it, the next task start freezes it
    s.on_experience_start(scenario.info(1))
    assert not any(p.requires_grad for p in s.encoder.parameters())


def test_a_one_channel_backbone_is_refused_with_the_whole_reason(scenario, build_strategy):
    from clbench.errors import UsageError
    from clbench.models.backbones import CifarResNet

    with pytest.raises(UsageError) as refused:
        build_strategy("er_clfd", scenario, backbone=CifarResNet(8, in_chans=1))
    assert str(refused.value) == (
        "CLFD feeds 3-channel half-size codes to the backbone; expected a convolutional backbone with 3 input "
        "channels (e.g. --backbone resnet18_cifar), got CifarResNet with 1 input channels")


def test_the_code_buffer_follows_the_run_s_policy_and_seed(scenario, build_strategy, batch_of):
    """Same policy and seed as a buffer built here: the same 40 codes kept of the same 120 offered."""
    from clbench.models.buffers import ClassBalancedBuffer, make_buffer

    torch.manual_seed(0)
    s = build_strategy("er_clfd", scenario, backbone="resnet18_cifar_nf8", seed=3, buffer_size=10, buffer_policy="class_balanced")
    assert isinstance(s.buffer, ClassBalancedBuffer) and s.buffer.capacity == 40
    twin = make_buffer(40, "class_balanced", seed=3)
    data = scenario.train_sets[0]
    for start in range(0, 120, 20):
        x, y = torch.arange(start, start + 20).float().view(-1, 1), data.y[start:start + 20]
        s.buffer.add(x=x, y=y)
        twin.add(x=x, y=y)
    assert torch.equal(s.buffer.all()["x"], twin.all()["x"])
    other = make_buffer(40, "class_balanced", seed=4)
    for start in range(0, 120, 20):
        other.add(x=torch.arange(start, start + 20).float().view(-1, 1), y=data.y[start:start + 20])
    assert not torch.equal(other.all()["x"], twin.all()["x"])  # the seed decides which codes stay
