"""LoRD: Low-redundancy Distillation for Continual Learning (Liu et al., Pattern Recognition 2025; arXiv 2309.16117).

Three redundancies are cut from DER++:
- student: the network is a prefix sub-network of one CIFAR ResNet-18 that widens task
  by task on a cosine schedule (stage s_t = s_{t-1} + round(r/2 (1 + cos(pi t/(T-1))))),
  all widths W[s_t - 1] of a sorted width list; narrower nets use the first channels of
  every weight, so early tasks train a few percent of the weights;
- teacher: before each task t >= 1 the inner channels of every block are re-ordered by
  L1 importance (the full network's function is unchanged), random sub-networks of the
  stage reached so far are scored by MSE(f_sub(z), f_prev(z)) * exp(-params fraction) on
  Gaussian noise z, and the best one under 0.95 of the full size is copied out as a frozen
  teacher; each step adds 0.05 * MSE(student's teacher-shaped sub-network(x), teacher(x));
- samples: DER++ replay terms, but a batch is written to the buffer only with
  probability exp(-0.75 * teacher params fraction).

This implements the mechanism the paper describes.  The released code gates the schedule
and the teacher search on the model name `e2n` while the model registers as `lord`, so as
released it silently trains plain DER++ at full width with no teacher and always inserts.
clbench choices the paper leaves open: the search and the teacher use batch statistics in
BatchNorm (the released training-mode behaviour) without ever writing running statistics
(the released search overwrote them with noise statistics); the teacher's cost and the
search's FLOPs are reported (`report()["search_flops"]`), the search runs outside `fit`
because it takes no gradient step.  The head covers all classes from the first task,
as in the code.  A run's backbone is used if it is a CIFAR ResNet (`resnet18_cifar*`);
otherwise LoRD builds one at width `nf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from clbench.strategies import der_pp
from torch import nn

from clbench.config import (
    non_negative_integers,
    non_negative_numbers,
    positive_integers,
    unit_interval,
)
from clbench.models.backbones import CIFAR_RESNET18, CifarResNet
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo, Output

WIDTHS_10 = tuple(round(0.1 * i, 2) for i in range(1, 11))  # S-CIFAR-10
WIDTHS_19 = tuple(round(0.05 * i, 2) for i in range(1, 19)) + (1.0,)  # other datasets


@dataclass(frozen=True)
class Config(der_pp.Config):
    distill_weight: float = 0.05
    insertion_decay: float = 0.75  # store a batch with probability exp(-decay * teacher params fraction)
    search_samples: int = 500
    search_noise: int = 32
    size_cap: float = 0.95  # teacher params < size_cap * full network
    widths: tuple[float, ...] = ()  # empty: 10 ratios for 5 tasks, else 19 (the released lists)
    schedule_r: float = 0.0  # 0: 4 for 5 tasks, 3.5 for 10, else 1 (the released rule)
    nf: int = 64  # width of the CIFAR ResNet-18 built when the run's backbone is not one
    # the released code is Mammoth's DER++: the current batch and the two replay draws in three passes,
    # each with its own BatchNorm statistics (the student is a width-sliced ResNet)
    joint_forward: bool = False

    def __post_init__(self):
        super().__post_init__()
        non_negative_numbers(self, "distill_weight", "insertion_decay", "schedule_r")
        positive_integers(self, "search_samples", "nf")
        non_negative_integers(self, "search_noise")
        unit_interval(self, "size_cap")


@register_strategy("lord")
class LoRD(der_pp.DERPP):
    """LoRD: widening prefix student, pruned-teacher distillation, DER++ replay with sparse insertion."""

    Config = Config
    DEFAULTS = {"cifar*": CIFAR_RESNET18, "tinyimagenet-*": CIFAR_RESNET18}  # Mammoth's ResNet-18 (3x3 stem)
    contract_scenario = "synthetic32-3"
    PAPER_SETTINGS = {  # official best args, buffer 200 (Mammoth protocol, no lr schedule; no accuracy table could be read)
        "cifar10-5": {**der_pp.er.MAMMOTH_PROTOCOL, "lr": 0.03, "epochs": 50, "replay_batch_size": 32,
                      "buffer_size": 200, "alpha": 0.1, "beta": 0.5},
        "tinyimagenet-10": {**der_pp.er.MAMMOTH_PROTOCOL, "lr": 0.03, "epochs": 100, "replay_batch_size": 32,
                            "buffer_size": 200, "alpha": 0.1, "beta": 1.0},
    }
    PUBLISHED: dict = {}  # the paper's result tables could not be read

    def __init__(self, backbone: nn.Module, num_classes: int, cfg=None, **kwargs):
        cfg = cfg if cfg is not None else self.Config()
        if not isinstance(backbone, CifarResNet):
            backbone = CifarResNet(nf=cfg.nf, in_chans=_image_channels(backbone))
        super().__init__(backbone, num_classes, cfg, **kwargs)
        self.stage = 0  # s_t: the student uses widths[stage - 1]; 0 = before the first task (full width)
        self.kappa: Arch | None = None  # the teacher's shape
        self.kappa_index: tuple[list[int], list[int]] | None = None  # its width indices per stage and block
        self.teacher_rho = 0.0
        self.__dict__["teacher"] = None  # frozen, outside state_dict (saved in extra_state)
        self.input_shape: tuple[int, ...] | None = None
        self.search_flops: list[int] = []
        self.insert_generator = torch.Generator().manual_seed(self.seed + 11)

    # ---- schedule
    def width_list(self, exp: ExperienceInfo) -> tuple[float, ...]:
        return self.cfg.widths or (WIDTHS_10 if exp.num_experiences == 5 else WIDTHS_19)

    def student_arch(self) -> Arch:
        if self.stage == 0:
            return Arch.full(self.backbone)
        w = self.widths[self.stage - 1]
        return Arch.uniform(self.backbone, w, w)

    # ---- experience level
    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        self.head.grow(self.num_classes)  # all classes from the first task (the width schedule needs T anyway)
        self.widths = self.width_list(exp)
        steps = stage_increments(exp.num_experiences, self.cfg.schedule_r or default_r(exp.num_experiences))
        if not exp.is_first and self.input_shape is not None:
            self.choose_teacher(exp)
        self.stage = min(sum(steps[: exp.index + 1]), len(self.widths))

    def choose_teacher(self, exp: ExperienceInfo) -> None:
        from clbench.edge.flops import measure_flops

        g = torch.Generator().manual_seed(self.seed * 1000 + exp.index)
        found: dict = {}

        def search():
            z = torch.randn((self.cfg.search_noise, *self.input_shape), generator=g).to(self.device)
            with torch.no_grad():
                reference = self.logits_at(self.student_arch(), z, bn="batch")  # before re-ordering
                reorder_inner_channels(self.backbone)
                found["arch"] = search_teacher(self, z, reference, g)

        self.search_flops.append(measure_flops(search))
        if found["arch"] is not None:
            kappa, self.kappa_index = found["arch"]
            self.kappa = kappa
            self.teacher_rho = self.params_fraction(kappa)
            self.__dict__["teacher"] = extract(self.backbone, self.head, kappa)

    # ---- forward passes
    def logits_at(self, arch: Arch, x: torch.Tensor, bn: str) -> torch.Tensor:
        h = elastic_features(self.backbone, arch, x, bn)
        return self.head(F.pad(h, (0, self.backbone.num_features - h.shape[1])))

    def forward(self, x: torch.Tensor) -> Output:
        h = elastic_features(self.backbone, self.student_arch(), x, "train" if self.training else "eval")
        h = F.pad(h, (0, self.backbone.num_features - h.shape[1]))  # the head's unused columns see zeros
        return Output(self.head(h), h)

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.input_shape is None:
            self.input_shape = tuple(batch.x.shape[1:])
        losses = super().step_losses(batch)  # CE at max-net + DER++'s replay terms
        teacher = self.teacher
        if teacher is not None:
            with torch.no_grad():
                target = teacher_forward(teacher.to(self.device), batch.x)
            sub = self.logits_at(self.kappa, batch.x, bn="batch")  # the student's teacher-shaped sub-network
            losses["distill"] = self.cfg.distill_weight * F.mse_loss(sub[:, : target.shape[1]], target)
        return losses

    # ---- sample redundancy
    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        if self.phase.name == "train" and self.should_store():
            self.buffer.add(**self.insertion(batch))

    def should_store(self) -> bool:
        p = math.exp(-self.cfg.insertion_decay * self.teacher_rho)
        return float(torch.rand(1, generator=self.insert_generator)) < p

    # ---- accounting
    def params_fraction(self, arch: Arch) -> float:
        return arch_params(self.backbone, arch, self.head.out_features) / arch_params(
            self.backbone, Arch.full(self.backbone), self.head.out_features
        )

    def report(self) -> dict:
        return {
            **super().report(),
            "student_width": self.widths[self.stage - 1] if self.stage else 1.0,
            "teacher_params_fraction": self.teacher_rho,
            "search_flops": self.search_flops,
        }

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {**super().extra_state(), "insert_generator": self.insert_generator.get_state(), "stage": torch.tensor(self.stage),
                 "widths": torch.tensor(getattr(self, "widths", ()), dtype=torch.float64),
                 "teacher_rho": torch.tensor(self.teacher_rho, dtype=torch.float64), "search_flops": torch.tensor(self.search_flops, dtype=torch.long)}
        if self.input_shape is not None:
            state["input_shape"] = torch.tensor(self.input_shape)
        if self.teacher is not None:
            state["kappa"] = self.kappa.as_tensor()
            state["kappa_index"] = torch.tensor(self.kappa_index[0] + self.kappa_index[1])
            # the teacher lies outside the module tree, so moving the strategy does not move it:
            # copies on the CPU keep a checkpoint's tensors on one device
            state.update({f"teacher.{k}": v.detach().to("cpu", copy=True) for k, v in self.teacher.state_dict().items()})
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state)
        self.insert_generator.set_state(state["insert_generator"])
        self.teacher_rho = float(state["teacher_rho"])
        self.stage, self.widths = int(state["stage"]), tuple(state["widths"].tolist())
        self.search_flops = state["search_flops"].tolist()
        self.input_shape = tuple(state["input_shape"].tolist()) if "input_shape" in state else None
        if "kappa" in state:
            self.kappa = Arch.from_tensor(state["kappa"])
            idx = state["kappa_index"].tolist()
            self.kappa_index = (idx[:4], idx[4:])
            teacher = extract(self.backbone, self.head, self.kappa)
            teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})
            self.__dict__["teacher"] = teacher
        else:
            self.kappa, self.kappa_index, self.__dict__["teacher"] = None, None, None


# --------------------------------------------------------------------------- widths and schedule
def make8(v: float) -> int:
    """Nearest multiple of 8, at least 8, never more than 10% below `v`."""
    out = max(8, int(v + 4) // 8 * 8)
    return out + 8 if out < 0.9 * v else out


def default_r(num_tasks: int) -> float:
    return {5: 4.0, 10: 3.5}.get(num_tasks, 1.0)


def stage_increments(num_tasks: int, r: float) -> list[int]:
    """p_t = round(r/2 (1 + cos(pi t / (T-1)))), at least 1 except for the last task."""
    steps = []
    for t in range(num_tasks):
        p = round(r / 2 * (1 + math.cos(math.pi * t / max(num_tasks - 1, 1))))
        steps.append(p if t == num_tasks - 1 else max(p, 1))
    return steps


def student_widths(num_tasks: int, widths=None, r: float | None = None) -> list[float]:
    widths = widths or (WIDTHS_10 if num_tasks == 5 else WIDTHS_19)
    stages, s = [], 0
    for p in stage_increments(num_tasks, r or default_r(num_tasks)):
        s = min(s + p, len(widths))
        stages.append(widths[s - 1])
    return stages


# --------------------------------------------------------------------------- elastic CIFAR ResNet
@dataclass(frozen=True)
class Arch:
    """Active channels: stage outputs (the stem shares stage 1's) and each block's inner width."""

    stages: tuple[int, ...]
    inner: tuple[int, ...]

    @staticmethod
    def full(net: CifarResNet) -> "Arch":
        blocks = _blocks(net)
        return Arch(tuple(layer[0].conv2.out_channels for layer in _layers(net)), tuple(b.conv1.out_channels for _, b in blocks))

    @staticmethod
    def of(net: CifarResNet, stage_w: list[float], block_e: list[float]) -> "Arch":
        stages = tuple(make8(layer[0].conv2.out_channels * w) for layer, w in zip(_layers(net), stage_w))
        inner = tuple(make8(stages[s] * e) for (s, _), e in zip(_blocks(net), block_e))
        full = Arch.full(net)
        return Arch(tuple(map(min, stages, full.stages)), tuple(map(min, inner, full.inner)))

    @staticmethod
    def uniform(net: CifarResNet, w: float, e: float) -> "Arch":
        return Arch.of(net, [w] * 4, [e] * len(_blocks(net)))

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([len(self.stages), *self.stages, *self.inner])

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "Arch":
        v = t.tolist()
        return Arch(tuple(v[1 : 1 + v[0]]), tuple(v[1 + v[0] :]))


def _layers(net: CifarResNet):
    return [net.layer1, net.layer2, net.layer3, net.layer4]


def _blocks(net: CifarResNet):
    return [(s, b) for s, layer in enumerate(_layers(net)) for b in layer]


def _bn(x, bn: nn.BatchNorm2d, c: int, mode: str) -> torch.Tensor:
    w, b = bn.weight[:c], bn.bias[:c]
    if mode == "train":  # the running statistics' prefix is updated in place (views of the full buffers)
        return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], w, b, True, bn.momentum, bn.eps)
    if mode == "batch":  # batch statistics, running statistics untouched
        return F.batch_norm(x, None, None, w, b, True, 0.0, bn.eps)
    return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], w, b, False, 0.0, bn.eps)


def elastic_features(net: CifarResNet, arch: Arch, x: torch.Tensor, bn: str) -> torch.Tensor:
    """Pooled features of the prefix sub-network `arch` of `net` (width arch.stages[-1])."""
    cin = arch.stages[0]
    x = F.relu(_bn(F.conv2d(x, net.conv1.weight[:cin], padding=1), net.bn1, cin, bn))
    for (s, block), mid in zip(_blocks(net), arch.inner):
        cout, stride = arch.stages[s], block.conv1.stride
        out = F.relu(_bn(F.conv2d(x, block.conv1.weight[:mid, :cin], stride=stride, padding=1), block.bn1, mid, bn))
        out = _bn(F.conv2d(out, block.conv2.weight[:cout, :mid], padding=1), block.bn2, cout, bn)
        if len(block.shortcut):
            conv, norm = block.shortcut
            x = _bn(F.conv2d(x, conv.weight[:cout, :cin], stride=conv.stride), norm, cout, bn)
        x = F.relu(out + x)
        cin = cout
    return x.mean(dim=(2, 3))


def _active(net: CifarResNet, arch: Arch):
    """(module, out channels, in channels) for every conv and BatchNorm of the sub-network."""
    yield net.conv1, arch.stages[0], net.conv1.in_channels
    yield net.bn1, arch.stages[0], None
    cin = arch.stages[0]
    for (s, block), mid in zip(_blocks(net), arch.inner):
        cout = arch.stages[s]
        yield from ((block.conv1, mid, cin), (block.bn1, mid, None), (block.conv2, cout, mid), (block.bn2, cout, None))
        if len(block.shortcut):
            yield from ((block.shortcut[0], cout, cin), (block.shortcut[1], cout, None))
        cin = cout


def arch_params(net: CifarResNet, arch: Arch, num_classes: int) -> int:
    """Parameters of the sub-network `arch` with a `num_classes` head on its features."""
    total = 0
    for m, cout, cin in _active(net, arch):
        total += cout * cin * m.weight[0, 0].numel() if cin is not None else 2 * cout
    return total + arch.stages[-1] * num_classes + num_classes


@torch.no_grad()
def reorder_inner_channels(net: CifarResNet) -> None:
    """Sort each block's inner channels by the L1 norm of the conv2 weights that read them (descending)."""
    for _, block in _blocks(net):
        order = block.conv2.weight.abs().sum(dim=(0, 2, 3)).argsort(descending=True)
        block.conv1.weight.copy_(block.conv1.weight[order])
        for t in (block.bn1.weight, block.bn1.bias, block.bn1.running_mean, block.bn1.running_var):
            t.copy_(t[order])
        block.conv2.weight.copy_(block.conv2.weight[:, order])


@torch.no_grad()
def search_teacher(strategy: LoRD, z: torch.Tensor, reference: torch.Tensor, g: torch.Generator):
    """Lowest MSE * exp(-params fraction) among random sub-networks of the reached stage under the size cap."""
    net, s = strategy.backbone, strategy.stage
    # from the second search on, every choice is at least as wide as the previous teacher's
    lo_w, lo_e = strategy.kappa_index or ([0] * 4, [0] * len(_blocks(net)))
    full = arch_params(net, Arch.full(net), strategy.head.out_features)
    best, best_score, scored = None, math.inf, {}
    for _ in range(strategy.cfg.search_samples):
        w_idx = [int(torch.randint(min(lo, s - 1), s, (1,), generator=g)) for lo in lo_w]
        e_idx = [int(torch.randint(min(lo, s - 1), s, (1,), generator=g)) for lo in lo_e]
        arch = Arch.of(net, [strategy.widths[i] for i in w_idx], [strategy.widths[i] for i in e_idx])
        if arch in scored:
            continue
        params = arch_params(net, arch, strategy.head.out_features)
        if params >= strategy.cfg.size_cap * full:
            scored[arch] = math.inf
            continue
        score = float(F.mse_loss(strategy.logits_at(arch, z, bn="batch"), reference)) * math.exp(-params / full)
        scored[arch] = score
        if score < best_score:
            best, best_score = (arch, (w_idx, e_idx)), score
    return best


def extract(net: CifarResNet, head: nn.Module, arch: Arch) -> nn.Module:
    """A frozen, separate copy of the sub-network `arch` (sliced weights) with its head."""
    import copy

    sub = copy.deepcopy(net)
    for m, cout, cin in _active(sub, arch):
        if cin is not None:
            m.weight = nn.Parameter(m.weight[:cout, :cin].clone())
        else:
            m.weight, m.bias = nn.Parameter(m.weight[:cout].clone()), nn.Parameter(m.bias[:cout].clone())
            m.running_mean, m.running_var = m.running_mean[:cout].clone(), m.running_var[:cout].clone()
    fc = head.fc
    sub_head = nn.Linear(arch.stages[-1], fc.out_features)
    with torch.no_grad():
        sub_head.weight.copy_(fc.weight[:, : arch.stages[-1]])
        sub_head.bias.copy_(fc.bias)
    teacher = nn.ModuleDict({"backbone": sub, "head": sub_head})
    teacher.arch = arch
    teacher.requires_grad_(False)
    return teacher


def teacher_forward(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return teacher["head"](elastic_features(teacher["backbone"], teacher.arch, x, "batch"))


def _image_channels(backbone: nn.Module) -> int:
    conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else int(getattr(backbone, "in_chans", 3))
