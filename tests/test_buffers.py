"""Rehearsal buffers: reservoir inclusion probability, capacity, class balance, state round-trip."""

from __future__ import annotations

import io

import pytest
import torch
from scipy import stats

from clbench.errors import UsageError
from clbench.models.buffers import ClassBalancedBuffer, ReservoirBuffer, make_buffer


def stream(labels, dim: int = 3):
    """Items whose x encodes their stream position (x[:, 0] = index), with the given labels."""
    y = torch.as_tensor(labels, dtype=torch.long)
    x = torch.arange(len(y), dtype=torch.float32)[:, None].repeat(1, dim)
    return x, y


def offer(buffer, x, y, batch: int = 7):
    for i in range(0, len(y), batch):
        buffer.add(x=x[i : i + batch], y=y[i : i + batch])


def test_reservoir_keeps_each_item_with_probability_m_over_n():
    """Over many seeds every one of N items is kept M/N of the time (chi-square, df = N - 1).

    A short stream gives the test power: an off-by-one in the replacement draw
    (`randint(0, n)` instead of `randint(0, n + 1)`) scores p ~ 1e-58 here.
    """
    n_items, capacity, seeds = 12, 4, 4000
    x, y = stream([i % 4 for i in range(n_items)])
    kept = torch.zeros(n_items)
    for seed in range(seeds):
        buf = ReservoirBuffer(capacity, seed=seed)
        offer(buf, x, y)  # several batches: num_seen must carry across calls
        kept[buf.all()["x"][:, 0].long()] += 1
    expected = seeds * capacity / n_items
    assert kept.sum() == seeds * capacity
    chi2 = float(((kept - expected) ** 2 / expected).sum())
    # inclusion counts are negatively correlated (exactly M kept per seed), which only lowers
    # the statistic, so the df = N - 1 test is conservative
    assert stats.chi2.sf(chi2, n_items - 1) > 1e-3, (chi2, kept.tolist())
    # and it is not trivially flat: early and late items are both kept about M/N of the time
    assert abs(kept[:4].mean() - expected) < 0.1 * expected
    assert abs(kept[-4:].mean() - expected) < 0.1 * expected


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_capacity_is_never_exceeded(policy):
    buf = make_buffer(25, policy, seed=0)
    x, y = stream([i % 5 for i in range(300)])
    for i in range(0, 300, 13):
        buf.add(x=x[i : i + 13], y=y[i : i + 13])
        assert len(buf) == min(i + len(y[i : i + 13]), 25)
        assert all(len(v) == 25 for v in buf.fields.values())  # preallocated, never grown
        assert sum(buf.class_counts().values()) == len(buf)
    assert buf.num_seen == 300
    assert len(buf.sample(100)["y"]) == 25
    sample = buf.sample(10)
    assert len(sample["y"]) == 10 and len(set(sample["x"][:, 0].tolist())) == 10  # without replacement


def test_stored_rows_are_the_offered_rows():
    buf = ReservoirBuffer(8, seed=1)
    x, y = stream([i % 3 for i in range(50)])
    offer(buf, x, y)
    stored = buf.all()
    idx = stored["x"][:, 0].long()
    assert torch.equal(stored["y"], y[idx])  # x and y of one item stay together
    assert torch.equal(stored["x"], x[idx])


def test_class_balanced_counts_differ_by_at_most_one():
    # classes arrive one after the other, as in class-incremental experiences
    labels = [0] * 120 + [1] * 90 + [2] * 150 + [3] * 60
    x, y = stream(labels)
    buf = ClassBalancedBuffer(30, seed=0)
    offer(buf, x, y)
    counts = buf.class_counts()
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert len(buf) == 30


def test_class_balanced_keeps_all_of_a_small_class():
    """CBRS: a class with fewer items than its fair share is never evicted."""
    labels = [0] * 100 + [1] * 3 + [2] * 100
    x, y = stream(labels)
    buf = ClassBalancedBuffer(30, seed=0)
    offer(buf, x, y)
    counts = buf.class_counts()
    assert counts[1] == 3
    assert abs(counts[0] - counts[2]) <= 1, counts


def test_plain_reservoir_is_not_class_balanced_on_a_skewed_stream():
    """The check above can fail: reservoir follows the stream's class frequencies."""
    labels = [0] * 270 + [1] * 30
    x, y = stream(labels)
    buf = ReservoirBuffer(30, seed=0)
    offer(buf, x, y)
    counts = buf.class_counts()
    assert counts.get(0, 0) - counts.get(1, 0) > 10, counts


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_state_dict_round_trip_continues_identically(policy):
    x, y = stream([i % 4 for i in range(200)])
    buf = make_buffer(20, policy, seed=3)
    offer(buf, x[:120], y[:120])
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)  # tensors only: loadable without pickles

    restored = make_buffer(20, policy, seed=999)
    restored.load_state_dict(state)
    assert len(restored) == len(buf) and restored.num_seen == buf.num_seen
    assert restored.class_counts() == buf.class_counts()
    # the generator state travels too: the same future insertions and samples
    offer(buf, x[120:], y[120:])
    offer(restored, x[120:], y[120:])
    for k in buf.fields:
        assert torch.equal(buf.fields[k], restored.fields[k])
    assert torch.equal(buf.sample(5)["x"], restored.sample(5)["x"])


def test_extra_fields_are_stored_alongside():
    buf = ReservoirBuffer(4, seed=0)
    logits = torch.randn(6, 5)
    buf.add(x=torch.zeros(6, 2), y=torch.arange(6), logits=logits)
    stored = buf.all()
    assert stored["logits"].shape == (4, 5)
    assert torch.equal(stored["logits"], logits[stored["y"]])
    assert buf.nbytes() == 4 * (2 * 4 + 8 + 5 * 4)


def test_zero_capacity_stores_nothing_and_bad_arguments_fail():
    buf = ReservoirBuffer(0)
    buf.add(x=torch.zeros(3, 2), y=torch.zeros(3, dtype=torch.long))
    assert len(buf) == 0 and buf.is_empty
    with pytest.raises(UsageError, match="buffer_size=-1"):
        ReservoirBuffer(-1)
    with pytest.raises(UsageError, match="buffer_policy='fifo'.*reservoir, class_balanced"):
        make_buffer(10, "fifo")
