"""Experience replay: bounded buffer of raw samples, replayed in the same cross-entropy."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from clbench.engine.runner import RunSpec, run


class BufferWatch(pl.Callback):
    def __init__(self):
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sizes.append(len(pl_module.buffer))
        assert all(len(v) == pl_module.cfg.buffer_size for v in pl_module.buffer.fields.values())


def _run_er(tmp_path, fast_config_for, **overrides):
    watch, captured = BufferWatch(), {}
    spec = RunSpec("er", "synthetic-5", run=fast_config_for(tmp_path), strategy_overrides=overrides, seed=0)
    result = run(spec, callbacks=[watch], on_experience=lambda i, r, s: captured.update(strategy=s))
    return result, watch, captured["strategy"]


def test_buffer_never_exceeds_its_size_and_stores_no_logits(tmp_path, fast_config_for):
    result, watch, strategy = _run_er(tmp_path, fast_config_for, buffer_size=10)
    assert result.status == "completed"
    assert max(watch.sizes) == 10 and all(s <= 10 for s in watch.sizes)
    # callbacks see the buffer before the module's own on_train_batch_end adds the batch:
    # the 16-sample first batch has filled it by the second
    assert watch.sizes[:2] == [0, 10]
    assert set(strategy.buffer.fields) == {"x", "y"}  # ER replays labels only: no logits kept
    assert strategy.buffer.num_seen == 5 * 2 * 16
    assert result.strategy_report["buffer_bytes"] == 10 * (64 * 4 + 8)


def test_class_balanced_buffer_when_configured(tmp_path, fast_config_for):
    _, _, strategy = _run_er(tmp_path, fast_config_for, buffer_size=20, buffer_policy="class_balanced")
    counts = strategy.buffer.class_counts()
    assert set(counts) == set(range(10))  # every class of the five experiences
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_replay_joins_the_current_batch_in_one_cross_entropy(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("er", buffer_size=8, replay_batch_size=4)
    strategy.on_experience_start(synthetic_scenario.info(0))
    old = batch_of(synthetic_scenario.train_sets[0], 8)
    strategy.buffer.add(x=old.x, y=old.y)
    strategy.on_experience_start(synthetic_scenario.info(1))
    strategy.augment = lambda x: x + 1.0  # replayed samples get the train augmentation when drawn
    batch = batch_of(synthetic_scenario.train_sets[1], 6)

    g = torch.Generator()
    g.set_state(strategy.buffer.generator.get_state())
    idx = torch.randperm(len(strategy.buffer), generator=g)[:4]  # the draw the buffer will make
    x = torch.cat([batch.x, old.x[idx] + 1.0])
    y = torch.cat([batch.y, old.y[idx]])
    expected = F.cross_entropy(strategy.head(strategy.backbone(x)), y)

    terms = strategy.step_losses(batch)
    assert set(terms) == {"ce"}
    assert torch.allclose(terms["ce"], expected)


def test_the_raw_batch_is_what_gets_stored(strategy_factory, synthetic_scenario, batch_of):
    """The buffer keeps inputs before augmentation, so replay can augment them afresh."""
    from clbench.types import Batch

    strategy = strategy_factory("er", buffer_size=50)
    strategy.on_experience_start(synthetic_scenario.info(0))
    raw = batch_of(synthetic_scenario.train_sets[0], 5)
    augmented = Batch(raw.x + 7.0, raw.y, x_raw=raw.x)
    strategy.on_train_batch_end(None, augmented, 0)
    assert torch.equal(strategy.buffer.all()["x"], raw.x)
