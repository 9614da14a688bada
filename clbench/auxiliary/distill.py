"""Distillation add-ons from a previous-experience teacher.

The teacher is a frozen snapshot of the model taken at the start of every experience after the
first (so it knows the classes seen before this experience; new head units have no teacher).
Its forwards run without gradients in eval mode; they are real training cost, so the profiler
counts them. A snapshot has the student's architecture, so student and teacher dimensions
always match and the spec's projector P is the identity.

Which samples are distilled (`samples`): "current" (the current batch), "replay" (the replayed
samples of the step's main forward) or "all" (both). Replayed samples are seen for methods that
forward them with the current batch (`er`; see `CLStrategy.remember`); for the others "all" is
the current batch and "replay" gives no term.

- `logit_kd`    L = tau^2 * KL(p_t || p_s), p = softmax(z / tau), batch mean, old classes (1.1).
- `logit_mse`   L = mean (z_s - z_t)^2 over old-class logits, DER/LoRD style (1.1 variant).
- `feature_kd`  L = mean (norm(f_s) - norm(f_t))^2 (1.2): pooled embeddings L2-normalised (weight
                2000, CLIP-KD), or a named layer's map, raw (weight 5) or channel-normalised.
- `relation_kd` G = norm(e) norm(e)^T over the distilled samples; L = (1/B) sum_i
                KL(softmax(G_t[i]/tau_r) || softmax(G_s[i]/tau_r)), or ||G_s - G_t||_F^2 / B^2 (1.3).
- `freq_kd`     one-level Haar DWT of a feature map (a grouped convolution, counted by the
                profiler): L = w_low MSE(LL_s, LL_t) + w_high MSE(details_s, details_t) (1.4,
                clbench's design: the SDKD paper was not found).
The multi-teacher add-on is `multi_teacher` (1.5, `clbench/auxiliary/multi_teacher.py`).

What a strategy's output is, for these add-ons: by default head(backbone(x)), class logits
(`output_kind` "class_logits") and pooled backbone features, the teacher a backbone-and-head
snapshot. A strategy family with its own forward declares otherwise (forecasters,
`clbench.strategies._forecasting.ForecastStrategy`):
- `output_kind`: "forecast" outputs are distilled on every column (horizon steps belong to no
  class); an add-on that cannot distil a kind names it in `refuses`, with the reason, and is
  refused before training (`clbench.engine.runner.aux_problem`);
- `features_at`: the module whose input the features are (None: no features, and `feature_kd`
  and `relation_kd` refuse the strategy);
- `snapshot_output(snapshot, x) -> Output`, a classmethod: a `frozen_copy` snapshot's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clbench.auxiliary.base import Aux, AuxConfig
from clbench.config import integers_at_least, non_negative_numbers, one_of, positive_numbers
from clbench.models.freeze import teacher_outputs
from clbench.errors import UsageError
from clbench.registry import register_aux
from clbench.types import Output
from clbench.models.wavelets import haar_dwt

SAMPLES = ("current", "replay", "all")
CLASS_LOGITS, FORECAST = "class_logits", "forecast"


def sample_rows(samples: str, current: int) -> slice:
    """The rows of a step's forward that `samples` names: the current batch comes first."""
    return {"current": slice(0, current), "replay": slice(current, None), "all": slice(None)}[samples]


# --------------------------------------------------------------------------- losses (pure)
def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)), averaged over the batch."""
    return kd_per_sample(student, teacher, temperature).mean()


def kd_per_sample(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(p_t || p_s) of each row: float [B]."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def normalised(f: torch.Tensor, how: str) -> torch.Tensor:
    """"l2": unit vectors along the feature dimension (dim 1); "channel": the same for maps, per
    position; "none": unchanged."""
    return f if how == "none" else F.normalize(f, dim=1)


def feature_mimicry(student: torch.Tensor, teacher: torch.Tensor, how: str = "l2") -> torch.Tensor:
    """mean((norm(f_s) - norm(f_t))^2) over every element."""
    return F.mse_loss(normalised(student, how), normalised(teacher, how))


def similarity_matrix(e: torch.Tensor) -> torch.Tensor:
    """G = norm(e) norm(e)^T: cosine similarities of every pair of rows, [B, B]."""
    e = F.normalize(e.flatten(1), dim=1)
    return e @ e.T


def relation_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1, relation: str = "kl",
                exclude_diagonal: bool = False) -> torch.Tensor:
    """Relation distillation between the batch similarity matrices of student and teacher embeddings."""
    g_s, g_t = similarity_matrix(student), similarity_matrix(teacher)
    b = len(g_s)
    if relation == "mse":
        return ((g_s - g_t) ** 2).sum() / b**2
    if exclude_diagonal:  # every row loses its self-similarity (always 1)
        off = ~torch.eye(b, dtype=torch.bool, device=g_s.device)
        g_s, g_t = g_s[off].view(b, b - 1), g_t[off].view(b, b - 1)
    log_p_s = F.log_softmax(g_s / temperature, dim=1)
    log_p_t = F.log_softmax(g_t / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def frequency_kd(student: torch.Tensor, teacher: torch.Tensor, low_weight: float = 1.0, high_weight: float = 0.5,
                 levels: int = 1, domain: str = "haar", cutoff: float = 0.25) -> torch.Tensor:
    """w_low * MSE of the low bands + w_high * MSE of the high bands of two maps [B, C, H, W].

    "haar": LL after `levels` transforms (each applied to the previous LL) is the low band; the
    high term is the mean over levels of the detail bands' MSE. "fft": magnitudes of the 2-D real
    FFT, split at radial frequency `cutoff` (cycles per sample; 0.5 is Nyquist)."""
    if domain == "fft":
        mag_s, mag_t = torch.fft.rfft2(student).abs(), torch.fft.rfft2(teacher).abs()
        fy = torch.fft.fftfreq(student.shape[-2], device=student.device)
        fx = torch.fft.rfftfreq(student.shape[-1], device=student.device)
        low = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() <= cutoff
        return (low_weight * F.mse_loss(mag_s[..., low], mag_t[..., low])
                + high_weight * F.mse_loss(mag_s[..., ~low], mag_t[..., ~low]))
    high = []
    for _ in range(levels):
        (student, d_s), (teacher, d_t) = haar_dwt(student), haar_dwt(teacher)
        high.append(F.mse_loss(d_s, d_t))
    return low_weight * F.mse_loss(student, teacher) + high_weight * torch.stack(high).mean()


# --------------------------------------------------------------------------- feature maps by hooks
class LayerTap:
    """The output of one named backbone module in the step's forward, caught by forward hooks
    (backbones are never edited). Each backbone call in training mode with gradients on is kept
    with the backbone's input, so the map of a given forward is found by its input; teacher
    snapshots copy the hooks, which ignore every module but the student's."""

    KEEP = 4  # calls kept per step (a method may run a few forwards per step)

    def __init__(self, backbone: nn.Module, path: str):
        try:
            self.module = backbone.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in backbone.named_children()]
            raise UsageError(f"layer={path!r} is not a module of the backbone; expected a module path such as "
                             f"{', '.join(repr(n) for n in names) or '(it has no submodules)'}") from None
        self.backbone, self.path = backbone, path
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._input: torch.Tensor | None = None
        tap = self

        def enter(module, args):
            if module is tap.backbone and module.training and torch.is_grad_enabled():
                tap._input = args[0] if args else None

        def record(module, args, output):
            if module is tap.module and tap._input is not None:
                tap.calls = [*tap.calls[-(self.KEEP - 1):], (tap._input, output)]
                tap._input = None

        self._handles = [backbone.register_forward_pre_hook(enter), self.module.register_forward_hook(record)]

    @classmethod
    def replacing(cls, old: "LayerTap | None", backbone: nn.Module, path: str) -> "LayerTap":
        """A new tap, after removing `old`'s hooks (`Aux.setup` may run twice)."""
        if old is not None:
            old.remove()
        return cls(backbone, path)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.calls = []

    def take(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(backbone input, layer output) of the forward of `x` (the same tensor, else the last one
        with as many rows), and forget the step's calls."""
        calls, self.calls = self.calls, []
        for inp, out in reversed(calls):
            if inp is x:
                return inp, out
        return next(((inp, out) for inp, out in reversed(calls) if len(inp) == len(x)), None)

    def output_of(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's output when `backbone` (the student or a snapshot of it) runs on `x`."""
        module, caught = backbone.get_submodule(self.path), []
        handle = module.register_forward_hook(lambda m, a, out: caught.append(out))
        try:
            backbone(x)
        finally:
            handle.remove()
        return caught[-1]


def last_conv_stage(backbone: nn.Module, add_on: str) -> str:
    """The last top-level submodule holding a Conv2d: the backbone's final feature map."""
    stages = [name for name, child in backbone.named_children() if any(isinstance(m, nn.Conv2d) for m in child.modules())]
    if not stages:
        raise UsageError(f"{add_on} needs a convolutional feature map; backbone {type(backbone).__name__} has no "
                         f"Conv2d stage (give layer=<module path> of a module with a [N, C, H, W] output)")
    return stages[-1]


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DistillConfig(AuxConfig):
    """Settings of every previous-teacher add-on: which samples are distilled."""

    samples: str = "current"  # current | replay | all

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "samples", SAMPLES)


@dataclass(frozen=True)
class LogitKDConfig(DistillConfig):
    temperature: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        positive_numbers(self, "temperature")


@dataclass(frozen=True)
class LogitMSEConfig(DistillConfig):
    # DER++'s alpha in clbench's der_pp: raw logits are unbounded, and at weight 1 the README's
    # ER run on digits-5 diverged (NaN) in one seed of three
    weight: float = 0.1


@dataclass(frozen=True)
class FeatureKDConfig(DistillConfig):
    """Unset `weight` and `normalize` resolve from `layer`: pooled embeddings are L2-normalised at
    weight 2000 (CLIP-KD's, for unit embeddings, whose MSE per element is tiny), a named layer's raw
    map is distilled at weight 5 (MTKD-RL's)."""

    weight: float | None = None
    layer: str | None = None  # a backbone module path (None: the pooled embedding)
    normalize: str | None = None  # l2 | none for embeddings, none | channel for a layer's map

    def __post_init__(self):
        if self.normalize is None:
            object.__setattr__(self, "normalize", "l2" if self.layer is None else "none")
        one_of(self, "normalize", ("l2", "none") if self.layer is None else ("none", "channel"))
        if self.weight is None:
            object.__setattr__(self, "weight", 2000.0 if self.normalize != "none" and self.layer is None else 5.0)
        super().__post_init__()


@dataclass(frozen=True)
class RelationKDConfig(DistillConfig):
    temperature: float = 0.1
    relation: str = "kl"  # kl | mse
    exclude_diagonal: bool = False
    min_rows: int = 8  # fewest distilled samples a similarity matrix is built from
    samples: str = "all"

    def __post_init__(self):
        super().__post_init__()
        positive_numbers(self, "temperature")
        one_of(self, "relation", ("kl", "mse"))
        integers_at_least(self, 2, "min_rows")


@dataclass(frozen=True)
class FrequencyKDConfig(DistillConfig):
    layer: str | None = None  # None: the backbone's last convolutional stage
    low_weight: float = 1.0
    high_weight: float = 0.5
    levels: int = 1
    domain: str = "haar"  # haar | fft
    cutoff: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        non_negative_numbers(self, "low_weight", "high_weight")
        one_of(self, "levels", (1, 2))
        one_of(self, "domain", ("haar", "fft"))
        positive_numbers(self, "cutoff")


# --------------------------------------------------------------------------- the teacher
class PreviousTeacher(Aux):
    """Shared mechanics: the previous-experience snapshot, the distilled samples and their outputs."""

    family = "distill"
    # a snapshot is backbone and head: refused (before training) for strategies with their own
    # forward, unless they declare `snapshot_output`
    needs_backbone_head = True

    Config = DistillConfig

    def __init__(self, cfg: DistillConfig | None = None, /, **values):
        super().__init__(cfg, **values)
        self.samples = self.cfg.samples
        self.teacher = None
        # the teacher's columns to distil: its classes, or None for all (a forecast's horizon steps)
        self.old_classes: int | None = 0
        self.read_snapshot: Callable[[nn.Module, torch.Tensor], Output] = teacher_outputs

    def on_experience_start(self, strategy, exp) -> None:
        # runs after the head grew: keep only the rows of classes the teacher knew
        self.teacher = None if exp.is_first else strategy.frozen_copy()
        self.read_snapshot = snapshot_reader(strategy)
        self.old_classes = len(exp.past_classes) if strategy.output_kind == CLASS_LOGITS else None

    def distilled(self, batch, out: Output, strategy) -> tuple[torch.Tensor, torch.Tensor, Output] | None:
        """(inputs, labels, student outputs) of the samples `samples` selects, or None if none."""
        view = getattr(strategy, "step_view", None)
        if view is None or view.out.logits.shape[0] != len(view.y):
            x, y, full, current = batch.x, batch.y, out, len(batch)
        else:
            x, y, full, current = view.x, view.y, view.out, view.current
        rows = sample_rows(self.samples, current)
        x = x[rows]
        if len(x) == 0:
            return None
        return x, y[rows], full.rows(rows)

    def with_teacher(self, batch, out: Output, strategy, min_rows: int = 1) -> tuple[Output, Output] | None:
        """(student, teacher) outputs on the distilled samples; None without a teacher or with
        fewer than `min_rows` samples (the teacher is not run then)."""
        rows = self.distilled(batch, out, strategy) if self.teacher is not None else None
        if rows is None or len(rows[0]) < min_rows:
            return None
        x, _, student = rows
        return student, self.teacher_output(x)

    def teacher_output(self, x: torch.Tensor) -> Output:
        return self.read_snapshot(self.teacher, x)


def require_features(add_on: str, strategy) -> None:
    """A strategy with a declared output kind gives features only where it names them (`features_at`)."""
    if strategy.output_kind != CLASS_LOGITS and getattr(strategy, "features_at", None) is None:
        raise UsageError(f"{add_on} distils features, and strategy {type(strategy).registry_name!r} declares none "
                         f"(its features_at is None); expected a strategy that names the module whose input they are")


def snapshot_reader(strategy) -> Callable[[nn.Module, torch.Tensor], Output]:
    """How to run the strategy's `frozen_copy` snapshots: its declared `snapshot_output`, else
    head(backbone(x)) (`clbench.models.freeze.teacher_outputs`); both without gradients."""
    return getattr(strategy, "snapshot_output", teacher_outputs)


class _OldLogits(PreviousTeacher):
    def loss(self, batch, out, strategy):
        pair = self.with_teacher(batch, out, strategy) if self.old_classes != 0 else None
        if pair is None:
            return None
        student, teacher = pair
        columns = slice(None) if self.old_classes is None else slice(0, self.old_classes)
        return self.compare(student.logits[:, columns], teacher.logits[:, columns])

    compare: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@register_aux("logit_kd")
class LogitKD(_OldLogits):
    """Logit distillation tau^2 * KL(teacher || student) on past classes from the previous-experience model."""

    refuses = {FORECAST: "a softmax over forecast steps is meaningless; use logit_mse to distil the forecast"}

    Config = LogitKDConfig

    def __init__(self, cfg: LogitKDConfig | None = None, /, **values):
        super().__init__(cfg, **values)
        self.temperature = self.cfg.temperature

    def compare(self, student, teacher):
        return logit_kd(student, teacher, self.temperature)


@register_aux("logit_mse")
class LogitMSE(_OldLogits):
    """Logit matching: mean squared error to the previous-experience model's past-class logits
    (a forecaster's whole forecast)."""

    Config = LogitMSEConfig  # weight 0.1 by default

    def compare(self, student, teacher):
        return F.mse_loss(student, teacher)


@register_aux("feature_kd")
class FeatureKD(PreviousTeacher):
    """Feature mimicry: MSE between normalised student and previous-experience teacher features."""

    Config = FeatureKDConfig

    def __init__(self, cfg: FeatureKDConfig | None = None, /, **values):
        super().__init__(cfg, **values)
        self.layer, self.normalize = self.cfg.layer, self.cfg.normalize
        self.tap: LayerTap | None = None

    def setup(self, strategy) -> None:
        if self.layer is None:
            require_features(self.name, strategy)
        else:
            if getattr(strategy, "backbone", None) is None:
                raise UsageError(f"feature_kd layer={self.layer!r} names a backbone module, and strategy "
                                 f"{type(strategy).registry_name!r} has no backbone; expected no layer= "
                                 f"(its features are the embedding it declares)")
            self.tap = LayerTap.replacing(self.tap, strategy.backbone, self.layer)

    def loss(self, batch, out, strategy):
        if self.tap is not None:
            return self._map_loss(batch, out, strategy)
        pair = self.with_teacher(batch, out, strategy) if out.features is not None else None
        if pair is None:
            return None
        student, teacher = pair
        return feature_mimicry(student.features, teacher.features, self.normalize)

    def _map_loss(self, batch, out, strategy):
        student, teacher_in = student_map(self.tap, self, batch, out, strategy)
        if student is None or self.teacher is None:
            return None
        with torch.no_grad():
            teacher = self.tap.output_of(self.teacher["backbone"], teacher_in)
        return feature_mimicry(student, teacher, self.normalize)


def student_map(tap: LayerTap, add_on: PreviousTeacher, batch, out, strategy):
    """(student map of the distilled samples, the backbone input that produced it), from the step's
    forward when it ran the backbone on those samples, else from one more student forward."""
    view = getattr(strategy, "step_view", None)
    forward_x = view.x if view is not None else batch.x
    caught = tap.take(forward_x)
    if add_on.teacher is None:
        return None, None
    rows = add_on.distilled(batch, out, strategy)
    if rows is None:
        return None, None
    if caught is None:  # the step's forward did not pass this backbone on these inputs
        x = rows[0]
        return tap.output_of(strategy.backbone, x), x
    inp, layer_out = caught
    current = view.current if view is not None else len(batch)
    keep = sample_rows(add_on.samples, current)
    return layer_out[keep], inp[keep]


@register_aux("relation_kd")
class RelationKD(PreviousTeacher):
    """Relation distillation: sample-to-sample similarity matrices of student and teacher (CIRKD-like)."""

    Config = RelationKDConfig

    def __init__(self, cfg: RelationKDConfig | None = None, /, **values):
        super().__init__(cfg, **values)
        c = self.cfg
        self.temperature, self.relation, self.exclude_diagonal = c.temperature, c.relation, c.exclude_diagonal
        self.min_rows = c.min_rows

    def setup(self, strategy) -> None:
        require_features(self.name, strategy)

    def loss(self, batch, out, strategy):
        # a similarity matrix of a handful of samples says little (the spec asks for B >= 8)
        pair = self.with_teacher(batch, out, strategy, self.min_rows) if out.features is not None else None
        if pair is None:
            return None
        student, teacher = pair
        return relation_kd(student.features, teacher.features, self.temperature, self.relation, self.exclude_diagonal)


@register_aux("freq_kd")
class FrequencyKD(PreviousTeacher):
    """Frequency-aligned feature distillation: Haar low band held tightly, detail bands loosely."""

    contract_backbone = "clbench_convnet"
    refuses = {FORECAST: "it reads a convolutional feature map [N, C, H, W], and a forecaster's features are an "
                         "embedding [N, d]; use feature_kd or relation_kd"}

    Config = FrequencyKDConfig

    def __init__(self, cfg: FrequencyKDConfig | None = None, /, **values):
        super().__init__(cfg, **values)
        c = self.cfg
        self.layer, self.low_weight, self.high_weight = c.layer, c.low_weight, c.high_weight
        self.levels, self.domain, self.cutoff = c.levels, c.domain, c.cutoff
        self.tap: LayerTap | None = None

    def setup(self, strategy) -> None:
        self.tap = LayerTap.replacing(self.tap, strategy.backbone, self.layer or last_conv_stage(strategy.backbone, self.name))

    def loss(self, batch, out, strategy):
        student, teacher_in = student_map(self.tap, self, batch, out, strategy)
        if student is None:
            return None
        if student.dim() != 4:
            raise UsageError(f"freq_kd layer={self.tap.path!r} gives a {student.dim()}-D output {tuple(student.shape)}; "
                             f"expected a [N, C, H, W] feature map (give another layer=)")
        side = 2**self.levels
        if self.domain == "haar" and (student.shape[-1] % side or student.shape[-2] % side):
            raise UsageError(f"freq_kd layer={self.tap.path!r} gives {tuple(student.shape[-2:])} maps; a {self.levels}-level "
                             f"Haar transform needs sides divisible by {side} (give another layer= or levels=1)")
        with torch.no_grad():
            teacher = self.tap.output_of(self.teacher["backbone"], teacher_in)
        return frequency_kd(student, teacher, self.low_weight, self.high_weight, self.levels, self.domain, self.cutoff)

    def report(self):
        # the layer the default resolved to, once `setup` found it
        return {**super().report(), "layer": self.tap.path if self.tap is not None else self.layer}

