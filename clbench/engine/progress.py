"""What `clbench run` prints while it trains: one bar (or plain lines) per phase, a line per experience.

On a terminal each fit (each phase of each experience: train, fisher, calibration, ...) gets its own
tqdm bar, labelled with the experience, the phase and the epoch, created with its total known (no
`0it` flash) and cleared when the phase ends. When the output is not a terminal (piped to a file, a
batch job's log) nothing is redrawn: one plain line per epoch. After every experience one line
stays: how long it took, the row of the accuracy matrix on the experiences seen so far (%), the
task's headline metric so far and the whole run's remaining time (mean time per finished
experience times the experiences left). Only rank 0 of a distributed run prints.

`experience_row` and `summary_so_far` are shared with the wandb mirror (`clbench.engine.loggers`):
they ask the result's task (`clbench.tasks.task_of`) what to show and never branch on its name.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import fields
from typing import Any, TextIO

import pytorch_lightning as pl


# --------------------------------------------------------------------------- what an experience scored
def experience_row(result, index: int) -> list[float] | None:
    """The accuracy-matrix row after experience `index` on the experiences seen so far, in %; None for a task
    whose matrix is not an accuracy (forecasting errors) or when the row is not there."""
    from clbench.tasks import task_of

    if not task_of(result).plots_accuracy_matrix or index >= len(result.accuracy_matrix):
        return None
    return [100.0 * v for v in result.accuracy_matrix[index][: index + 1]]


def summary_so_far(result) -> list[tuple[Any, float]]:
    """(leaderboard column, value as displayed) for each of the task's metric columns, computed on the rows
    recorded so far (the summary a run that stopped here would have); the headline column first.

    Works on a copy: the task's `finish` fills in metrics (and adds keys to its own record), the result
    itself is left as the runner keeps it. A display must never stop a training run, so a summary that
    cannot be computed yet (a metric that needs two rows, ...) is left out."""
    from clbench.tasks import task_of

    task = task_of(result)
    if not task.rows_recorded(result):
        return []
    partial = copy.copy(result)
    for f in fields(result):  # the task's own record (a dict) gains keys in `finish`: copy those
        value = getattr(result, f.name)
        if isinstance(value, dict):
            setattr(partial, f.name, dict(value))
    try:
        task.finish(partial)
    except Exception:  # noqa: BLE001 - see the docstring: no summary yet, nothing shown
        return []
    out = []
    for column in sorted(task.columns(), key=lambda c: c.key != task.headline):
        try:
            value = column.get(partial)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(value, (int, float)) and not math.isnan(value):
            out.append((column, value * column.scale))
    return out


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_count(n: int) -> str:
    """12345 -> '12.3k', 11689512 -> '11.7M'."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- the callback
class ProgressBar(pl.Callback):
    """Progress of one run: pass it in `callbacks` and its `on_experience` as the runner's `on_experience`.

    `file` is where it writes (default stdout, where Lightning's own bar writes too: stderr stays for
    errors); `tty` overrides the terminal check (tests)."""

    def __init__(self, spec, file: TextIO | None = None, tty: bool | None = None):
        self.spec = spec
        self.file = file or sys.stdout
        self.tty = _is_tty(self.file) if tty is None else tty
        self.bar = None
        self.created = time.perf_counter()
        self.training_started: float | None = None  # first fit of this process (resumed runs skip some)
        self.first_experience: int | None = None
        self.experience_started: float | None = None
        self.experience_index: int | None = None
        self.num_experiences: int | None = None
        self.finished: list[float] = []  # seconds each finished experience took
        self._epoch_t0 = 0.0
        self._loss_sum = 0.0
        self._loss_n = 0

    # ------------------------------------------------------------------ output
    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def announce(self) -> None:
        """Before `run`: what is being set up (the scenario's data and the model take a while)."""
        s = self.spec
        backbone = f" (backbone {s.run.backbone})" if s.run.backbone else ""
        aux = "".join(f"+{n}" for n, _ in s.aux)
        self._say(f"{s.strategy}{aux} on {s.scenario}, seed {s.seed}: loading the scenario's data and building the "
                  f"model{backbone} ...")

    @staticmethod
    def _rank_zero(trainer) -> bool:
        return getattr(trainer, "is_global_zero", True)

    def _where(self, pl_module, trainer=None) -> str:
        """`exp 2/5 fisher` (and `epoch 1/3` when `trainer` is given)."""
        exp = pl_module.experience
        phase = getattr(pl_module.phase, "name", None) or "train"
        where = phase if exp is None else f"exp {exp.index + 1}/{exp.num_experiences} {phase}"
        return where if trainer is None else f"{where} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer, pl_module) -> None:
        if not self._rank_zero(trainer):
            return
        exp = pl_module.experience
        now = time.perf_counter()
        if self.training_started is None:
            self.training_started = now
            first = exp.index + 1 if exp is not None else 1
            n = exp.num_experiences if exp is not None else "?"
            resumed = f", resuming at experience {first}" if first > 1 else ""
            params = sum(p.numel() for p in pl_module.parameters())
            self._say(f"ready in {format_duration(now - self.created)}: {n} experiences{resumed}, "
                      f"model of {format_count(params)} parameters")
        if exp is not None and exp.index != self.experience_index:
            self.experience_index, self.num_experiences = exp.index, exp.num_experiences
            self.experience_started = now
            if self.first_experience is None:
                self.first_experience = exp.index
        batches = trainer.num_training_batches
        total = batches * trainer.max_epochs if isinstance(batches, int) and batches > 0 else None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self._where(pl_module, trainer), file=self.file, leave=False,
                            dynamic_ncols=True, unit="batch")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_t0 = time.perf_counter()
        self._loss_sum, self._loss_n = 0.0, 0
        if self.bar is not None:  # once per epoch: the bar's label names the new epoch at once
            self.bar.set_description(self._where(pl_module, trainer), refresh=False)
            self._postfix(trainer)
            self.bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            try:
                self._loss_sum += float(loss)
                self._loss_n += 1
            except (TypeError, ValueError):
                pass
        if self.bar is not None:
            self.bar.update(1)
            if batch_idx % 10 == 0:
                self._postfix(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.tty or not self._rank_zero(trainer):
            return
        batches = trainer.num_training_batches
        loss = f", loss {self._loss_sum / self._loss_n:.4f}" if self._loss_n else ""
        self._say(f"{self._where(pl_module, trainer)}: {batches} batches in {format_duration(time.perf_counter() - self._epoch_t0)}{loss}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_bar()

    def _postfix(self, trainer) -> None:
        post = {}
        if self._loss_n:
            post["loss"] = f"{self._loss_sum / self._loss_n:.3f}"
        eta = self.run_eta()
        if eta is not None:
            post["run ETA"] = format_duration(eta)
        self.bar.set_postfix(post, refresh=False)

    # ------------------------------------------------------------------ experience level
    def run_eta(self, now: float | None = None) -> float | None:
        """Seconds left in the run: mean seconds per finished experience times the experiences left, less
        what the current one has already taken; None before the first experience has finished."""
        if not self.finished or self.num_experiences is None:
            return None
        per = sum(self.finished) / len(self.finished)
        done = self.first_experience + len(self.finished)
        left = per * (self.num_experiences - done)
        if self.experience_index is not None and self.experience_index >= done and self.experience_started is not None:
            left -= min(per, (now or time.perf_counter()) - self.experience_started)
        return max(0.0, left)

    def on_experience(self, index: int, result, strategy=None) -> None:
        """The runner's `on_experience`: the experience's line (time, accuracy row, headline, run ETA)."""
        trainer = getattr(strategy, "_trainer", None)
        if trainer is not None and not self._rank_zero(trainer):
            return
        now = time.perf_counter()
        n = result.scenario_info.get("num_experiences") or self.num_experiences or "?"
        started = self.experience_started if self.experience_index == index else None
        took = now - started if started is not None else None
        if took is not None:
            self.finished.append(took)
        if self.first_experience is None:
            self.first_experience = index
        self.experience_index = index
        parts = [f"exp {index + 1}/{n} done" + (f" in {format_duration(took)}" if took is not None else "")]
        row = experience_row(result, index)
        if row is not None:
            from clbench.tasks import task_of

            parts.append(f"{task_of(result).matrix_name} (%) on exp 1..{index + 1}: " + " ".join(f"{v:.1f}" for v in row))
        summary = summary_so_far(result)
        if summary:
            column, value = summary[0]
            so_far = " so far" if isinstance(n, int) and index + 1 < n else ""
            parts.append(f"{column.title}{so_far} {value:{column.fmt}}{column.unit}")
        if isinstance(n, int) and index + 1 < n:
            eta = self.run_eta(now)
            if eta is not None:
                parts.append(f"run ETA {format_duration(eta)}")
        else:
            parts.append(f"run took {format_duration(now - self.created)}")
        self._say(" | ".join(parts))

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()
