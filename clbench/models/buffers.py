"""Rehearsal buffers: fixed-capacity tensor stores with reservoir or class-balanced insertion.

A buffer holds named fields (`x`, `y`, and any extras such as `logits`) as preallocated
tensors, so its whole state is a tensor state dict (resumable with
`torch.load(weights_only=True)`).  It draws from its own random generator, so replay
does not perturb, and is not perturbed by, the model's random stream.

Under DDP (`clbench.distributed`), inside a training epoch on sharded data, `add` first
gathers the batch of every rank (in rank order) so every rank inserts the same rows with the
same draws, and `sample(n)` returns this rank's part of one draw of `n x world_size` rows
(the draw a single process with that replay batch would make); elsewhere both act as in one process.
"""

from __future__ import annotations

import torch

from clbench import distributed
from clbench.errors import UsageError


class ReservoirBuffer:
    """Reservoir sampling (Vitter's algorithm R): after N insertions each item is kept with probability M/N."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise UsageError(f"buffer_size={capacity} is invalid; expected an integer >= 0")
        self.capacity = int(capacity)
        self.num_seen = 0
        self.size = 0
        self.fields: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    @property
    def is_empty(self) -> bool:
        return self.size == 0

    # --- insertion -------------------------------------------------------
    def add(self, **batch: torch.Tensor) -> None:
        """Offer every row of the batch (fields of equal first dimension) to the buffer."""
        if self.capacity == 0:
            return
        if distributed.in_sharded_epoch():
            batch = distributed.gather_rows(batch)
        batch = {k: v.detach().cpu() for k, v in batch.items()}
        self._allocate(batch)
        self._insert(batch)

    def _insert(self, batch: dict[str, torch.Tensor]) -> None:
        """Algorithm R over the batch's rows in order: the first rows fill the free slots, each later
        row t (counting every row ever offered) draws j in [0, t] and replaces slot j if j < capacity.
        The draws and the contents are those of a row-by-row insertion (one `randint(0, t + 1)` per
        row, each row written as it comes), computed for the whole batch at once: per-row calls and
        writes were most of the buffer's share of a small network's replay step.  When two rows of
        a batch draw the same slot the later one wins, as it would have overwritten the earlier."""
        n = len(batch["y"])
        fill = max(0, min(n, self.capacity - self.num_seen))
        row_of_slot = {self.num_seen + i: i for i in range(fill)}
        bounds = torch.arange(self.num_seen + fill + 1, self.num_seen + n + 1)
        for i, j in enumerate(randint_each(bounds, self.generator).tolist(), start=fill):
            if j < self.capacity:
                row_of_slot[j] = i
        self.num_seen += n
        if not row_of_slot:
            return
        slots = torch.tensor(list(row_of_slot), dtype=torch.long)
        rows = torch.tensor(list(row_of_slot.values()), dtype=torch.long)
        for k, v in batch.items():
            self.fields[k][slots] = v[rows].to(self.fields[k].dtype)
        self.size = max(self.size, max(row_of_slot) + 1)

    def _allocate(self, batch: dict[str, torch.Tensor]) -> None:
        for k, v in batch.items():
            if k not in self.fields:
                self.fields[k] = torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype)

    def clear(self) -> None:
        """Empty the buffer and restart the seen-counter (the allocation is kept)."""
        self.size = 0
        self.num_seen = 0

    def replace(self, **fields: torch.Tensor) -> None:
        """Set the whole contents at once (methods that rebuild their memory at task ends, e.g. by herding)."""
        n = len(fields["y"])
        if n > self.capacity:
            raise ValueError(f"{n} items do not fit a buffer of capacity {self.capacity}")
        fields = {k: v.detach().cpu() for k, v in fields.items()}
        self.fields = {}
        self._allocate(fields)
        for k, v in fields.items():
            self.fields[k][:n] = v
        self.size = n

    # --- reading ---------------------------------------------------------
    def sample(self, n: int, device=None) -> dict[str, torch.Tensor]:
        """`n` rows drawn uniformly without replacement (all rows if fewer are stored)."""
        perm = torch.randperm(self.size, generator=self.generator)
        world = distributed.world_size() if distributed.in_sharded_epoch() else 1
        total = min(n * world, self.size)
        if world > 1 and total >= world:  # this rank's part of the global draw
            base, extra = divmod(total, world)
            rank = distributed.global_rank()
            start = rank * base + min(rank, extra)
            idx = perm[start : start + base + (1 if rank < extra else 0)]
        else:
            idx = perm[: min(n, self.size)]
        # index_select: the rows advanced indexing would give, in about half its time on small tensors
        rows = {k: v.index_select(0, idx) for k, v in self.fields.items()}
        return rows if device is None else {k: v.to(device) for k, v in rows.items()}

    def all(self, device=None) -> dict[str, torch.Tensor]:
        return {k: v[: self.size].to(device) if device is not None else v[: self.size] for k, v in self.fields.items()}

    def class_counts(self) -> dict[int, int]:
        if self.size == 0:
            return {}
        labels, counts = torch.unique(self.fields["y"][: self.size], return_counts=True)
        return {int(c): int(n) for c, n in zip(labels, counts)}

    def nbytes(self) -> int:
        return sum(v[: self.size].numel() * v.element_size() for v in self.fields.values())

    # --- state -----------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"field.{k}": v.clone() for k, v in self.fields.items()}
        state["num_seen"] = torch.tensor(self.num_seen)
        state["size"] = torch.tensor(self.size)
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.fields = {k[len("field."):]: v.clone() for k, v in state.items() if k.startswith("field.")}
        self.num_seen = int(state["num_seen"])
        self.size = int(state["size"])
        self.generator.set_state(state["generator"])


class ClassBalancedBuffer(ReservoirBuffer):
    """Class-balanced reservoir (CBRS, Chrysakis & Moens 2020).

    While not full, every item is stored.  When full, an item of a class that is not
    among the largest in the buffer replaces a random item of the largest class; an
    item of a largest class replaces a random item of its own class with probability
    (stored of that class) / (seen of that class), reservoir-style within the class.
    Counts of the classes therefore differ by at most one once enough items are seen.
    """

    def __init__(self, capacity: int, seed: int = 0):
        super().__init__(capacity, seed)
        self.seen_per_class: dict[int, int] = {}

    def _insert(self, batch: dict[str, torch.Tensor]) -> None:
        """Row by row: each decision reads the class counts the previous row left."""
        for i in range(len(batch["y"])):
            slot = self._slot_for(int(batch["y"][i]))
            self.num_seen += 1
            if slot is not None:
                for k, v in batch.items():
                    self.fields[k][slot] = v[i]
                self.size = max(self.size, slot + 1)

    def _slot_for(self, label: int) -> int | None:
        self.seen_per_class[label] = self.seen_per_class.get(label, 0) + 1
        if self.num_seen < self.capacity:
            return self.num_seen
        labels = self.fields["y"][: self.size]
        counts = self.class_counts()
        largest = max(counts.values())
        if counts.get(label, 0) < largest:
            # evict from one of the largest classes, chosen at random among ties
            big = [c for c, n in counts.items() if n == largest]
            victim_class = big[int(torch.randint(0, len(big), (1,), generator=self.generator))]
            candidates = torch.nonzero(labels == victim_class).flatten()
            return int(candidates[torch.randint(0, len(candidates), (1,), generator=self.generator)])
        stored = counts[label]
        j = int(torch.randint(0, self.seen_per_class[label], (1,), generator=self.generator))
        if j < stored:
            candidates = torch.nonzero(labels == label).flatten()
            return int(candidates[j])
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        classes = sorted(self.seen_per_class)
        state["seen_classes"] = torch.tensor(classes, dtype=torch.long)
        state["seen_counts"] = torch.tensor([self.seen_per_class[c] for c in classes], dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.seen_per_class = {
            int(c): int(n) for c, n in zip(state["seen_classes"].tolist(), state["seen_counts"].tolist())
        }


# Below this bound torch's CPU `randint(0, b)` is one 32-bit Mersenne-Twister word modulo b
# (from it on, two words make a 64-bit number).
ONE_WORD_BOUND = 2**28


def randint_each(bounds: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One integer in [0, b) per bound b, in order: the values `torch.randint(0, b, (1,))` called once
    per bound would give, leaving `generator` where those calls would, in two calls instead of len(bounds).

    Each call reads one 32-bit word w = h * 2**24 + low and returns w mod b.  Two draws of all the
    words from the same generator state give low = w mod 2**24 and w mod 257 = (low - h) mod 257
    (as 2**24 = -1 mod 257), so h = (low - w mod 257) mod 257, unique since 0 <= h < 256."""
    if len(bounds) == 0:
        return torch.zeros(0, dtype=torch.long)
    if int(bounds.max()) >= ONE_WORD_BOUND:  # two words a number: one call per bound
        return torch.tensor([int(torch.randint(0, b, (1,), generator=generator)) for b in bounds.tolist()])
    start = generator.get_state()
    low = torch.randint(0, 2**24, (len(bounds),), generator=generator)
    generator.set_state(start)
    mod_257 = torch.randint(0, 257, (len(bounds),), generator=generator)
    words = (low - mod_257) % 257 * 2**24 + low
    return words % bounds


def herding_selection(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of `m` rows chosen greedily so the running mean of the chosen rows tracks the mean
    of all rows (iCaRL's herding, Welling 2009); the order is the selection order, so any
    prefix is itself a herding selection and shrinking a class keeps its first rows."""
    features = features.detach().double()
    target = features.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool)
    for k in range(min(m, len(features))):
        cost = (target - (running + features) / (k + 1)).norm(dim=1)
        cost[~available] = float("inf")
        i = int(cost.argmin())
        chosen.append(i)
        available[i] = False
        running += features[i]
    return torch.tensor(chosen, dtype=torch.long)


def make_buffer(capacity: int, policy: str = "reservoir", seed: int = 0) -> ReservoirBuffer:
    policies = {"reservoir": ReservoirBuffer, "class_balanced": ClassBalancedBuffer}
    if policy not in policies:
        raise UsageError(f"buffer_policy={policy!r} is invalid; expected one of: {', '.join(policies)}")
    return policies[policy](capacity, seed)
