"""CLFD: Continual Learning in the Frequency Domain (Liu et al., NeurIPS 2024), over a replay method.

Input side: a fixed one-level Haar wavelet transform plus three bias-free 1x1
convolutions (24 weights) turn each RGB image into a 3-channel code of half the height
and width; the unchanged backbone runs on the code (4x fewer pixels), and the replay
buffer stores codes (4x as many as images in the same bytes).  The encoder is frozen
from the last epoch of the first experience on, when the buffer is emptied and refilled
with codes of the frozen encoder.
Output side (class-aware frequency-domain feature selection): k-winner-take-all keeps
the 60% largest-magnitude pooled features, always; in training, the current batch's
features are also multiplied by a class-wise random mask m_j = 1[u_j < P[y, j]].  P starts
as a prefix mask (first experience) or 0.6 (later ones), is set for a new class from how
similar its low-frequency band is to old classes' (end of the first epoch), and after
the warm-up (epochs > 0.4 * Ep) follows P[c] = 1 - exp(-2 A[c] / max A[c]), with A the
per-class counts of units that survived k-WTA.

Pluggable: `er_clfd`, `der_pp_clfd`, `er_ace_clfd` and `cls_er_clfd` are the base
methods with `CLFDMixin` in front; `clfd` builds one of them from `base=...`.
Formulas follow the official code (the paper body leaves several of them implicit).  clbench choices: the code-domain crop pads with the code of a black
image, given per input channel by `pad_pixel` (the value a zero intensity takes after the
scenario's normalisation; default 0, right for un-normalised inputs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from clbench.scenarios.cifar import CIFAR10
from clbench.scenarios.tinyimagenet import MAMMOTH
from clbench.strategies import cls_er, der_pp, er
from clbench.strategies._replay import Replay
from torch import nn

from clbench.errors import UsageError
from clbench.models.backbones import CIFAR_RESNET18
from clbench.models.buffers import make_buffer
from clbench.models.wavelets import haar_dwt
from clbench.registry import STRATEGIES, register_strategy
from clbench.types import Batch, ExperienceInfo, Output

BASES = ("er", "der_pp", "er_ace", "cls_er")

# Official best args (SGD without momentum, batch = replay batch = 32), nominal buffer 125 images (500 codes).
# The paper's Table 1, buffer 125, Class-IL: CLFD-ER 55.76 (S-CIFAR-10) / 8.89 (S-Tiny-ImageNet).
_COMMON = {**er.MAMMOTH_PROTOCOL, "replay_batch_size": 32, "buffer_size": 125}  # CLFD's runs: buffer 125
# the normalised value of a black pixel, per scenario: the code-domain crop pads with black (a zero
# pad would be mid-grey after normalisation)
BLACK_PIXEL = {name: tuple(round(-m / s, 6) for m, s in zip(mean, std))
               for name, mean, std in (("cifar10-5", CIFAR10.mean, CIFAR10.std),
                                       ("tinyimagenet-10", MAMMOTH.mean, MAMMOTH.std))}


def paper_settings(per_scenario: dict[str, dict]) -> dict[str, dict]:
    """A CLFD variant's published settings, with the scenario's black pixel as `pad_pixel`."""
    return {name: {**values, "pad_pixel": BLACK_PIXEL[name]} for name, values in per_scenario.items()}


ER_SETTINGS = paper_settings({
    "cifar10-5": {**_COMMON, "lr": 0.1, "epochs": 50},
    "tinyimagenet-10": {**_COMMON, "lr": 0.03, "epochs": 100},
})


def published(method: str, cifar10: float, tiny: float) -> dict[str, dict]:
    """A CLFD variant's Class-IL accuracies in the paper's Table 1 (buffer 125)."""
    return {"cifar10-5": {"metric": "final_avg_acc", "value": cifar10,
                          "source": f"CLFD paper (NeurIPS 2024), Table 1, {method}, S-CIFAR-10 Class-IL, buffer 125"},
            "tinyimagenet-10": {"metric": "final_avg_acc", "value": tiny,
                                "source": f"CLFD paper (NeurIPS 2024), Table 1, {method}, S-Tiny-ImageNet Class-IL, buffer 125"}}


ER_PUBLISHED = published("CLFD-ER", 0.5576, 0.0889)


@dataclass(frozen=True)
class CLFDOptions:
    kwta_ratio: float = 0.6  # fraction of pooled features k-WTA keeps
    initial_mask_factor: float = 1.1  # first experience: units [0, floor(D * 1.1 * 0.6)) may be used
    warmup_ratio: float = 0.4  # P follows the activation counts after epoch 0.4 * Ep
    mask_factor: float = 2.0  # P[c] = 1 - exp(-mask_factor * A[c] / max A[c])
    crop_pad: int = 2  # code-domain random crop padding
    code_augment: bool = True  # random crop + flip of replayed codes
    pad_pixel: tuple[float, ...] = ()  # per-channel input value of a black pixel (empty: 0)


# --------------------------------------------------------------------------- the frequency encoder
class FrequencyEncoder(nn.Module):
    """Haar DWT + three bias-free 1x1 convs: [low(LL), global(all bands), high(details)] -> 3 x H/2 x W/2."""

    def __init__(self, in_chans: int = 3):
        super().__init__()
        self.low = nn.Conv2d(in_chans, 1, 1, bias=False)
        self.all_bands = nn.Conv2d(4 * in_chans, 1, 1, bias=False)
        self.high = nn.Conv2d(3 * in_chans, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ll, details = haar_dwt(x)
        return torch.cat([self.low(ll), self.all_bands(torch.cat([ll, details], 1)), self.high(details)], 1)


# --------------------------------------------------------------------------- the method, over a replay base
class CLFDMixin:
    """Put in front of a `Replay` base: `class DERPPCLFD(CLFDMixin, DERPP)`."""

    contract_scenario = "synthetic32-3"
    input_channels = 3  # the Haar encoder maps RGB to 3 half-size code channels

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if _input_channels(self.backbone) != self.input_channels:
            raise UsageError(
                "CLFD feeds 3-channel half-size codes to the backbone; expected a convolutional backbone "
                "with 3 input channels (e.g. --backbone resnet18_cifar), got "
                f"{type(self.backbone).__name__} with {_input_channels(self.backbone)} input channels"
            )
        self.encoder = FrequencyEncoder(3)
        self.buffer = make_buffer(4 * self.cfg.buffer_size, self.cfg.buffer_policy, seed=self.seed)  # a code is 1/4 image
        d, c = self.backbone.num_features, self.num_classes
        self.k = int(math.floor(self.cfg.kwta_ratio * d))
        self.register_buffer("activation_counts", torch.zeros(c, d))  # A
        self.register_buffer("keep_probs", torch.ones(c, d))  # P
        self.register_buffer("similarity", torch.zeros(c, c))  # S
        self.low_band_sums: torch.Tensor | None = None  # Q, shaped by the first images seen
        self.accumulate_low_band = False
        self.task_samples = 0

    # ---- forward passes
    def forward(self, x: torch.Tensor) -> Output:
        return self.forward_codes(self.encoder(x))

    def forward_codes(self, z: torch.Tensor, y: torch.Tensor | None = None) -> Output:
        """Backbone on codes, then (current batch only) the class-wise mask, then k-WTA, then the head."""
        h = self.backbone(z)
        if y is not None:
            u = torch.rand(h.shape[1], device=h.device)  # one draw per batch, shared by its samples
            h = h * (u[None, :] < self.keep_probs[y]).to(h.dtype)
        h = kwta(h, self.k)
        return Output(self.head(h), h)

    def current_output(self, batch: Batch) -> Output:
        training = self.training and self.phase.name == "train"
        out = self.remember(self.forward_codes(self.encoder(batch.x), batch.y if training else None))
        if training:
            with torch.no_grad():
                self.activation_counts.index_add_(0, batch.y, (out.features != 0).to(self.activation_counts.dtype))
        return out

    def replay_output(self, z: torch.Tensor) -> Output:
        return self.forward_codes(z)

    @torch.no_grad()
    def buffer_inputs(self, batch: Batch) -> torch.Tensor:
        return self.encoder(batch.stored_x)

    def replay_view(self, z: torch.Tensor) -> torch.Tensor:
        if not self.cfg.code_augment:
            return z
        return crop_and_flip(z, self.black_code(z), self.cfg.crop_pad)

    @torch.no_grad()
    def black_code(self, z: torch.Tensor) -> torch.Tensor:
        """The code of an all-black image, per code channel (padding with zeros would not be black)."""
        pixel = torch.tensor(self.cfg.pad_pixel or (0.0,) * 3, dtype=z.dtype, device=z.device)
        return self.encoder(pixel.view(1, -1, 1, 1).expand(1, -1, 2, 2).contiguous())[0, :, 0, 0]

    # ---- the epoch schedule (Lightning hooks: inside trainer.fit)
    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        self.task_samples = 0
        if not exp.is_first:
            self.encoder.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        if self.phase.name != "train":
            return
        epoch, last = self.current_epoch + 1, self.trainer.max_epochs
        new = torch.tensor(self.experience.classes)
        if self.experience.is_first:
            if epoch == 1:
                self.keep_probs[new] = initial_keep_probs(self.keep_probs.shape[1], self.cfg.kwta_ratio, self.cfg.initial_mask_factor).to(self.keep_probs)
            if epoch == last:  # from here on codes never change: refill the buffer with the frozen encoder's
                self.encoder.requires_grad_(False)
                self.buffer.clear()
                self.accumulate_low_band = True
        elif epoch == 1:
            self.keep_probs[new] = self.cfg.kwta_ratio
            self.accumulate_low_band = True

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.phase.name != "train":
            return
        epoch, last = self.current_epoch + 1, self.trainer.max_epochs
        exp = self.experience
        if not exp.is_first and epoch == 1:
            self.accumulate_low_band = False
            self.set_new_class_probs(exp)
        if epoch > self.cfg.warmup_ratio * last:
            seen = torch.tensor(exp.seen_classes)
            self.keep_probs[seen] = activation_keep_probs(self.activation_counts[seen], self.cfg.mask_factor)

    @torch.no_grad()
    def set_new_class_probs(self, exp: ExperienceInfo) -> None:
        q = self.low_band_sums
        old, new = list(exp.past_classes), list(exp.classes)
        self.similarity[torch.tensor(new)[:, None], torch.tensor(old)[None, :]] = F.cosine_similarity(
            q[new][:, None, :], q[old][None, :, :], dim=2
        ).to(self.similarity)
        for i in new:
            self.keep_probs[i] = new_class_keep_probs(self.activation_counts[old], self.similarity[i, old])

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        if self.phase.name == "train":
            self.task_samples += len(batch)
            if self.accumulate_low_band:
                with torch.no_grad():
                    ll = haar_dwt(batch.stored_x)[0].flatten(1).cpu()
                    if self.low_band_sums is None:
                        self.low_band_sums = torch.zeros(self.num_classes, ll.shape[1])
                    # summed in float32 whatever the run's precision (a 64- or 16-bit run has ll in its own dtype)
                    self.low_band_sums.index_add_(0, batch.y.cpu(), ll.to(self.low_band_sums.dtype))
        super().on_train_batch_end(outputs, batch, batch_idx)

    def on_experience_end(self, exp: ExperienceInfo, train_set) -> None:
        self.accumulate_low_band = False
        if exp.is_first:  # insertion odds as if the buffer had never been emptied
            self.buffer.num_seen = self.task_samples
        super().on_experience_end(exp, train_set)

    # ---- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = super().extra_state()
        if self.low_band_sums is not None:
            state["low_band_sums"] = self.low_band_sums.clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state)
        self.low_band_sums = state["low_band_sums"].clone() if "low_band_sums" in state else None

    def report(self) -> dict:
        return {**super().report(), "buffer_codes_capacity": self.buffer.capacity, "nominal_buffer_images": self.cfg.buffer_size}


# --------------------------------------------------------------------------- pure helpers
def kwta(h: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest-magnitude units of each row, zero the rest."""
    keep = torch.zeros_like(h).scatter_(1, h.abs().topk(k, dim=1).indices, 1.0)
    return h * keep


def initial_keep_probs(d: int, kwta_ratio: float, factor: float) -> torch.Tensor:
    p = torch.zeros(d)
    p[: int(math.floor(d * factor * kwta_ratio))] = 1.0
    return p


def activation_keep_probs(counts: torch.Tensor, factor: float) -> torch.Tensor:
    """P[c] = 1 - exp(-factor * A[c] / max_j A[c, j]) per row."""
    return 1 - torch.exp(-factor * counts / counts.max(dim=1, keepdim=True).values.clamp_min(1))


def new_class_keep_probs(old_counts: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
    """(p- + p+)/2 for a new class with cosine similarities `sims` to the old classes (rows of `old_counts`).

    p- avoids the units the least similar old class relies on, p+ reuses those of the most similar.
    """
    shifted = sims + 1
    mean = shifted.mean()
    lo, hi = int(sims.argmin()), int(sims.argmax())
    a_lo, a_hi = old_counts[lo], old_counts[hi]
    p_minus = torch.exp(-a_lo * (mean / shifted[lo].clamp_min(1e-12)) / a_lo.max().clamp_min(1))
    p_plus = 1 - torch.exp(-a_hi * (shifted[hi] / mean) / a_hi.max().clamp_min(1))
    return (p_minus + p_plus) / 2


def crop_and_flip(z: torch.Tensor, fill: torch.Tensor, pad: int) -> torch.Tensor:
    """Per sample: pad by `pad` with the per-channel `fill`, crop back at a random offset, flip with p=0.5."""
    n, c, h, w = z.shape
    canvas = fill.view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    canvas[:, :, pad : pad + h, pad : pad + w] = z
    dy = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    flip = (torch.rand(n) < 0.5).tolist()
    out = torch.stack([canvas[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return torch.where(torch.tensor(flip, device=z.device)[:, None, None, None], out.flip(3), out)


def _input_channels(backbone: nn.Module) -> int | None:
    conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


# --------------------------------------------------------------------------- `clfd`: pick the base by name
@dataclass(frozen=True)
class Config(cls_er.Config, der_pp.Config, CLFDOptions):
    base: str = "er"  # er | der_pp | er_ace | cls_er


@register_strategy("clfd")
class CLFD(CLFDMixin, Replay):
    """CLFD (frequency-domain encoder + class-aware feature selection); over ER, or base=der_pp|er_ace|cls_er."""

    Config = Config
    # Mammoth's ResNet-18 (3x3 stem, nf=64) on every benchmark of the paper, ImageNet-R at 224 px included
    DEFAULTS = {"cifar*": CIFAR_RESNET18, "tinyimagenet-*": CIFAR_RESNET18, "imagenet-r-*": CIFAR_RESNET18}
    PAPER_SETTINGS = ER_SETTINGS  # CLFD-ER's: use `<base>_clfd --paper-settings` for the other bases
    PUBLISHED = ER_PUBLISHED

    def __new__(cls, backbone=None, num_classes=None, cfg=None, **kwargs):
        base = getattr(cfg, "base", "er")
        if cls is not CLFD or base == "er":
            return super().__new__(cls)
        if base not in BASES:
            raise UsageError(f"base={base!r} is invalid; expected one of: {', '.join(BASES)}")
        combo = STRATEGIES.get(f"{base}_clfd")
        own = {f.name for f in fields(combo.Config)}
        return combo(backbone, num_classes, combo.Config(**{k: v for k, v in asdict(cfg).items() if k in own}), **kwargs)

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """CLFD-ER: CE on the current batch (masked, k-WTA) + CE on a separate batch of replayed codes."""
        out = self.current_output(batch)
        losses = {"ce": F.cross_entropy(out.logits, batch.y)}
        replay = self.draw()
        if replay:
            losses["replay_ce"] = F.cross_entropy(self.replay_output(replay["x"]).logits, replay["y"])
        return losses
