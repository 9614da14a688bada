"""EdgeProfiler: it changes the report, never the result; its FLOPs cover the whole optimisation step."""

import time

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from clbench.edge.flops import linear_flops
from clbench.edge.profiler import EdgeProfiler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clbench import config as C
from clbench.engine.runner import RunSpec, run

MM_IN_STEP = 2 * 4 * 4 * 4  # the marker matmul the optimizer below runs in every step


class _MarkedSGD(torch.optim.SGD):
    """SGD that also runs one 4x4 @ 4x4 matmul, so the count shows whether `step` was inside the window."""

    def step(self, closure=None):
        loss = super().step(closure)
        torch.ones(4, 4) @ torch.ones(4, 4)
        return loss


class _TwoLayer(pl.LightningModule):
    def __init__(self, blob_mib: int = 0, manual: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        self.blob_mib = blob_mib
        self.blob = None
        self.automatic_optimization = not manual  # CLStrategy optimises manually

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.blob_mib:
            self.blob = torch.ones(self.blob_mib * 2**20 // 4)  # touched pages: really resident
        loss = F.cross_entropy(self.net(x), y)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.blob = None

    def configure_optimizers(self):
        return _MarkedSGD(self.parameters(), lr=0.1)


def _fit(module, profiler, n=40, batch=8, epochs=1):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=[profiler], enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, DataLoader(data, batch_size=batch))


def _step_flops(batch=8):
    first, second = linear_flops(batch, 6, 5), linear_flops(batch, 5, 3)
    # first layer: forward + grad-weight (inputs need no grad); second: forward + grad-input + grad-weight
    return 2 * first + 3 * second + MM_IN_STEP


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_window_covers_forward_backward_and_optimizer_step(manual):
    prof = EdgeProfiler(flops="all")
    prof.start_experience(0)
    _fit(_TwoLayer(manual=manual), prof)
    rec = prof.end_experience(_TwoLayer())
    assert rec["steps"] == 5 and rec["samples"] == 40
    assert rec["flops_method"] == "exact" and rec["flops_counted_steps"] == 5
    assert rec["train_flops_step"] == _step_flops()
    assert rec["train_flops_exp"] == 5 * _step_flops()
    assert rec["fwd_flops_per_sample"] == linear_flops(1, 6, 5) + linear_flops(1, 5, 3)
    assert rec["trainable_params"] == rec["total_params"] == 6 * 5 + 5 + 5 * 3 + 3
    assert not torch._C._len_torch_dispatch_stack()  # no counting mode left behind


def test_sampling_counts_until_stable_and_scales_by_steps():
    prof = EdgeProfiler()  # default: sample
    prof.start_experience(0)
    _fit(_TwoLayer(), prof, n=84)  # 10 steps of 8, then one of 4
    rec = prof.end_experience(_TwoLayer())
    assert rec["steps"] == 11
    assert rec["flops_counted_steps"] == 3  # two equal steps of 8, the lone step of 4
    assert rec["flops_method"] == "sampled"
    assert rec["train_flops_exp"] == 10 * _step_flops(8) + _step_flops(4)
    shapes = {tuple(s["input_shape"]): s for s in rec["flops_step_shapes"]}
    assert shapes[(8, 6)]["steps"] == 10 and shapes[(8, 6)]["stable"]
    assert prof.totals()["train_flops_total"] == rec["train_flops_exp"]


class _OddBatchesCostMore(_TwoLayer):
    """A step whose cost varies with the batch index, not with the batch shape."""

    def training_step(self, batch, batch_idx):
        if batch_idx % 2:
            torch.ones(4, 4) @ torch.ones(4, 4)
        return super().training_step(batch, batch_idx)


def test_a_phase_that_agreed_with_itself_counts_its_other_shapes_once():
    prof = EdgeProfiler()
    prof.start_experience(0)
    _fit(_TwoLayer(), prof, n=20, epochs=3)  # per epoch: 8, 8, then a last batch of 4
    rec = prof.end_experience(_TwoLayer())
    shapes = {s["input_shape"][0]: s for s in rec["flops_step_shapes"]}
    assert (shapes[8]["steps"], shapes[8]["counted"], shapes[4]["steps"], shapes[4]["counted"]) == (6, 2, 3, 1)
    assert shapes[4]["basis"].startswith("one count") and shapes[4]["stable"]
    assert rec["flops_method"] == "sampled" and rec["flops_counted_steps"] == 3
    assert rec["train_flops_exp"] == 6 * _step_flops(8) + 3 * _step_flops(4)


def test_a_step_cost_that_varies_is_never_taken_as_stable():
    prof = EdgeProfiler()
    prof.start_experience(0)
    _fit(_OddBatchesCostMore(), prof, n=20, epochs=3)  # per epoch: 8, 8 (one matmul more), 4
    rec = prof.end_experience(_TwoLayer())
    shapes = {s["input_shape"][0]: s for s in rec["flops_step_shapes"]}
    assert not shapes[8]["stable"] and shapes[8]["counted"] == shapes[8]["steps"] == 6
    # its phase never agreed with itself, so the last batch needs its own two equal counts
    assert shapes[4]["counted"] == 2 and shapes[4]["basis"] == "two consecutive equal counts"
    assert rec["train_flops_exp"] == 6 * _step_flops(8) + 3 * _step_flops(4) + 3 * 2 * 4 * 4 * 4


class _FreezesFirstLayerInLastEpoch(_TwoLayer):
    """Same batch shapes all along, but the last epoch computes no weight gradient for the first layer."""

    def on_train_epoch_start(self):
        if self.current_epoch == self.trainer.max_epochs - 1:
            self.net[0].requires_grad_(False)


def test_freezing_mid_fit_starts_a_new_step_shape():
    records = {}
    for mode in ("all", "sample"):
        prof = EdgeProfiler(flops=mode)
        prof.start_experience(0)
        _fit(_FreezesFirstLayerInLastEpoch(), prof, n=32, epochs=3)  # 4 steps of 8 per epoch
        records[mode] = prof.end_experience(_TwoLayer())
    # frozen first layer: no grad-weight matmul for it, and no grad-input for the second layer
    frozen_step = _step_flops() - linear_flops(8, 6, 5) - linear_flops(8, 5, 3)
    assert records["all"]["train_flops_exp"] == 8 * _step_flops() + 4 * frozen_step
    assert records["sample"]["train_flops_exp"] == records["all"]["train_flops_exp"]
    shapes = {s["trainable_params"]: s for s in records["sample"]["flops_step_shapes"]}
    assert shapes[5 * 3 + 3]["steps"] == 4 and shapes[5 * 3 + 3]["counted"] == 1  # its phase had agreed already


class _FirstStepOfAFitCostsMore(_TwoLayer):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 0:
            torch.ones(4, 4) @ torch.ones(4, 4)
        return super().training_step(batch, batch_idx)


def _three_experiences(module_class):
    prof = EdgeProfiler()
    for i in range(3):
        prof.start_experience(i)
        _fit(module_class(), prof, n=20, epochs=3)  # per epoch: 8, 8, then a last batch of 4
        prof.end_experience(_TwoLayer())
    return [{s["input_shape"][0]: (s["counted"], s["basis"]) for s in r["flops_step_shapes"]} for r in prof.records], prof.records


def test_a_phase_constant_from_its_first_step_is_counted_once_per_shape_in_the_next_experience():
    shapes, records = _three_experiences(_TwoLayer)
    assert [s[8][0] for s in shapes] == [2, 1, 2]  # confirmed, carried, confirmed again
    assert [s[4][0] for s in shapes] == [1, 1, 1]
    assert "previous experience" in shapes[1][8][1]
    assert all(r["train_flops_exp"] == 6 * _step_flops(8) + 3 * _step_flops(4) for r in records)


def test_a_phase_whose_first_step_was_special_is_confirmed_again():
    shapes, records = _three_experiences(_FirstStepOfAFitCostsMore)
    assert [s[8][0] for s in shapes] == [3, 3, 3]  # the special first step, then two equal ones, every time
    assert all(r["train_flops_exp"] == 6 * _step_flops(8) + 3 * _step_flops(4) + MM_IN_STEP for r in records)


class _StubCounter:
    """Stands in for the FLOP counter; starting it takes `start_delay` seconds."""

    def __init__(self, start_delay=0.0):
        self.start_delay, self.total, self.profile = start_delay, 7, None

    def start(self):
        time.sleep(self.start_delay)
        return self

    def stop(self):
        pass

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()


class _SlowWhenCounted(_TwoLayer):
    """A step that takes `delay` seconds longer while the profiler counts it, as counting does."""

    delay = 0.05

    def training_step(self, batch, batch_idx):
        if self.trainer.callbacks[0]._counter is not None:
            time.sleep(self.delay)
        return super().training_step(batch, batch_idx)


def test_reported_training_time_leaves_out_what_counting_added():
    step_delay, start_delay = _SlowWhenCounted.delay, 0.02
    prof = EdgeProfiler()
    prof._step_counter = _StubCounter(start_delay)
    prof.start_experience(0)
    _fit(_SlowWhenCounted(), prof, n=20, epochs=4)  # per epoch 8, 8, 4: two counts of 8 and one of 4
    rec = prof.end_experience(_TwoLayer())
    assert rec["flops_counted_steps"] == 3
    # each counted step was `step_delay` slower than the uncounted steps of its shape (which take ~1 ms;
    # the upper margin leaves room for a loaded machine, which slows counted and uncounted steps unevenly)
    assert 3 * step_delay * 0.9 < rec["flop_count_overhead_time_s"] < 3 * step_delay + 0.25
    assert rec["train_time_s"] == pytest.approx(rec["train_time_raw_s"] - rec["flop_count_overhead_time_s"])
    assert rec["train_time_s"] < rec["train_time_raw_s"] - 3 * step_delay * 0.9
    assert rec["samples_per_s"] == pytest.approx(rec["samples"] / rec["train_time_s"])
    totals = prof.totals()
    assert totals["train_time_s"] == pytest.approx(rec["train_time_s"])
    assert totals["flop_count_overhead_time_s"] == pytest.approx(rec["flop_count_overhead_time_s"])
    # the profiler's own time: the counting overhead plus its hooks, which started the counter
    # three times for steps and once for the inference count
    # (and released freed memory before reading the RSS baseline: garbage collection and a heap trim)
    own = totals["profiler_time_s"] - totals["flop_count_overhead_time_s"] - rec["rss_release_time_s"]
    assert 4 * start_delay * 0.9 < own < 4 * start_delay + 0.1


class _FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class _CostsKnownTime(_TwoLayer):
    """Each step advances the fake clock by a known cost: 10 ms per batch of 8, 6 ms per batch of 4,
    30 ms more for the first step of the fit (a warm-up an unprofiled run pays too) and 50 ms more
    while the FLOP counter runs (the counter's overhead)."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.first = clock, True

    def training_step(self, batch, batch_idx):
        cost = 0.010 if len(batch[0]) == 8 else 0.006
        if self.first:
            cost, self.first = cost + 0.030, False
        if self.trainer.callbacks[0]._counter is not None:
            cost += 0.050
        self.clock.t += cost
        return super().training_step(batch, batch_idx)


def test_training_time_is_the_unprofiled_time_on_a_fake_clock(monkeypatch):
    """The counter's overhead is measured on the warm counted steps (the second count of a shape) and
    removed from every counted step; the first step's warm-up stays, as in a run without the profiler."""
    import clbench.edge.profiler as profiler_module

    clock = _FakeClock()
    monkeypatch.setattr(profiler_module, "_clock", clock)
    prof = EdgeProfiler()
    prof._step_counter = _StubCounter()  # no op trace: the overhead is per step
    hand = 8 * 0.010 + 4 * 0.006 + 0.030  # 4 epochs of batches 8, 8, 4 without the counter
    records = []
    for i in range(2):
        prof.start_experience(i)
        _fit(_CostsKnownTime(clock), prof, n=20, epochs=4)
        records.append(prof.end_experience(_TwoLayer()))
    first, second = records
    # experience 1 counts the 8-batch twice (the second is warm) and the 4-batch once; experience 2
    # counts each once (its phase is known constant) and uses the run's overhead from experience 1
    assert [first["flops_counted_steps"], second["flops_counted_steps"]] == [3, 2]
    assert first["flop_count_overhead_time_per_op_s"] == pytest.approx(0.050)
    for rec, counted in ((first, 3), (second, 2)):
        assert rec["train_time_raw_s"] == pytest.approx(hand + counted * 0.050)
        assert rec["flop_count_overhead_time_s"] == pytest.approx(counted * 0.050)
        assert rec["train_time_s"] == pytest.approx(hand)
        assert rec["train_time_source"].endswith(":minus-counter-overhead")
    totals = prof.totals()
    assert totals["train_time_s"] == pytest.approx(2 * hand)
    assert totals["train_time_source"].endswith(":minus-counter-overhead")


def test_training_time_is_left_as_measured_when_every_step_is_counted():
    prof = EdgeProfiler(flops="all")
    prof._step_counter = _StubCounter()
    prof.start_experience(0)
    _fit(_SlowWhenCounted(), prof, n=20)
    rec = prof.end_experience(_TwoLayer())
    assert rec["flops_counted_steps"] == rec["steps"] == 3
    assert rec["flop_count_overhead_time_s"] == 0.0  # no uncounted step to compare with
    assert rec["train_time_s"] == rec["train_time_raw_s"] > 3 * _SlowWhenCounted.delay
    assert rec["train_time_source"].endswith(":as-measured")


def test_peak_rss_sees_a_step_allocation_and_resets_per_experience():
    prof = EdgeProfiler(flops="off")
    prof.start_experience(0)
    _fit(_TwoLayer(blob_mib=96), prof, n=16)
    first = prof.end_experience(_TwoLayer())
    prof.start_experience(1)
    _fit(_TwoLayer(), prof, n=16)
    second = prof.end_experience(_TwoLayer())
    assert first["peak_memory_kind"] == "cpu_rss"
    assert first["peak_rss_bytes"] >= 90 * 2**20  # other memory may be released meanwhile
    assert first["peak_rss_method"] in ("vmhwm", "sampled")
    assert second["peak_rss_bytes"] < 48 * 2**20


def test_same_seed_with_and_without_profiler_gives_identical_accuracy(tmp_path):
    def go(profile: bool, sub: str):
        cfg = C.RunConfig(epochs=1, progress=False, output_dir=str(tmp_path / sub), profile=profile)
        return run(RunSpec("er", "synthetic-2", run=cfg, seed=3))

    with_p, without = go(True, "a"), go(False, "b")
    assert with_p.status == without.status == "completed"
    assert with_p.accuracy_matrix == without.accuracy_matrix
    assert with_p.edge["totals"]["train_flops_total"] > 0
    assert without.edge["per_experience"] == [{}, {}]
    rec = with_p.edge["per_experience"][1]
    # experience 2 replays 32 buffered samples with every 32-sample batch: 64 rows through the MLP
    assert rec["flops_step_shapes"][0]["input_shape"] == [32, 1, 8, 8]
    assert rec["train_flops_step"] == 2 * linear_flops(64, 64, 32) + 3 * linear_flops(64, 32, 4)
    assert rec["jetson"]["source"].startswith("estimated:jetson-orin-nx-16gb:MAXN:")


def test_training_work_outside_a_fit_is_counted_timed_and_itemised():
    prof = EdgeProfiler()
    prof.start_experience(0)
    _fit(_TwoLayer(), prof, n=16)  # two steps of 8
    w = torch.randn(16, 16, requires_grad=True)
    started = time.perf_counter()
    for _ in prof.work_steps("inversion", 6):
        (w @ w).sum().backward()  # forward 16^3 MACs, backward two more matmuls of the same size
    outside_s = time.perf_counter() - started
    rec = prof.end_experience(_TwoLayer())
    work = rec["outside_fit"]["inversion"]
    per_step = 3 * 2 * 16**3
    assert work["steps"] == 6 and work["counted"] == 2 and work["basis"] == "two consecutive equal counts"
    assert work["flops_step"] == per_step and work["flops"] == 6 * per_step
    assert rec["train_flops_exp"] == 2 * _step_flops() + 6 * per_step
    assert 0 < work["time_s"] <= outside_s
    assert rec["train_time_s"] == pytest.approx(rec["train_time_raw_s"] - rec["flop_count_overhead_time_s"])
    assert rec["train_time_raw_s"] >= work["time_s"]


def test_strategies_loop_over_plain_ranges_without_the_runners_profiler(strategy_factory):
    from clbench.edge.profiler import NullProfiler

    strategy = strategy_factory("naive")
    assert list(strategy.work_steps("anything", 3)) == [0, 1, 2]
    strategy.cost_meter = NullProfiler()
    assert list(strategy.work_steps("anything", 2)) == [0, 1]
    outside = EdgeProfiler()  # a profiler with no experience open adds nothing anywhere
    strategy.cost_meter = outside
    assert list(strategy.work_steps("anything", 2)) == [0, 1] and outside.records == []


def test_a_resumed_run_reports_the_whole_runs_jetson_time(tmp_path, resume_pair):
    """Op traces are not checkpointed: after --resume the run total is the sum of the experiences'
    estimates, equal to an uninterrupted run's."""
    from clbench.config import RunConfig
    from clbench.engine.runner import RunSpec

    def spec(out, resume):
        cfg = RunConfig(epochs=1, progress=False, output_dir=str(out), limit_train_batches=3)
        return RunSpec("er", "synthetic-5", run=cfg, seed=5, resume=resume)

    whole, resumed = resume_pair(spec, tmp_path)
    a, b = whole.edge["totals"]["jetson"], resumed.edge["totals"]["jetson"]
    assert b["time_s"] == pytest.approx(a["time_s"], rel=1e-9)
    assert b["low_s"] == pytest.approx(a["low_s"], rel=1e-9) and b["high_s"] == pytest.approx(a["high_s"], rel=1e-9)
    assert b["summed_experiences"] == 5 and "planned_time_s" not in b
    assert b["label"].split(" estimated")[0] == a["label"].split(" estimated")[0]
