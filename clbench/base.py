"""`CLStrategy`: the LightningModule contract every continual-learning strategy shares.

The runner calls, per experience: `on_experience_start` -> `training_data` -> one
`trainer.fit` per `phases()` entry -> `on_experience_end` -> evaluation through
`predict_logits`.  Lightning calls `training_step`, which sums the method's named
`step_losses` and the add-ons' terms, checks every term is finite and logs each.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clbench.config import StrategyConfig
from clbench import distributed
from clbench.errors import TrainingDivergedError, UsageError
from clbench.models.freeze import frozen_snapshot
from clbench.models.heads import IncrementalLinear
from clbench.types import Batch, ExperienceInfo, Output, Phase, StepView


class CLStrategy(pl.LightningModule):
    Config: ClassVar[type] = StrategyConfig
    # what the method learns: "classification" or "detection" (`clbench.strategies._detection.DetectionStrategy`)
    task_type: ClassVar[str] = "classification"
    PAPER_SETTINGS: ClassVar[dict[str, dict[str, Any]]] = {}
    # per scenario of PAPER_SETTINGS, the number the paper reports for it, which a --paper-settings run
    # should reproduce: {"metric": a clbench metric (final_avg_acc, ...), "value": a fraction, "source":
    # where in the paper (table / figure)[, "note": how its protocol or convention differs]}
    PUBLISHED: ClassVar[dict[str, dict[str, Any]]] = {}
    # add-on names this strategy accepts (None: any); checked before training starts
    accepts_aux: ClassVar[set[str] | None] = None
    # what the output is, for add-ons that read it: class logits, or "forecast" (`Aux.refuses`)
    output_kind: ClassVar[str] = "class_logits"
    # scenario the registry contract tests run on; methods that need 3x32x32 images say "synthetic32-3"
    contract_scenario: ClassVar[str] = "synthetic-2"
    # image channels the method is defined for (None: any); `sweep --strategies all` skips other scenarios
    input_channels: ClassVar[int | None] = None
    # True for methods that put adapters or prompts into a timm ViT (see `backbone_problem`)
    needs_vit_backbone: ClassVar[bool] = False
    # Config overrides for those contract tests only (e.g. a narrower own network: {"nf": 4})
    contract_overrides: ClassVar[dict[str, Any]] = {}
    # backbone for those contract tests (None: the scenario's default); adapter methods need a ViT
    contract_backbone: ClassVar[str | None] = None
    # False for methods whose fits compute statistics instead of taking gradient steps (SimpleCIL's
    # prototypes): they override `training_step` and have no `step_losses` terms to log
    learns_by_gradient: ClassVar[bool] = True
    # under DDP: state the training steps accumulate as sums over this rank's samples (dotted attribute
    # paths to tensors, dicts of tensors or numbers); after each fit what every rank added is summed
    # over ranks, so every rank holds the sum over all samples (EWC's Fisher, SimpleCIL's class sums)
    distributed_sums: ClassVar[tuple[str, ...]] = ()
    # False for a method whose evaluation scores every class of the stream, seen or not (eTag's
    # `mask_unseen=False`, as its official code); the protocol masks classes not yet seen
    masks_unseen_classes: bool = True

    # Lightning sets `_current_fx_name` around every hook it calls (about 30 times a step) and the
    # step keeps its output: such names never hold parameters, buffers or modules, so nn.Module's
    # registration checks (a few percent of a digits-5 step) are skipped for them
    _PLAIN_ATTRIBUTES: ClassVar[frozenset[str]] = frozenset({"_current_fx_name", "step_output", "step_view", "cost_meter"})

    def __init__(self, backbone: nn.Module, num_classes: int, cfg=None, aux: Sequence[nn.Module] = (), seed: int = 0):
        super().__init__()
        self.cfg = cfg if cfg is not None else self.Config()
        problem = self.backbone_problem(backbone)
        if problem is not None:
            raise UsageError(problem)
        self.backbone = backbone
        self.head = self.make_head(backbone.num_features)
        self.init_loop_state(num_classes, aux, seed)
        for a in self.aux:
            a.setup(self)

    def init_loop_state(self, num_classes: int, aux: Sequence[nn.Module], seed: int) -> None:
        """What the experience loop keeps on every strategy, whatever its model (detection and
        forecasting bases build their own model instead of a backbone and head)."""
        self.num_classes = num_classes
        self.aux = nn.ModuleList(aux)
        self.seed = seed
        self.experience: ExperienceInfo | None = None
        self.phase: Phase = Phase()
        self.augment = None  # the scenario's per-sample train augmentation, set by the runner
        self.global_step_offset = 0  # steps taken in earlier fits, for a run-wide logging step
        self.step_output: Output | None = None
        self.step_view: StepView | None = None
        self.automatic_optimization = False  # see `training_step`
        self.accumulate_grad_batches = 1  # batches per optimiser step (the runner's global batch; `accumulation`)

    def __getstate__(self):
        # the runner's profiler (threads, open counters) stays with the process that runs it
        state = dict(super().__getstate__())
        state.pop("cost_meter", None)
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def backbone_problem(cls, backbone: nn.Module) -> str | None:
        """Why the method cannot run on `backbone` (None: it can). Sweeps skip such runs, checking a
        backbone built on the meta device; building the strategy raises it as a usage error."""
        if cls.needs_vit_backbone:
            from clbench.models.adapters import (
                vit_blocks,  # adapters imports this module
            )

            try:
                vit_blocks(backbone)
            except UsageError as e:
                return str(e)
        return None

    # ----------------------------------------------------------- model
    def make_head(self, in_features: int) -> nn.Module:
        return IncrementalLinear(in_features)

    def forward(self, x: torch.Tensor) -> Output:
        features = self.backbone(x)
        return Output(self.head(features), features)

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits used for evaluation; methods with another inference rule (NME, EMA model) override."""
        return self(x).logits

    def predict(self, x: torch.Tensor):
        """The inference rule evaluation runs (what the profiler counts per sample)."""
        return self.predict_logits(x)

    # ----------------------------------------------------------- experience level
    def on_experience_start(self, exp: ExperienceInfo) -> None:
        self.experience = exp
        head = getattr(self, "head", None)  # detection and forecasting models have none
        if hasattr(head, "grow"):
            head.grow(len(exp.seen_classes))
        for a in self.aux:
            a.on_experience_start(self, exp)

    def training_data(self, exp: ExperienceInfo, train_set: Dataset) -> Dataset:
        """The data `fit` iterates over in this experience (joint training and exemplar sets override)."""
        return train_set

    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        return [Phase("train")]

    def phase_data(self, phase: Phase, data: Dataset) -> Dataset:
        """The data one phase iterates over (default: the experience's `training_data`); a phase
        that fits on something else (a subset, sampled features) returns it here. A dataset with a
        `batch_size` attribute is batched by it (a size known only once the phase starts)."""
        return data

    def on_experience_end(self, exp: ExperienceInfo, train_set: Dataset) -> None:
        for a in self.aux:
            a.on_experience_end(self, exp)

    def diagnose(self, exp: ExperienceInfo, loaders: Sequence, device) -> dict[str, Any] | None:
        """A method's own measurement on the test sets after experience `exp` (labels available,
        modules in eval mode on `device`), kept per experience in the result's `diagnostics`;
        None (the default) records nothing and the runner does not call it at all."""
        return None

    def prepare_for_state(self, state: dict[str, torch.Tensor]) -> None:
        """Before a resumed run loads the saved `state` (no experience has started in this process):
        create the parameters this strategy creates in `on_experience_start`, with the saved shapes.
        Teacher snapshots, grown heads and buffers registered later are made by the loader itself."""

    def on_resume(self, last: ExperienceInfo, past_train_sets: Sequence[Dataset]) -> None:
        """Called instead of replaying experiences 0..last when a run resumes; tensors are already loaded."""
        self.experience = last

    # ----------------------------------------------------------- batch level
    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.remember(self(batch.x))
        return {"ce": F.cross_entropy(out.logits, batch.y)}

    def remember(self, out: Output, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 current: int | None = None) -> Output:
        """Keep the step's main forward for the add-ons (saves them a second forward). A method
        that forwards the current batch and replayed samples together passes the whole forward:
        its inputs `x`, labels `y` and how many leading rows are the `current` batch; add-ons'
        `loss` gets the current rows, and `step_view` has them all. Returns the current rows."""
        current_out = out if current is None else out.rows(slice(0, current))
        self.step_output = current_out
        if x is not None and y is not None:
            self.step_view = StepView(x, y, out, len(y) if current is None else current)
        return current_out

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """One optimisation step: zero the gradients, sum the loss terms, backward, step.

        Optimisation is manual (`automatic_optimization = False`): the order is the same as
        Lightning's automatic loop (so results are identical), without its per-step closure
        machinery, which cost about a tenth of a digits-5 step.
        """
        total = self.total_loss(batch, batch_idx)
        optimizer = self.optimizers()
        zero, step, k = self.accumulation(batch_idx)
        if zero:
            optimizer.zero_grad()
        self.manual_backward(total if k == 1 else total / k)
        if step:
            optimizer.step()
        return total.detach()

    def accumulation(self, batch_idx: int) -> tuple[bool, bool, int]:
        """(zero the gradients before this batch, step after it, k) under `accumulate_grad_batches` k, as
        Lightning's accumulation does it: the gradients of k batches, each loss divided by k, are summed into
        one step; the epoch's last batch steps whatever it has. k = 1: (True, True, 1)."""
        k = self.accumulate_grad_batches
        if k == 1:
            return True, True, 1
        last = batch_idx + 1 == self.trainer.num_training_batches
        return batch_idx % k == 0, (batch_idx + 1) % k == 0 or last, k

    @classmethod
    def accumulates_gradients(cls) -> bool:
        """Whether the class's `training_step` follows `accumulation` (CLStrategy's does; a class that
        overrides it says so with `ACCUMULATES_GRADIENTS = True`)."""
        owner = next(k for k in cls.__mro__ if "training_step" in vars(k))
        return owner is CLStrategy or bool(vars(owner).get("ACCUMULATES_GRADIENTS", False))

    def total_loss(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The method's named `step_losses` plus the add-ons' terms, checked finite and logged."""
        self.step_output = self.step_view = None
        if self.augment is not None and batch.x_raw is None and self.phase.on_images:
            batch = Batch(self.augment(batch.x), batch.y, batch.task, x_raw=batch.x)
        terms = dict(self.step_losses(batch))
        # add-on terms act on the model's output for the step's images; a phase on sampled
        # features (a head's alignment or calibration) has no images to run the model on
        if len(self.aux) and self.phase.on_images:
            out = self.step_output if self.step_output is not None else self(batch.x)
            if self.step_view is None:
                self.step_view = StepView(batch.x, batch.y, out, len(batch))
            for a in self.aux:
                term = a.loss(batch, out, self)
                if term is not None:
                    terms[f"aux/{a.name}"] = a.weight * term
        values = list(terms.values())
        total = values[0] if len(values) == 1 else torch.stack(values).sum()
        # one check per step; name the culprit only on failure. Under DDP every rank stops at the
        # same step (a rank left alone would wait for the others' gradients)
        finite = math.isfinite(total.item())
        if distributed.any_rank(not finite):
            if finite:
                raise TrainingDivergedError(
                    f"a loss term is not finite on another DDP rank at experience "
                    f"{self.experience.index if self.experience else '?'}, step {self.global_step} (phase {self.phase.name!r})")
            name, value = next(((n, v) for n, v in terms.items() if not torch.isfinite(v).all()), ("total", total))
            raise TrainingDivergedError(
                f"loss term {name!r} is {value.item()} at experience {self.experience.index if self.experience else '?'}, "
                f"step {self.global_step} (phase {self.phase.name!r})"
            )
        if self._has_logger():
            n = len(batch)
            for name, value in terms.items():
                self.log(f"train/{name}", value.detach(), batch_size=n, on_step=True, on_epoch=False)
            self.log("train/loss", total.detach(), batch_size=n, on_step=True, on_epoch=False)
        return total

    def _has_logger(self) -> bool:
        # the terms are for loggers; without one, `self.log` (about 1 ms a call, a third of
        # a digits step, plus a teardown per fit) would buy nothing
        trainer = self._trainer
        return trainer is not None and bool(trainer.loggers)

    # ----------------------------------------------------------- optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_params(self) -> list:
        """What the optimiser gets: the trainable parameters, or parameter groups with their own
        learning rates (a method training parts at different rates overrides this)."""
        return self.trainable_parameters()

    def configure_optimizers(self):
        """A fresh optimiser per `fit` (per experience and phase): no state crosses experiences."""
        params = self.optimizer_params()
        cfg = self.cfg
        # foreach: a few multi-tensor ops per step instead of a few per parameter. torch picks it
        # by default on CUDA only; on the CPU it gives bitwise the same parameters, costs fewer
        # Python-to-C++ calls, and the profiled op trace matches what a Jetson's GPU runs
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
        elif cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
        return self.scheduled(optimizer)

    def scheduled(self, optimizer, schedule: str | None = None):
        """What `configure_optimizers` returns for `optimizer` under `lr_schedule(optimizer, schedule)`."""
        scheduler = self.lr_schedule(optimizer, schedule)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def lr_schedule(self, optimizer, name: str | None = None):
        """The per-epoch schedule `name` (default: the Config's `lr_schedule`) over this fit, or None
        for a constant rate: "cosine" (lr to 0 over the fit's epochs), "step" (x lr_step_gamma every
        lr_step_epochs epochs) or "multistep" (x lr_step_gamma at each of lr_milestones)."""
        cfg = self.cfg
        name = name or getattr(cfg, "lr_schedule", "constant")
        if name == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        if name == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_step_gamma)
        if name == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_milestones), gamma=cfg.lr_step_gamma)
        return None

    def on_train_epoch_end(self) -> None:
        # optimisation is manual, so Lightning leaves the schedule to the module
        schedulers = self.lr_schedulers() if self._trainer is not None else None
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    def on_fit_end(self) -> None:
        self.global_step_offset += self.trainer.global_step

    # ----------------------------------------------------------- helpers for subclasses
    def frozen_copy(self, **more: nn.Module) -> nn.Module:
        """A teacher snapshot: a deep copy of backbone and head (and of `more` modules, by name) in
        eval mode with gradients off."""
        return frozen_snapshot({"backbone": self.backbone, "head": self.head, **more})

    def train(self, mode: bool = True):
        # `train()` recurses into every submodule, teachers included: restoring the student's
        # mode after evaluation would put a BatchNorm teacher back to batch statistics and
        # let its forwards update its running statistics
        super().train(mode)
        for module in self.modules():
            if getattr(module, "frozen_snapshot", False):
                module.eval()
        return self

    def work_steps(self, label: str, n: int) -> Iterator[int]:
        """`range(n)` for a loop of training work done outside `trainer.fit` (generating replay
        data, inverting a model): under the runner's profiler its steps are timed and their FLOPs
        counted into the experience's training cost."""
        meter = self.__dict__.get("cost_meter")
        return meter.work_steps(label, n) if meter is not None else iter(range(n))

    def stored_state(self) -> list[torch.Tensor]:
        """Model values the method keeps besides its parameters and uses at inference (TUNA's and
        SAEF's stored task adapters): the profiler counts them into `total_params` and their bytes
        into `stored_state_bytes`. Replay data is not model state (`report()["buffer_bytes"]`)."""
        return []

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensor state outside `state_dict` (buffers' contents, statistics) for resume."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def report(self) -> dict[str, Any]:
        """Extra facts for the result JSON (buffer size in bytes, ...)."""
        return {}


class EvaluationNotes:
    """Per-sample values a strategy notes while the runner evaluates it, for its `diagnose`: the
    evaluation scores the test sets in order, so the seen test sets' samples come first. A strategy
    clears the notes in `on_experience_end` (the evaluation follows it) and notes in eval mode only."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def add(self, values: torch.Tensor) -> None:
        self.parts.append(values.detach().cpu())

    def clear(self) -> None:
        self.parts = []

    def of_seen(self, loaders: Sequence, exp: ExperienceInfo) -> list[torch.Tensor] | None:
        """The noted values of each seen test set (experiences 0..exp.index), then cleared; None
        when fewer samples were noted."""
        sizes = [len(loader.dataset) for loader in loaders[: exp.index + 1]]
        values = torch.cat(self.parts) if self.parts else torch.zeros(0)
        self.parts = []
        if len(values) < sum(sizes):
            return None
        return list(values[: sum(sizes)].split(sizes))
