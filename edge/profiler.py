"""EdgeProfiler: a Lightning Callback that records what each experience cost; it never changes results.

Per experience: training FLOPs (every op between `on_train_batch_start` and
`on_train_batch_end`, which spans `CLStrategy.training_step`: the forward passes,
replay and teacher passes, auxiliary losses, backward and the optimizer step),
inference FLOPs per sample, parameter counts, peak memory, wall time, samples/s, and
the Jetson training time (estimated, or measured on a Jetson). Lightning calls a
module's own `on_train_batch_end` after the callbacks', so what a strategy does there
(buffer insertion, EMA updates: elementwise, 0 FLOPs by the convention) is outside the
window and missing from the op trace's bytes.

FLOPs are counted on a few steps per step shape (phase, input batch shape, number of
trainable parameters, so freezing part of the network mid-fit starts a new shape): a shape
is counted until two consecutive counted steps agree, then its remaining steps are
extrapolated with that value. Once one shape of a phase has agreed with itself, the
phase's step cost is known not to vary from step to step within the experience, so
its other shapes (in practice the shorter last batch of an epoch) are counted once.
A phase whose step cost was constant from its first step on in the previous experience
starts the next one that way too: each of its shapes is counted once (the model may have
grown, so each experience is counted anew); one counted that way has confirmed nothing,
so the next experience confirms again (every other experience at least). Every
registered strategy's sampled totals are tested equal to counting every step.
`flops_method` says what happened: "exact" (every step counted), "sampled"
(extrapolated from confirmed shapes) or "sampled-mean" (a shape never agreed with
itself within `max_counted_per_shape`; its mean was used); each shape's `basis`
says how its count was confirmed.

Training work a strategy does outside `trainer.fit` (IOR's image inversion, run while it
prepares a task's data) is metered when the strategy loops over `CLStrategy.work_steps(label, n)`:
every step is timed, and its FLOPs are counted like a fit's (until two consecutive counts agree,
the rest extrapolated). Such work is part of the experience's `train_flops_exp`,
`train_time_s`, peak memory and Jetson estimate, and is itemised under `outside_fit`.

Counting slows the counted steps down (torch dispatches every op through Python), so
`train_time_s` is the measured fit time (`train_time_raw_s`) minus the counter's own
overhead (`flop_count_overhead_time_s`, not clamped), measured this way:

* a counted step that is not the first of its shape in the experience is "warm": the
  work it shares with the unprofiled run costs what the shape's uncounted steps cost, so
  its overhead is its time minus the median uncounted step time of its shape;
* the counter's overhead grows with the ops it dispatches, so it is expressed per op
  (the step's traced op count; per step where the counter keeps no trace):
  `flop_count_overhead_time_per_op_s` is the median over the experience's warm counted steps
  (of the same phase where it has some), or the run's last value for the phase when
  this experience has none (a phase known constant is counted once per shape);
* every counted step, first ones included, loses unit x its op count. The first step
  of a shape keeps its warm-up (first optimizer step, new kernel shapes, fresh
  pages), which an unprofiled run pays too: replacing first steps by an uncounted step
  time, as an earlier version did, dropped that warm-up and read 2.6-3.4% low.

`train_time_source` names the derivation: `measured:<host>:minus-counter-overhead`;
`...:counted-steps-as-median-uncounted` where no warm counted step exists in the run yet
(each counted step replaced by its shape's median uncounted step: warm-up dropped, a
slight underestimate); `...:as-measured` where nothing was counted or no estimate
exists (`flops="all"`: every step counted, none to compare with).
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from clbench.edge import memory
from clbench.reporting.results import describe_kind
from clbench.edge.flops import CONVENTION, Counter, StepProfile, torch_behaviour

WARMUP_STEPS = 20  # CUDA-event step timings start after this many steps of a fit


def _clock() -> float:
    """The profiler's time source for training time (a function, so tests can replace it)."""
    return time.perf_counter()


@dataclass
class _Shape:
    """Steps of one shape signature in the current experience."""

    steps: int = 0
    counted: list[int] = field(default_factory=list)
    profile: StepProfile | None = None
    phase_stable: bool = False  # its first count came after another shape of its phase agreed with itself
    counted_time: float = 0.0  # wall seconds of its counted steps
    plain_time: float = 0.0  # wall seconds of its other steps
    counted_times: list[float] = field(default_factory=list)  # each counted step's wall seconds
    counted_ops: list[int] = field(default_factory=list)  # each counted step's op count (1 without a trace)
    plain_times: list[float] = field(default_factory=list)
    overhead: float = 0.0  # counter overhead removed from its time (set at the experience's end)

    def add_counted(self, elapsed: float, total: int, profile) -> None:
        self.counted.append(total)
        self.profile = profile
        self.counted_time += elapsed
        self.counted_times.append(elapsed)
        self.counted_ops.append(max(profile.n_ops, 1) if profile is not None else 1)

    def add_plain(self, elapsed: float) -> None:
        self.plain_time += elapsed
        self.plain_times.append(elapsed)

    def warm_overheads(self) -> list[float]:
        """Counter overhead per op of its warm counted steps (all but its first), measured against
        the median of its uncounted steps."""
        if not self.plain_times or len(self.counted_times) < 2:
            return []
        base = statistics.median(self.plain_times)
        return [(t - base) / n for t, n in zip(self.counted_times[1:], self.counted_ops[1:])]

    @property
    def agreed(self) -> bool:
        return len(self.counted) >= 2 and self.counted[-1] == self.counted[-2]

    @property
    def stable(self) -> bool:
        return self.agreed or (self.phase_stable and len(self.counted) == 1)

    @property
    def basis(self) -> str:
        if len(self.counted) == self.steps:
            return "every step counted"
        if self.agreed:
            return "two consecutive equal counts"
        if self.stable:
            return "one count; its phase's step cost was confirmed constant (here or in the previous experience)"
        return f"mean of {len(self.counted)} unequal counts"

    @property
    def per_step(self) -> float:
        if not self.counted:
            return 0.0
        return self.counted[-1] if self.stable else sum(self.counted) / len(self.counted)

    @property
    def total(self) -> int:
        return int(round(sum(self.counted) + (self.steps - len(self.counted)) * self.per_step))


def _phases_constant_from_first_step(shapes: dict[tuple, _Shape]) -> set[str]:
    """Phases in which some shape's count agreed with itself and every such shape's first count
    was already the agreed one (a phase whose first step is special, like a replay method's
    first step before its buffer holds anything, is not among them)."""
    agreed: dict[str, bool] = {}
    for (phase, *_), shape in shapes.items():
        if shape.agreed:
            agreed[phase] = agreed.get(phase, True) and shape.counted[0] == shape.counted[-1]
    return {phase for phase, from_first in agreed.items() if from_first}


def _timed(hook):
    """Adds the hook's wall time to the profiler's own time (`profiler_time_s`), once when hooks nest."""

    @functools.wraps(hook)
    def timed(self, *args, **kwargs):
        if self._timing:
            return hook(self, *args, **kwargs)
        self._timing, t0 = True, time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self._own_time += time.perf_counter() - t0
            self._timing = False

    return timed


class EdgeProfiler(pl.Callback):
    """Cost records per experience; the runner brackets experiences with
    `start_experience(i)` / `end_experience(strategy)` and reads `totals()` at the end.

    flops: "sample" (default), "all" (count every step) or "off".
    device: Jetson profile for the time estimate (ignored on a real Jetson: it measures).
    planned_epochs: with a run truncated by `limit_train_batches` (`clbench profile --steps`),
        the epochs a full run would have, for the `*_planned` extrapolations.
    """

    def __init__(self, flops: str = "sample", device: str = "jetson-orin-nx-16gb", max_counted_per_shape: int = 8,
                 planned_epochs: int | None = None, power_mode: str | None = None, rss_interval_s: float = 0.01):
        if flops not in ("sample", "all", "off"):
            raise ValueError(f"flops={flops!r}; expected 'sample', 'all' or 'off'")
        self.flops_mode = flops
        self.device = device
        self.power_mode = power_mode
        self.max_counted_per_shape = max_counted_per_shape
        self.planned_epochs = planned_epochs
        self.records: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        self._shapes: dict[tuple, _Shape] = {}
        self._stable_phases: set[str] = set()
        self._run_steps: list[tuple[StepProfile, int]] = []
        self._traced_records = 0  # records this process traced (a resumed run restores the earlier ones)
        self._counter: Counter | None = None  # the one counting now
        self._step_counter: Counter | None = None
        self._step_shape: _Shape | None = None
        self._rss = memory.RssPeak(rss_interval_s)
        self._sample_input: tuple | None = None
        self._precision = "32-true"
        self._jetson = None
        self._jetson_checked = False
        self._tegrastats = None
        self._cuda = False
        self._own_time = 0.0
        self._timing = False
        self._trainable_numel: int | None = None  # of the current epoch
        self._overhead_unit: dict[str, float] = {}  # the run's last counter overhead per op, per phase

    # ------------------------------------------------------------------ experience bracket (runner)
    @_timed
    def start_experience(self, index: int) -> None:
        self._rss.reset()  # first: it collects garbage and trims the heap before reading the baseline
        self._current = {"experience": index, "train_time_s": 0.0, "samples": 0, "steps": 0,
                         "flop_count_time_s": 0.0, "planned_steps": 0, "_t0": _clock()}
        self._outside: dict[str, _Shape] = {}
        # a phase whose steps all cost the same in the previous experience, its first one included,
        # starts this one as stable: each of its shapes is counted once
        self._stable_phases = _phases_constant_from_first_step(self._shapes)
        self._shapes = {}
        self._cuda = torch.cuda.is_initialized()  # cheap; is_available() probes the driver
        if self._cuda:
            memory.cuda_reset()
        self._start_tegrastats()

    @_timed
    def end_experience(self, strategy) -> dict[str, Any]:
        rec = self._current if self._current is not None else {"experience": len(self.records)}
        self._stop_counter()
        rec["train_time_e2e_s"] = _clock() - rec.pop("_t0", _clock())
        rec["train_time_s"] = rec.get("train_time_s", 0.0) + sum(w.counted_time + w.plain_time for w in self._outside.values())
        self._remove_counting_time(rec)
        rec["samples_per_s"] = rec["samples"] / rec["train_time_s"] if rec.get("train_time_s") else None
        rec["train_time_source"] = f"measured:{_host_name()}:{rec['train_time_derivation']}"
        rec.setdefault("trainable_params", _trainable_params(strategy.parameters()))
        stored = strategy.stored_state() if hasattr(strategy, "stored_state") else []  # e.g. stored task adapters
        # a frozen teacher snapshot (LwF's, iCaRL's old model) serves training only: not part of the model
        teacher = {id(p): p.numel() for m in strategy.modules() if getattr(m, "frozen_snapshot", False) for p in m.parameters()}
        rec["total_params"] = (sum(p.numel() for p in strategy.parameters() if id(p) not in teacher)
                               + sum(t.numel() for t in stored))
        if teacher:
            rec["teacher_params"] = sum(teacher.values())
        if stored:
            rec["stored_state_bytes"] = sum(t.numel() * t.element_size() for t in stored)
        rec["fwd_flops_per_sample"] = self._inference_flops(strategy)
        report = strategy.report() if hasattr(strategy, "report") else {}
        if isinstance(report, dict) and "buffer_bytes" in report:
            rec["buffer_bytes"] = report["buffer_bytes"]
        self._flop_fields(rec)
        self._memory_fields(rec)
        work = [*self._shapes.values(), *self._outside.values()]
        rec["jetson"] = self._jetson_fields(rec, [(s.profile, s.steps) for s in work if s.profile is not None],
                                            planned=rec.get("planned_steps", 0))
        self._run_steps += [(s.profile, s.steps) for s in work if s.profile is not None]
        self._traced_records += 1
        self.records.append(rec)
        self._current = None
        return rec

    def totals(self) -> dict[str, Any]:
        recs = self.records
        out: dict[str, Any] = {
            "train_time_s": sum(r["train_time_s"] for r in recs),
            "train_time_raw_s": sum(r.get("train_time_raw_s", r["train_time_s"]) for r in recs),
            "flop_count_overhead_time_s": sum(r.get("flop_count_overhead_time_s", 0.0) for r in recs),
            "train_time_e2e_s": sum(r.get("train_time_e2e_s", 0.0) for r in recs),
            "train_time_derivation": "+".join(sorted({d for r in recs for d in
                                                       str(r.get("train_time_derivation", "as-measured")).split("+")})),
            "samples": sum(r["samples"] for r in recs),
            "steps": sum(r["steps"] for r in recs),
            "train_flops_total": sum(r.get("train_flops_exp") or 0 for r in recs) if self.flops_mode != "off" else None,
            "peak_memory_bytes": max((r.get("peak_memory_bytes") or 0 for r in recs), default=0),
            "peak_memory_kind": recs[-1].get("peak_memory_kind") if recs else None,
            "fwd_flops_per_sample": recs[-1].get("fwd_flops_per_sample") if recs else None,
            "trainable_params": recs[-1].get("trainable_params") if recs else None,
            "total_params": recs[-1].get("total_params") if recs else None,
        }
        out["train_time_source"] = f"measured:{_host_name()}:{out['train_time_derivation'] or 'as-measured'}"
        self._memory_totals(out)
        if recs and "ranks" in recs[-1]:  # DDP: FLOPs and samples are over all ranks, peak memory the largest rank's
            out["world_size"] = recs[-1]["ranks"]["world_size"]
            per_rank = [r["ranks"].get("peak_memory_bytes") or [] for r in recs if "ranks" in r]
            out["peak_memory_bytes_per_rank"] = [max((p[i] or 0 for p in per_rank if i < len(p)), default=0)
                                                 for i in range(out["world_size"])]
        # its hooks' own time plus what counting added inside the counted steps
        out["profiler_time_s"] = self._own_time + out["flop_count_overhead_time_s"]
        if recs and any("train_flops_exp_planned" in r for r in recs):
            out["train_flops_total_planned"] = sum(r.get("train_flops_exp_planned") or 0 for r in recs)
        out["samples_per_s"] = out["samples"] / out["train_time_s"] if out["train_time_s"] else None
        if len(recs) > self._traced_records and all("time_s" in (r.get("jetson") or {}) for r in recs):
            # a resumed run: the op traces of the experiences before the resume are not in the
            # checkpoint, but their records are; the estimate is additive over steps
            out["jetson"] = _summed_jetson([r["jetson"] for r in recs])
        else:
            out["jetson"] = self._jetson_fields(out, self._run_steps, planned=sum(r.get("planned_steps", 0) for r in recs))
        if self.flops_mode != "off":
            out["flops_convention"] = CONVENTION
            out["flop_counter"] = torch_behaviour()
        return out

    # ------------------------------------------------------------------ Lightning hooks
    # Lightning dispatches every hook of every step to each callback (a profiler context and a
    # name string per call); it skips a hook that is not callable, so the per-step hooks this
    # callback does not use are None instead of the base class's no-ops
    on_before_backward = on_after_backward = on_before_optimizer_step = on_before_zero_grad = None

    @_timed
    def on_fit_start(self, trainer, pl_module) -> None:
        if self._current is None:  # used outside the runner: one fit = one experience
            self.start_experience(len(self.records))
        self._cuda = pl_module.device.type == "cuda"
        self._precision = str(getattr(trainer, "precision", "32-true"))
        if self._cuda:
            torch.cuda.synchronize()
        self._fit_steps = 0
        self._events: list[tuple] = []
        self._rss.start()
        self._fit_t0 = _clock()

    @_timed
    def on_train_start(self, trainer, pl_module) -> None:
        # the parameters a fit trains are fixed when it starts (its optimizer holds them); which
        # of them are trainable may change from epoch to epoch
        self._fit_params = list(pl_module.parameters())
        self._current["trainable_params"] = _trainable_params(self._fit_params)
        try:
            per_epoch = len(trainer.train_dataloader)
        except TypeError:
            return
        phase = getattr(pl_module, "phase", None)
        epochs = getattr(phase, "epochs", None) or self.planned_epochs or trainer.max_epochs
        self._current["planned_steps"] += per_epoch * epochs

    @_timed
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._trainable_numel = None

    @_timed
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x = _batch_input(batch)
        if self._sample_input is None and x is not None:
            self._sample_input = (tuple(x.shape[1:]), x.dtype)
        phase = getattr(getattr(pl_module, "phase", None), "name", "")
        if self._trainable_numel is None:  # read here, after the module's own epoch-start hook may have (un)frozen parts
            self._trainable_numel = _trainable_params(self._fit_params)
        key = (phase, tuple(x.shape) if x is not None else (), self._trainable_numel)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape()
        shape.steps += 1
        count = self.flops_mode == "all" or (
            self.flops_mode == "sample" and not shape.stable and len(shape.counted) < self.max_counted_per_shape)
        self._step_shape = shape
        self._step_samples = _batch_len(batch, x)
        if count:
            if not shape.counted:
                shape.phase_stable = phase in self._stable_phases
            self._counter_phase = phase
            self._counter = self._counter_for_steps().start()
        elif self._cuda and self._fit_steps >= WARMUP_STEPS:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, None))
        self._step_t0 = _clock()  # the step itself: this hook's own time is counted apart

    @_timed
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        shape, elapsed = self._step_shape, _clock() - self._step_t0
        if self._counter is not None:
            self._counter.stop()
            shape.add_counted(elapsed, self._counter.total, self._counter.profile)
            if shape.agreed:
                self._stable_phases.add(self._counter_phase)
            self._counter = None
            self._current["flop_count_time_s"] += elapsed
        else:
            shape.add_plain(elapsed)
            if self._events and self._events[-1][1] is None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events[-1] = (self._events[-1][0], end)
        self._fit_steps += 1
        self._current["samples"] += self._step_samples
        self._current["steps"] += 1
        if not self._cuda and self._rss.needs_samples:
            self._rss.sample()  # a peak that lives for one step is seen even between thread samples

    @_timed
    def on_fit_end(self, trainer, pl_module) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self._current["train_time_s"] += _clock() - self._fit_t0
        self._rss.stop()
        times = [s.elapsed_time(e) / 1e3 for s, e in self._events if e is not None]
        if times:
            self._current.setdefault("_step_times", []).extend(times)

    def work_steps(self, label: str, n: int) -> Iterator[int]:
        """Yields 0..n-1 around the steps of training work done outside a fit (see the module
        docstring): each step is timed and, like a fit's steps, counted until two consecutive
        counts agree."""
        if self._current is None:  # outside an experience bracket there is no record to add to
            yield from range(n)
            return
        work = self._outside.setdefault(label, _Shape())
        self._rss.start()
        try:
            for i in range(n):
                count = self.flops_mode == "all" or (
                    self.flops_mode == "sample" and not work.agreed and len(work.counted) < self.max_counted_per_shape)
                counter = self._counter_for_steps().start() if count else None
                t0 = _clock()
                try:
                    yield i
                finally:
                    elapsed = _clock() - t0
                    work.steps += 1
                    if counter is not None:
                        counter.stop()
                        work.add_counted(elapsed, counter.total, counter.profile)
                    else:
                        work.add_plain(elapsed)
        finally:
            self._rss.stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_counter()
        self._rss.stop()

    # ------------------------------------------------------------------ record parts
    def _remove_counting_time(self, rec: dict[str, Any]) -> None:
        """`train_time_s` = measured time minus the FLOP counter's own overhead, measured on the
        warm counted steps (see the module docstring); nothing is clamped."""
        groups = [(k[0], s) for k, s in self._shapes.items()] + [(f"outside:{k}", w) for k, w in self._outside.items()]
        per_group: dict[str, list[float]] = {}
        for group, shape in groups:
            per_group.setdefault(group, []).extend(shape.warm_overheads())
        here = {g: statistics.median(v) for g, v in per_group.items() if v}
        everything_here = [x for v in per_group.values() for x in v]
        overhead, how, units = 0.0, set(), []
        for group, shape in groups:
            shape.overhead = 0.0
            if not shape.counted:
                continue
            unit = here.get(group)
            if unit is None and everything_here:
                unit = statistics.median(everything_here)
            if unit is None:
                unit = self._overhead_unit.get(group)
            if unit is None and self._overhead_unit:
                unit = statistics.median(self._overhead_unit.values())
            if unit is not None:
                shape.overhead, how = unit * sum(shape.counted_ops), how | {"minus-counter-overhead"}
                units.append(unit)
            elif shape.plain_times:  # no warm counted step anywhere yet: replace by the median uncounted step
                shape.overhead = shape.counted_time - len(shape.counted_times) * statistics.median(shape.plain_times)
                how.add("counted-steps-as-median-uncounted")
            else:  # every step of the shape counted and nothing to compare with: as measured
                how.add("as-measured")
            overhead += shape.overhead
        self._overhead_unit.update(here)
        rec["train_time_raw_s"] = rec.get("train_time_s", 0.0)
        rec["flop_count_overhead_time_s"] = overhead
        if units:
            rec["flop_count_overhead_time_per_op_s"] = statistics.median(units)
        rec["train_time_s"] = rec["train_time_raw_s"] - overhead
        rec["train_time_derivation"] = "+".join(sorted(how)) or "as-measured"

    def _memory_totals(self, out: dict[str, Any]) -> None:
        """The run's peak memory: the largest per-experience value, the process's peak RSS over the
        run and the RSS before the first experience (libraries, data and model loaded)."""
        recs = self.records
        if not recs:
            return
        peaks = [r["process_peak_rss_bytes"] for r in recs if r.get("process_peak_rss_bytes") is not None]
        if peaks:
            out["process_peak_rss_bytes"] = max(peaks)
        if recs[0].get("rss_baseline_bytes") is not None:
            out["rss_baseline_bytes"] = recs[0]["rss_baseline_bytes"]
        if out.get("peak_memory_kind"):
            out["peak_memory_definition"] = describe_kind(out["peak_memory_kind"])

    def _counter_for_steps(self) -> Counter:
        if self._step_counter is None:  # one per run: building a FlopCounterMode has a cost
            self._step_counter = Counter(trace=True)
        return self._step_counter

    def _stop_counter(self) -> None:
        if self._counter is not None:
            self._counter.stop()
            self._counter = None

    def _flop_fields(self, rec: dict[str, Any]) -> None:
        if self.flops_mode == "off":
            rec["flops_method"] = "off"
            return
        shapes = self._shapes
        uncounted = sum(s.steps - len(s.counted) for s in shapes.values())
        rec["train_flops_exp"] = sum(s.total for s in shapes.values()) + sum(w.total for w in self._outside.values())
        if self._outside:
            rec["outside_fit"] = {
                label: {"steps": w.steps, "counted": len(w.counted), "flops": w.total, "flops_step": int(round(w.per_step)),
                        "time_s": w.counted_time + w.plain_time - w.overhead, "basis": w.basis}
                for label, w in self._outside.items()
            }
        main = max(shapes.values(), key=lambda s: s.steps, default=None)
        rec["train_flops_step"] = int(round(main.per_step)) if main is not None else 0
        rec["flops_counted_steps"] = sum(len(s.counted) for s in shapes.values())
        if uncounted == 0:
            rec["flops_method"] = "exact"
        else:
            rec["flops_method"] = "sampled" if all(s.stable or len(s.counted) == s.steps for s in shapes.values()) else "sampled-mean"
        rec["flops_step_shapes"] = [
            {"phase": k[0], "input_shape": list(k[1]), "trainable_params": k[2], "steps": s.steps, "counted": len(s.counted),
             "flops_step": int(round(s.per_step)), "stable": s.stable, "basis": s.basis}
            for k, s in shapes.items()
        ]
        planned = rec.get("planned_steps", 0)
        if planned and planned != rec["steps"] and rec["steps"]:
            rec["train_flops_exp_planned"] = int(round(rec["train_flops_exp"] * planned / rec["steps"]))

    def _memory_fields(self, rec: dict[str, Any]) -> None:
        if self._cuda:
            rec.update(memory.cuda_peaks())
            rec["peak_memory_bytes"], rec["peak_memory_kind"] = rec["peak_alloc_bytes"], "cuda_allocator"
        else:
            rec["peak_rss_bytes"] = self._rss.peak_above_baseline
            rec["peak_memory_bytes"], rec["peak_memory_kind"] = rec["peak_rss_bytes"], "cpu_rss"
        # the host process on every device: its peak RSS during the experience and the RSS before it
        # (after garbage collection and a heap trim); on the CPU the rise is peak_rss_bytes
        rec["process_peak_rss_bytes"] = self._rss.peak
        rec["rss_baseline_bytes"] = self._rss.baseline
        rec["peak_rss_method"] = self._rss.method
        rec["rss_release_time_s"] = self._rss.release_s  # part of profiler_time_s
        rec["peak_memory_definition"] = describe_kind(rec["peak_memory_kind"])
        times = rec.pop("_step_times", None)
        if times:
            t = torch.tensor(times)
            rec["step_time_median_s"] = float(t.median())
            rec["step_time_iqr_s"] = float(t.quantile(0.75) - t.quantile(0.25))
        if self._tegrastats is not None:
            stats = self._tegrastats.stop()
            self._tegrastats = None
            rec["tegrastats"] = stats
            if "peak_system_ram_bytes" in stats:
                rec["peak_system_ram_bytes"] = stats["peak_system_ram_bytes"]

    def _inference_flops(self, strategy) -> int | None:
        """FLOPs of the final model's inference rule on one sample (RNG and train mode restored)."""
        if self.flops_mode == "off" or self._sample_input is None:
            return None
        shape, dtype = self._sample_input
        try:
            device = next(strategy.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        x = torch.zeros((1, *shape), dtype=dtype, device=device)
        predict = getattr(strategy, "predict", strategy)
        was_training = strategy.training
        strategy.eval()
        counter = self._counter_for_steps()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), counter:
                predict(x)
            return counter.total
        finally:
            strategy.train(was_training)

    # ------------------------------------------------------------------ Jetson
    def _detect_jetson(self):
        if not self._jetson_checked:
            from clbench.edge.devices import detect

            self._jetson, self._jetson_checked = detect(), True
        return self._jetson

    def _start_tegrastats(self) -> None:
        if self._detect_jetson() is None:
            return
        from clbench.edge.jetson import Tegrastats

        t = Tegrastats()
        self._tegrastats = t if t.start() else None

    def _jetson_fields(self, rec: dict[str, Any], steps, planned: int = 0) -> dict[str, Any] | None:
        info = self._detect_jetson()
        if info is not None and self._cuda:
            from clbench.edge.jetson import measured_label, power_mode_name

            mode = power_mode_name()
            out = {"device": info.profile or info.model, "model": info.model, "l4t": info.l4t, "power_mode": mode,
                   "time_s": rec["train_time_s"], "source": f"measured:{info.profile or info.model}:{mode}"}
            swap = (rec.get("tegrastats") or {}).get("swap_grew_mb", 0)
            if swap and swap > 0:
                out["valid"], out["reason"] = False, f"swap grew by {swap:.0f} MB during training; times are not trustworthy"
            out["label"] = measured_label(rec["train_time_s"])
            return out
        if not steps or self.device is None:
            return None
        from clbench.edge.jetson import Precision, estimate_train_time

        try:
            est = estimate_train_time(steps, self.device, self.power_mode, Precision.current(self._precision))
        except Exception as e:  # a report must never end a run
            return {"device": self.device, "error": f"{type(e).__name__}: {e}"}
        out = est.to_dict()
        done = sum(n for _, n in steps)
        if planned and done and planned != done:
            out["planned_time_s"] = est.time_s * planned / done
            out["planned_low_s"], out["planned_high_s"] = est.low_s * planned / done, est.high_s * planned / done
        return out


def _summed_jetson(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's Jetson time as the sum of its experiences' (estimated or measured) times."""
    out = {k: v for k, v in parts[-1].items() if k not in ("per_step_s", "label", "planned_time_s", "planned_low_s",
                                                             "planned_high_s")}
    for key in ("time_s", "low_s", "high_s"):
        if all(key in p for p in parts):
            out[key] = sum(p[key] for p in parts)
    out["summed_experiences"] = len(parts)
    from clbench.edge.jetson import estimate_label, measured_label

    if str(out.get("source", "")).startswith("estimated"):
        out["label"] = estimate_label(out["time_s"], out["band"], out["low_s"], out["high_s"])
    else:
        out["label"] = measured_label(out["time_s"])
    return out


def combine_rank_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One experience's record of a DDP run from every rank's own (rank 0's first): training FLOPs
    and samples summed over ranks (the run's total work), peak memory and times the largest rank's
    (the run waits for its slowest rank), each rank's values kept under `ranks`. Per-step and
    per-device fields (`train_flops_step`, `steps`, the Jetson estimate: one device's share of the
    work) stay rank 0's."""
    out = dict(records[0])
    ranks: dict[str, Any] = {"world_size": len(records)}
    for key in ("train_flops_exp", "train_flops_exp_planned", "samples", "peak_memory_bytes", "train_time_s",
                "train_time_e2e_s", "train_time_raw_s", "process_peak_rss_bytes"):
        values = [r.get(key) for r in records]
        if all(v is None for v in values):
            continue
        ranks[key] = values
        known = [v for v in values if v is not None]
        if key in ("train_flops_exp", "train_flops_exp_planned", "samples"):
            out[key] = sum(known) if len(known) == len(values) else None
        else:
            out[key] = max(known)
    if out.get("train_time_s"):
        out["samples_per_s"] = (out.get("samples") or 0) / out["train_time_s"]
    out["ranks"] = ranks
    return out


class NullProfiler:
    """Records nothing and hooks nothing (runs with `RunConfig(profile=False)`); not a Callback,
    so Trainers do not even dispatch hooks to it."""

    def start_experience(self, index: int) -> None:
        pass

    def end_experience(self, strategy) -> dict[str, Any]:
        return {}

    def totals(self) -> dict[str, Any]:
        return {}

    def work_steps(self, label: str, n: int) -> Iterator[int]:
        return iter(range(n))


def _batch_input(batch) -> torch.Tensor | None:
    x = getattr(batch, "x", None)
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        return next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return None


def _trainable_params(params) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def _batch_len(batch, x: torch.Tensor | None) -> int:
    """Samples in a batch whose input tensor `_batch_input` found to be `x`."""
    if hasattr(batch, "x") and hasattr(batch, "__len__"):
        return len(batch)
    return 0 if x is None else len(x)


def _host_name() -> str:
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_name(0)
    return _cpu_name()


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    import platform

    return f"cpu:{platform.processor() or platform.machine()}"
