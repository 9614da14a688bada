"""One run across processes (Lightning DDP): ranks, sharded training data, and strategy state kept equal.

Lightning starts the other ranks itself (`--trainer-strategy ddp`: it re-runs the command with
`LOCAL_RANK` set; under SLURM `srun` starts every rank). Every rank then runs the whole experience
loop: the same scenario, class order, model and seeds, so everything computed outside a fit is
computed identically on every rank. What differs is only inside a fit:

- Training data: each global batch (`batch_size` x world size samples, the batch a single
  process with that batch size would draw, in the same order, from the same loader seed) is cut
  into `world_size` contiguous parts, one per rank (`ShardedBatchSampler`); no sample is padded
  or repeated (a last global batch smaller than the world size joins the one before it).
- Batch-level state: a buffer insertion made inside a training epoch gathers the rows of every
  rank first (`gather_rows`, in rank order: the single-process batch order), so every rank makes
  the same insertions with the same random draws. A replay draw inside an epoch takes this
  rank's part of one global draw of `n x world_size` rows (`replay_batch_size` is per device).
- Sums a strategy accumulates in its steps (`CLStrategy.distributed_sums`: EWC's Fisher,
  SimpleCIL's class sums) are summed over ranks after each fit (`sum_over_ranks`).
- After each fit, BatchNorm buffers are taken from rank 0 (DDP's own rule: it broadcasts
  rank 0's buffers before every forward) and, within a fit, each rank draws random numbers
  (augmentation, dropout) from its own stream (`rank_streams`), after which the shared stream
  continues identically on every rank.
- After every experience the whole strategy state (state_dict and extra_state) is fingerprinted
  on every rank (`ensure_identical`); a strategy whose state still differs gets rank 0's state
  (a warning names the keys, and the result's `environment.distributed.resynced` lists them).

Only global rank 0 writes (results, resume state, logs): `is_global_zero()`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

log = logging.getLogger("clbench")

# what the settings check's Trainer said before any process group exists
_configured = {"world_size": 1, "global_rank": 0, "local_rank": 0}
_in_epoch = False  # inside a training epoch of a fit on sharded data
RANK_STATE_ENV = "CLBENCH_RANK_STATE_DIR"  # tests: every rank writes its final strategy state there


# --------------------------------------------------------------------------- who am I
def configure(trainer) -> None:
    """Remember world size and ranks from a Trainer built with the run's settings (Lightning's
    cluster detection: its own launcher's LOCAL_RANK/NODE_RANK, SLURM, torchelastic, ...)."""
    _configured.update(world_size=int(trainer.world_size), global_rank=int(trainer.global_rank),
                       local_rank=int(trainer.local_rank))


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes of this run (1 for a run that does not use DDP, even in a process that joined a group)."""
    return _configured["world_size"]


def global_rank() -> int:
    return torch.distributed.get_rank() if active() else _configured["global_rank"]


def local_rank() -> int:
    return _configured["local_rank"]


def is_global_zero() -> bool:
    """Whether this process writes the run's files (results, resume state, logs)."""
    return global_rank() == 0


def active() -> bool:
    """This run spans processes and their group exists: collectives can run."""
    return _configured["world_size"] > 1 and initialized()


def in_sharded_epoch() -> bool:
    """Inside a training epoch whose batches are this rank's shard of the global batch."""
    return _in_epoch and active()


def reset() -> None:
    """Back to one process (tests run several runs in one process)."""
    global _in_epoch
    _configured.update(world_size=1, global_rank=0, local_rank=0)
    _in_epoch = False


def describe(batch_size: int) -> dict[str, Any]:
    """What the result's `environment.distributed` records: the batch size is per device."""
    w = world_size()
    return {"world_size": w, "per_device_batch_size": batch_size, "global_batch_size": batch_size * w,
            "backend": torch.distributed.get_backend() if initialized() else None, "resynced": []}


# --------------------------------------------------------------------------- sharded data
class ShardedBatchSampler(Sampler):
    """This rank's part of each global batch. The global batches are those of a single-process
    loader with batch size `per_device x world` on the same generator (the same permutation per
    epoch, drawn from `generator` exactly as `DataLoader(shuffle=True, generator=...)` draws it);
    each is cut into `world` contiguous parts of sizes differing by at most one. A last global
    batch with fewer samples than ranks joins the one before it; a dataset with fewer samples
    than ranks is the one case where a rank repeats samples."""

    def __init__(self, n: int, per_device: int, rank: int, world: int, *, shuffle: bool,
                 generator: torch.Generator | None = None, drop_last: bool = False):
        self.n, self.rank, self.world = n, rank, world
        self.global_batch = per_device * world
        base = RandomSampler(range(n), generator=generator) if shuffle else SequentialSampler(range(n))
        self.batches = BatchSampler(base, self.global_batch, drop_last)
        self.drop_last = drop_last

    def __len__(self) -> int:
        full, tail = divmod(self.n, self.global_batch)
        if self.drop_last or tail == 0:
            return max(full, 0)
        return full + (1 if (tail >= self.world or full == 0) else 0)

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.batches)
        if len(batches) > 1 and len(batches[-1]) < self.world:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        for b in batches:
            if len(b) < self.world:  # fewer samples than ranks in the whole dataset
                b = (b * self.world)[: self.world]
            yield list(_split(b, self.world)[self.rank])


def _split(items: Sequence[int], parts: int) -> list[Sequence[int]]:
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for r in range(parts):
        size = base + (1 if r < extra else 0)
        out.append(items[start:start + size])
        start += size
    return out


def sharded_loader(dataset, batch_size: int, *, seed: int, num_workers: int = 0):
    """The training loader of one phase on this rank (`make_loader`'s settings, sharded)."""
    from torch.utils.data import DataLoader

    from clbench.datasets import collate

    generator = torch.Generator().manual_seed(seed)
    sampler = ShardedBatchSampler(len(dataset), batch_size, global_rank(), world_size(), shuffle=True, generator=generator)
    return DataLoader(dataset, batch_sampler=sampler, generator=generator, num_workers=num_workers,
                      collate_fn=collate, persistent_workers=num_workers > 0)


def sharded_epochs_callback():
    """A Lightning callback marking the training epochs of a sharded fit (`in_sharded_epoch`). Lightning
    calls callbacks before the module's own hook of the same name, so the module's
    `on_train_batch_end` of the last batch runs inside the scope and its `on_train_epoch_end` outside."""
    import pytorch_lightning as pl

    class ShardedEpochs(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            _set_in_epoch(True)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            _set_in_epoch(False)

        def on_train_end(self, trainer, pl_module) -> None:
            _set_in_epoch(False)

        def on_exception(self, trainer, pl_module, exception) -> None:
            _set_in_epoch(False)

    return ShardedEpochs()


def _set_in_epoch(value: bool) -> None:
    global _in_epoch
    _in_epoch = value


def fit_without_wrapper_if_frozen(trainer, module) -> None:
    """A fit that trains nothing (SimpleCIL's statistics pass: no parameter requires a gradient) runs
    its ranks unwrapped: DDP refuses a module without trainable parameters, and there is nothing
    for it to synchronise (the statistics are summed after the fit, `sum_over_ranks`)."""
    if any(p.requires_grad for p in module.parameters()):
        return
    strategy = trainer.strategy
    if hasattr(strategy, "_setup_model"):
        strategy._setup_model = lambda model: model


# --------------------------------------------------------------------------- collectives
def _comm_device(like: torch.Tensor | None = None) -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_comm(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to(_comm_device())
    return t.to(torch.uint8) if t.dtype == torch.bool else t


def gather_rows(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows of every rank's `fields` (equal first dimension per rank), concatenated in rank
    order, on the CPU; each rank may hold a different number of rows."""
    world = torch.distributed.get_world_size()
    first = next(iter(fields.values()))
    n = torch.tensor([len(first)], dtype=torch.long, device=_comm_device())
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes_ = [int(s) for s in sizes]
    longest = max(sizes_)
    out = {}
    for key, value in fields.items():
        v = _to_comm(value)
        if len(v) < longest:
            v = torch.cat([v, v.new_zeros((longest - len(v), *v.shape[1:]))])
        parts = [torch.empty_like(v) for _ in range(world)]
        torch.distributed.all_gather(parts, v.contiguous())
        rows = torch.cat([p[:s] for p, s in zip(parts, sizes_)]).cpu()
        out[key] = rows.to(torch.bool) if value.dtype == torch.bool else rows
    return out


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on some rank (every rank must call it); `flag` itself without DDP."""
    if not in_sharded_epoch():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        torch.distributed.barrier()


# --------------------------------------------------------------------------- state kept equal
def _resolve(owner: Any, path: str) -> tuple[Any, str]:
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, name


def snapshot_sums(strategy) -> dict[str, Any]:
    """The values of the strategy's `distributed_sums` before a fit (what the fit adds is summed over ranks)."""
    out = {}
    for path in getattr(strategy, "distributed_sums", ()):
        owner, name = _resolve(strategy, path)
        value = getattr(owner, name)
        if isinstance(value, torch.Tensor):
            out[path] = value.detach().clone()
        elif isinstance(value, dict):
            out[path] = {k: v.detach().clone() for k, v in value.items()}
        else:
            out[path] = value
    return out


def sum_over_ranks(strategy, before: dict[str, Any]) -> None:
    """Each of the strategy's `distributed_sums` becomes its value before the fit plus the sum over
    ranks of what each rank added during it (every rank ends with the same value)."""
    if not active():
        return
    for path in getattr(strategy, "distributed_sums", ()):
        owner, name = _resolve(strategy, path)
        value, old = getattr(owner, name), before.get(path)
        if isinstance(value, torch.Tensor):
            new = _summed(value, old)
            if name in getattr(owner, "_buffers", {}):
                owner._buffers[name] = new
            else:
                setattr(owner, name, new)
        elif isinstance(value, dict):
            keys = sorted(value)
            setattr(owner, name, {k: _summed(value[k], (old or {}).get(k)) for k in keys})
        else:
            delta = torch.tensor([float(value) - float(old or 0)], dtype=torch.float64, device=_comm_device())
            torch.distributed.all_reduce(delta)
            total = (old or 0) + delta.item()
            setattr(owner, name, type(value)(round(total)) if isinstance(value, int) else total)


def _summed(value: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    base = old.to(value.device) if old is not None and old.shape == value.shape else torch.zeros_like(value)
    delta = (value.detach() - base).to(_comm_device())
    torch.distributed.all_reduce(delta)
    return (base + delta.to(value.device)).to(value.dtype)


def sync_batchnorm_buffers(strategy) -> None:
    """Rank 0's BatchNorm running statistics on every rank (DDP broadcasts them before each forward,
    so after a fit only the last step's update differs)."""
    if not active():
        return
    for module in strategy.modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            for name, buf in module._buffers.items():
                if buf is not None:
                    t = buf.detach().to(_comm_device())
                    torch.distributed.broadcast(t, src=0)
                    buf.copy_(t.to(buf.device))


@contextmanager
def rank_streams(seed_from_shared: bool = True):
    """Within a fit each rank draws from its own torch stream (augmentation, dropout differ across
    ranks, as they would across the samples of one large batch); the shared stream is restored
    after it, the same on every rank."""
    if not active():
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        base = int(torch.randint(0, 2**31 - 1, (1,)))
        torch.manual_seed(base * 1009 + global_rank())
        yield


def fingerprints(strategy) -> dict[str, str]:
    """A digest of every tensor of the strategy's state (`state_dict` and `extra_state`)."""
    out = {}
    items = [(f"model.{k}", v) for k, v in strategy.state_dict().items()]
    items += [(f"extra.{k}", v) for k, v in strategy.extra_state().items()]
    for key, value in items:
        t = value.detach().cpu().contiguous()
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        out[key] = h.hexdigest()
    return out


def ensure_identical(strategy, where: str, prepare_modules) -> list[str]:
    """Compare the strategy state across ranks; where it differs, load rank 0's state everywhere and
    warn. Returns the keys that differed (empty: identical, the exact case)."""
    if not active():
        return []
    mine = fingerprints(strategy)
    every = all_gather_object(mine)
    differing = sorted({k for other in every for k in set(other) | set(every[0]) if other.get(k) != every[0].get(k)})
    if not differing:
        return []
    if is_global_zero():
        log.warning("DDP: strategy %s state differs across ranks %s (%s); every rank continues with rank 0's",
                    type(strategy).__name__, where, ", ".join(differing[:8]) + (" ..." if len(differing) > 8 else ""))
    state = broadcast_object(({k: v.detach().cpu() for k, v in strategy.state_dict().items()},
                              {k: v.detach().cpu() for k, v in strategy.extra_state().items()}) if is_global_zero() else None)
    if not is_global_zero():
        prepare_modules(strategy, state[0])  # grown heads, snapshots, buffers at rank 0's shapes
        strategy.load_state_dict(state[0], strict=True)
        strategy.load_extra_state(state[1])
    return differing


def sync_rng() -> None:
    """Rank 0's torch, python and numpy random states on every rank."""
    if not active():
        return
    import random

    import numpy as np

    states = broadcast_object((torch.get_rng_state(), random.getstate(), np.random.get_state()))
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])


def dump_rank_state(strategy, result) -> None:
    """Tests: with $CLBENCH_RANK_STATE_DIR set, every rank writes its strategy state and accuracy rows."""
    folder = os.environ.get(RANK_STATE_ENV)
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    state = {f"model.{k}": v.detach().cpu() for k, v in strategy.state_dict().items()}
    state.update({f"extra.{k}": v.detach().cpu() for k, v in strategy.extra_state().items()})
    rows = [[v if not (isinstance(v, float) and math.isnan(v)) else -1.0 for v in r] for r in result.accuracy_matrix]
    state["accuracy_matrix"] = torch.tensor(rows, dtype=torch.float64)
    torch.save(state, os.path.join(folder, f"rank-{global_rank()}.pt"))


def finish() -> None:
    """End of a run: every rank waits for the others (the process group stays for a next run, --seeds)."""
    _set_in_epoch(False)
    barrier()
