"""Rehearsal buffers: reservoir inclusion probability, capacity, class balance, state round-trip."""

from __future__ import annotations

import io

import pytest
import torch
from scipy import stats

from clbench.errors import UsageError
from clbench.models.buffers import ClassBalancedBuffer, ReservoirBuffer, make_buffer, randint_each


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


def test_replace_sets_the_whole_contents_and_refuses_too_many_rows():
    buf = ReservoirBuffer(4, seed=0)
    buf.add(x=torch.zeros(6, 2), y=torch.zeros(6, dtype=torch.long), logits=torch.zeros(6, 3))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    buf.replace(x=x, y=torch.tensor([5, 6, 7]))
    stored = buf.all()
    assert len(buf) == 3 and set(buf.fields) == {"x", "y"}  # the old fields (logits) are gone
    assert torch.equal(stored["y"], torch.tensor([5, 6, 7])) and torch.equal(stored["x"], x.detach())
    assert not stored["x"].requires_grad and buf.fields["x"].shape == (4, 2)  # detached, capacity rows
    buf.replace(x=torch.ones(4, 2), y=torch.arange(4))  # exactly the capacity fits
    assert len(buf) == 4 and buf.class_counts() == {0: 1, 1: 1, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="5 items do not fit a buffer of capacity 4"):
        buf.replace(x=torch.zeros(5, 2), y=torch.zeros(5, dtype=torch.long))


def test_clear_empties_and_restarts_the_count_keeping_the_allocation():
    buf = ReservoirBuffer(4, seed=0)
    x, y = stream([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    offer(buf, x, y)
    assert not buf.is_empty and buf.nbytes() > 0
    buf.clear()
    assert len(buf) == 0 and buf.is_empty and buf.num_seen == 0 and buf.nbytes() == 0 and buf.class_counts() == {}
    assert buf.fields["x"].shape == (4, 3)
    buf.add(x=x[7:9], y=y[7:9])  # not full again: the two rows go to slots 0 and 1 in order
    assert buf.num_seen == 2 and torch.equal(buf.all()["x"][:, 0], torch.tensor([7.0, 8.0]))


def test_reading_to_a_device():
    buf = ReservoirBuffer(3, seed=0)
    buf.add(x=torch.ones(2, 2), y=torch.tensor([0, 1]))
    assert all(v.device.type == "meta" for v in buf.sample(2, device="meta").values())
    assert all(v.device.type == "meta" and len(v) == 2 for v in buf.all(device="meta").values())
    assert torch.equal(buf.all()["y"], torch.tensor([0, 1]))  # only the stored rows, not the capacity


def test_herding_selection_by_hand():
    from clbench.models.buffers import herding_selection

    # mean 3.25.  Step 1: |3.25 - f| is least for f = 2.  Step 2: |3.25 - (2 + f)/2| is least for
    # f = 1 (1.75).  Step 3: |3.25 - (3 + f)/3| is least for f = 10 (1.083).  Then the last row.
    features = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    assert herding_selection(features, 4).tolist() == [2, 1, 3, 0]
    assert herding_selection(features, 2).tolist() == [2, 1]  # a prefix of the full order
    assert herding_selection(features, 9).tolist() == [2, 1, 3, 0]  # at most every row, each once
    assert herding_selection(features, 0).dtype == torch.long and len(herding_selection(features, 0)) == 0
    # 2-D: the distance is Euclidean over the feature vector (mean (1, 1); (1, 1) itself comes first)
    square = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    assert herding_selection(square, 1).tolist() == [2]


def test_herding_selection_equals_the_per_sample_python_loop():
    """The batched herding (one vectorised cost over all candidates per pick) against the textbook loop
    that scores every candidate one at a time in Python, float64: the same order on random features."""
    from clbench.models.buffers import herding_selection

    def by_loop(features, m):
        rows = [r for r in features.double()]
        target = sum(rows) / len(rows)
        chosen, running = [], torch.zeros_like(target)
        for k in range(min(m, len(rows))):
            best, best_cost = None, float("inf")
            for i, r in enumerate(rows):
                if i in chosen:
                    continue
                cost = float((target - (running + r) / (k + 1)).norm())
                if cost < best_cost:
                    best, best_cost = i, cost
            chosen.append(best)
            running = running + rows[best]
        return chosen

    g = torch.Generator().manual_seed(0)
    for n, d, m in ((30, 5, 10), (17, 3, 17), (40, 8, 25)):
        features = torch.randn(n, d, generator=g)
        assert herding_selection(features, m).tolist() == by_loop(features, m)


class RowByRowReservoir:
    """Algorithm R one row at a time, as the buffer inserted before its insertion was batched:
    one `randint(0, t + 1)` per row t once the buffer is full, each row written as it comes."""

    def __init__(self, capacity, seed):
        self.capacity, self.num_seen, self.size = capacity, 0, 0
        self.fields = {}
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, **batch):
        for k, v in batch.items():
            if k not in self.fields:
                self.fields[k] = torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype)
        for i in range(len(batch["y"])):
            if self.num_seen < self.capacity:
                slot = self.num_seen
            else:
                j = int(torch.randint(0, self.num_seen + 1, (1,), generator=self.generator))
                slot = j if j < self.capacity else None
            self.num_seen += 1
            if slot is not None:
                for k, v in batch.items():
                    self.fields[k][slot] = v[i]
                self.size = max(self.size, slot + 1)


def assert_same_state(buf, ref):
    assert (buf.num_seen, buf.size) == (ref.num_seen, ref.size)
    assert set(buf.fields) == set(ref.fields)
    for k in ref.fields:
        assert buf.fields[k].dtype == ref.fields[k].dtype and torch.equal(buf.fields[k], ref.fields[k]), k
    assert torch.equal(buf.generator.get_state(), ref.generator.get_state())  # the same draws, no more


@pytest.mark.parametrize("capacity,sizes", [
    (10, [3, 4, 5, 2, 32, 32, 1, 64]),  # 3 + 4 + 5 crosses the fill-up boundary inside a batch
    (5, [5, 5, 40, 40]),  # filled exactly by one batch, then many rows per slot (same-slot draws in a batch)
    (200, [32] * 40),  # DER++'s digits setting
])
def test_batched_insertion_equals_the_row_by_row_reservoir(capacity, sizes):
    """Bit-identical contents, counters and generator state after every batch, with four fields
    (one of them a logits row, one stored with the dtype of the first batch)."""
    buf, ref = ReservoirBuffer(capacity, seed=7), RowByRowReservoir(capacity, seed=7)
    g = torch.Generator().manual_seed(1)
    for n in sizes:
        batch = {"x": torch.randn(n, 3, generator=g), "y": torch.randint(0, 10, (n,), generator=g),
                 "logits": torch.randn(n, 4, generator=g), "width": torch.full((n,), 4)}
        buf.add(**batch)
        ref.add(**batch)
        assert_same_state(buf, ref)
    assert buf.num_seen == sum(sizes) and buf.size == min(capacity, sum(sizes))


def test_batched_insertion_keeps_the_later_of_two_rows_drawing_one_slot():
    """Capacity 1, seed 0: after the first row fills slot 0, row t replaces it when its draw in
    [0, t] is 0.  The draws are computed here with the generator directly: the kept row is the
    last one whose draw was 0."""
    g = torch.Generator().manual_seed(0)
    draws = [int(torch.randint(0, t + 1, (1,), generator=g)) for t in range(1, 12)]
    assert draws.count(0) >= 2, draws  # the case under test: several rows of one batch take slot 0
    kept = max([0] + [t for t, j in zip(range(1, 12), draws) if j == 0])
    buf = ReservoirBuffer(1, seed=0)
    x, y = stream([0] * 12)
    buf.add(x=x, y=y)
    assert buf.all()["x"][:, 0].tolist() == [float(kept)]


def test_batched_insertion_after_replace_grows_the_size_to_the_highest_drawn_slot():
    """A buffer rebuilt by `replace` with fewer rows than its capacity, after the count has passed
    the capacity: drawn slots beyond the stored rows extend the contents (as row by row)."""
    buf, ref = ReservoirBuffer(8, seed=2), RowByRowReservoir(8, seed=2)
    x, y = stream(range(40))
    buf.add(x=x[:20], y=y[:20])
    ref.add(x=x[:20], y=y[:20])
    buf.replace(x=x[:2], y=y[:2])
    ref.size = 2
    for k in ref.fields:
        ref.fields[k][:2] = buf.fields[k][:2]  # replace keeps only rows 0..1; the rest is zero
        ref.fields[k][2:] = 0
    assert torch.equal(buf.fields["x"], ref.fields["x"])
    buf.add(x=x[20:], y=y[20:])
    ref.add(x=x[20:], y=y[20:])
    assert_same_state(buf, ref)
    assert 2 < buf.size <= 8


def test_batched_insertion_on_the_gathered_rows_under_ddp(monkeypatch):
    """Inside a sharded epoch `add` inserts the rows of every rank (gathered in rank order): with a
    faked two-rank gather, the contents equal a single process offered the concatenated batches."""
    from clbench import distributed

    g = torch.Generator().manual_seed(3)
    other_rank = {"x": torch.randn(6, 2, generator=g), "y": torch.randint(0, 5, (6,), generator=g)}

    def gather(fields):
        return {k: torch.cat([v, other_rank[k]]) for k, v in fields.items()}

    buf, ref = ReservoirBuffer(9, seed=4), RowByRowReservoir(9, seed=4)
    monkeypatch.setattr(distributed, "in_sharded_epoch", lambda: True)
    monkeypatch.setattr(distributed, "gather_rows", gather)
    for _ in range(4):
        mine = {"x": torch.randn(6, 2, generator=g), "y": torch.randint(0, 5, (6,), generator=g)}
        buf.add(**mine)
        ref.add(**gather(mine))
        assert_same_state(buf, ref)
    assert buf.num_seen == 48


@pytest.mark.parametrize("bounds", [
    [1, 2, 3, 257, 2**24, 2**24 + 1, 2**28 - 1],  # every value below 2**28: two calls for all
    list(range(201, 1201)),  # a long run of consecutive bounds, as a large batch draws
    [5, 2**28, 7, 2**31 + 3, 2**40],  # from 2**28 on torch draws two words a number
    [3, 2**28],  # the first such bound
    [],
])
def test_randint_each_equals_one_randint_call_per_bound(bounds):
    g, ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    expected = [int(torch.randint(0, b, (1,), generator=ref)) for b in bounds]
    got = randint_each(torch.tensor(bounds, dtype=torch.long), g)
    assert got.dtype == torch.long and got.tolist() == expected
    assert torch.equal(g.get_state(), ref.get_state())  # and the generator continues as after those calls
    assert torch.equal(torch.randint(0, 100, (3,), generator=g), torch.randint(0, 100, (3,), generator=ref))


def test_batched_insertion_equals_the_row_by_row_reservoir_past_two_to_the_28_rows():
    """A count crossing 2**28 inside a batch (where torch's draws take two words each)."""
    buf, ref = ReservoirBuffer(6, seed=5), RowByRowReservoir(6, seed=5)
    x, y = stream(range(30))
    buf.add(x=x[:6], y=y[:6])
    ref.add(x=x[:6], y=y[:6])
    buf.num_seen = ref.num_seen = 2**28 - 10
    for i in (6, 18):
        buf.add(x=x[i : i + 12], y=y[i : i + 12])
        ref.add(x=x[i : i + 12], y=y[i : i + 12])
        assert_same_state(buf, ref)


# --------------------------------------------------------------------------- defaults, seeds, small cases
def test_the_default_seed_is_zero_and_every_constructor_passes_its_seed_on():
    zero, three = torch.Generator().manual_seed(0).get_state(), torch.Generator().manual_seed(3).get_state()
    assert torch.equal(ReservoirBuffer(5).generator.get_state(), zero)
    assert torch.equal(ClassBalancedBuffer(5).generator.get_state(), zero)
    assert torch.equal(ClassBalancedBuffer(5, seed=3).generator.get_state(), three)
    default = make_buffer(5)
    assert type(default) is ReservoirBuffer and torch.equal(default.generator.get_state(), zero)
    assert torch.equal(make_buffer(5, "class_balanced", seed=3).generator.get_state(), three)
    assert torch.equal(make_buffer(5, seed=3).generator.get_state(), three)


def test_a_buffer_of_one_slot_stores_its_first_row_and_counts_it():
    buf = ReservoirBuffer(1, seed=0)
    buf.add(x=torch.tensor([[4.0]]), y=torch.tensor([7]))
    assert len(buf) == 1 and buf.all()["x"].tolist() == [[4.0]]
    assert buf.class_counts() == {7: 1}


# --------------------------------------------------------------------------- sample under DDP (faked ranks)
def fake_ranks(monkeypatch, world, rank, sharded=True):
    from clbench import distributed

    monkeypatch.setattr(distributed, "in_sharded_epoch", lambda: sharded)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "global_rank", lambda: rank)


def filled(size, seed=5):
    buf = ReservoirBuffer(size, seed=seed)
    x, y = stream(range(size))
    buf.add(x=x, y=y)
    return buf


def expected_perm(buf):
    """The permutation `sample` draws next, from a copy of the buffer's generator."""
    g = torch.Generator()
    g.set_state(buf.generator.get_state())
    return torch.randperm(buf.size, generator=g).tolist()


@pytest.mark.parametrize("world,n,size,parts", [
    # 3 ranks x 4 = 12 rows wanted, 10 stored: 10 = 4 + 3 + 3, the first rank takes the extra row
    (3, 4, 10, [(0, 4), (4, 7), (7, 10)]),
    # 9 of 10 rows: 3 each, no remainder
    (3, 3, 10, [(0, 3), (3, 6), (6, 9)]),
    # exactly one row per rank (total == world)
    (3, 1, 3, [(0, 1), (1, 2), (2, 3)]),
    # 2 ranks x 2 = 4 rows of 5 stored: 2 + 2
    (2, 2, 5, [(0, 2), (2, 4)]),
])
def test_sample_in_a_sharded_epoch_gives_each_rank_its_part_of_one_global_draw(monkeypatch, world, n, size, parts):
    buffers = [filled(size) for _ in parts]  # filled before the ranks are faked (add would gather)
    for rank, ((lo, hi), buf) in enumerate(zip(parts, buffers)):
        perm = expected_perm(buf)
        fake_ranks(monkeypatch, world, rank)
        got = buf.sample(n)["x"][:, 0].long().tolist()  # x[:, 0] is the row's stream position = its slot here
        assert got == perm[lo:hi], (rank, got, perm)


def test_sample_with_fewer_stored_rows_than_ranks_gives_every_rank_the_single_process_draw(monkeypatch):
    # 1 row stored, 2 ranks: too few to split, each rank gets perm[:min(n, size)] (the one row)
    for rank, buf in enumerate([filled(1), filled(1)]):
        fake_ranks(monkeypatch, 2, rank)
        assert buf.sample(3)["x"][:, 0].tolist() == [0.0]


@pytest.mark.parametrize("rank", [0, 1])
def test_sample_outside_a_sharded_epoch_ignores_the_ranks(monkeypatch, rank):
    """A DDP process outside a training epoch (evaluation, experience ends) draws as one process:
    the first n rows of the permutation, whatever its rank and the world size."""
    buf = filled(6)
    perm = expected_perm(buf)
    fake_ranks(monkeypatch, 2, rank, sharded=False)
    assert buf.sample(2)["x"][:, 0].long().tolist() == perm[:2]


# --------------------------------------------------------------------------- class-balanced, by hand
def test_class_balanced_counts_what_it_has_seen_per_class():
    buf = ClassBalancedBuffer(2, seed=0)
    x, y = stream([0, 0, 1, 0, 2, 1])
    offer(buf, x, y, batch=4)
    assert buf.seen_per_class == {0: 3, 1: 2, 2: 1}
    state = buf.state_dict()
    assert state["seen_classes"].tolist() == [0, 1, 2] and state["seen_counts"].tolist() == [3, 2, 1]


def test_class_balanced_state_of_a_fresh_buffer_holds_long_tensors():
    state = ClassBalancedBuffer(3).state_dict()
    assert state["seen_classes"].dtype == torch.long and state["seen_counts"].dtype == torch.long
    assert state["seen_classes"].numel() == 0


def test_class_balanced_new_class_evicts_a_single_item_of_a_largest_class():
    """Capacity 2 holding one 0 and one 1: a 2 is not among the largest (counts 0 < 1), so it replaces
    the only item of a largest class (0 or 1, drawn among the tie)."""
    buf = ClassBalancedBuffer(2, seed=0)
    x, y = stream([0, 1, 2])
    buf.add(x=x, y=y)
    assert sorted(buf.all()["y"].tolist()) in ([0, 2], [1, 2])


def test_class_balanced_draws_only_from_its_own_generator():
    """The same seed gives the same contents whatever the global random state (ties and candidates
    drawn from the buffer's generator, not torch's global one)."""
    labels = [0] * 6 + [1] * 6 + [2] * 9 + [3] * 5
    x, y = stream(labels)
    contents = []
    for global_seed in range(4):
        torch.manual_seed(global_seed)
        buf = ClassBalancedBuffer(6, seed=1)
        offer(buf, x, y, batch=5)
        contents.append(buf.all()["x"][:, 0].tolist())
    assert all(c == contents[0] for c in contents), contents


def test_class_balanced_largest_class_item_replaces_slot_j_drawn_in_zero_to_seen():
    """Capacity 2 holding two 0s: a third 0 is of the largest class; it draws j in [0, 3) (3 seen) and
    replaces the j-th stored 0 if j < 2.  Seeds chosen (with the generator directly) so that j is 0,
    1 and 2: row 2 lands in slot 0, in slot 1, or nowhere."""
    def first_draw(seed):
        return int(torch.randint(0, 3, (1,), generator=torch.Generator().manual_seed(seed)))

    seeds = {}
    for seed in range(50):
        seeds.setdefault(first_draw(seed), seed)
    assert set(seeds) == {0, 1, 2}
    expected = {0: [2.0, 1.0], 1: [0.0, 2.0], 2: [0.0, 1.0]}
    for j, seed in seeds.items():
        buf = ClassBalancedBuffer(2, seed=seed)
        x, y = stream([0, 0, 0])
        buf.add(x=x, y=y)
        assert buf.all()["x"][:, 0].tolist() == expected[j], (j, seed)


def test_batched_insertion_stores_later_batches_in_the_first_batch_dtypes():
    """Fields are allocated with the first batch's dtypes; a later batch of other dtypes is cast on
    the way in, as the row-by-row writes cast each row."""
    buf, ref = ReservoirBuffer(4, seed=0), RowByRowReservoir(4, seed=0)
    first = {"x": torch.zeros(3, 2), "y": torch.zeros(3, dtype=torch.long)}
    later = {"x": torch.full((6, 2), 2.5, dtype=torch.float64), "y": torch.arange(1, 7, dtype=torch.int32)}
    for batch in (first, later):
        buf.add(**batch)
        ref.add(**batch)
    assert_same_state(buf, ref)
    assert buf.fields["x"].dtype == torch.float32 and buf.fields["y"].dtype == torch.long
    assert buf.all()["x"][3].tolist() == [2.5, 2.5]  # slot 3 was free: a row of the later batch is there
