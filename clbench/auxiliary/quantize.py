"""The `quantize` add-on: how much accuracy, model size and compute (BOPs) a continual learner keeps
or saves at low bit-widths, so a method's results can be read for edge deployment. After every
experience it quantizes a copy of the model after training (PTQ) and scores it beside the FP32
model, or it trains the model through the quantizers (QAT); the FP32 run is never changed by PTQ.

Pure-PyTorch fake quantization (no `torch.ao`, no torchao): a quantized value is computed in
float as `x_hat = s * (q - z)`, so any bit-width runs on any device.

Quantizers (section 2.2), for bit-width b:

* weights: symmetric signed grid, one scale per output channel (or per group of
  `group_size` inputs for Linear layers), restricted range
  `q = clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)`, `s = max|w| / (2^(b-1) - 1)`;
* activations (the input of every quantized Conv2d / Linear): asymmetric per tensor,
  `s = (hi - lo) / (2^b - 1)`, `z = clamp(round(-lo / s), 0, 2^b - 1)`; an input that was
  never negative during calibration (post-ReLU) gets the unsigned grid `lo = 0`, so `z = 0`;
* the first layer the backbone runs and the classifier (the Linear layers of the strategy's
  head) stay at 8 bits unless `quantize_first_last=true`; norms, biases and everything that
  is not a Conv2d / Linear stay FP32. Layers the model never calls as modules (a cosine
  head that uses `fc.weight` directly) stay FP32 and count as unquantized.

Calibrators (section 2.3), for weights (per channel / group) and activations (per tensor):
`minmax`, `percentile` (clip at the `percentile`-th percentile, 99.99 by default), `mse`
(the clipping ratio alpha in {0.50, 0.55, ..., 1.00} of the min-max range that minimises the
squared quantization error). Weights of 4 bits or fewer default to `mse`, others to
`minmax`; activations default to `percentile`.

Kurtosis-driven mixed precision (section 2.6, `mixed="kurtosis"`): per output channel c of
every layer at the chosen bit-width, kappa_c = E[(w - mu_c)^4] / sigma_c^4; going down the
channels of all those layers in decreasing kappa, each gets `high_bits` (8) while the weights so
promoted stay within `high_fraction` (10%) of their weights; the rest keep `weight_bits`. The
record gives the realised mean weight bit-width (`weight_bits_avg`) and the promoted channels;
size and BOPs count each channel at its own bit-width.

Salient calibration data (section 2.6, `calib_select="fisher"`; default `balanced`, the
class-balanced draw below): every candidate of the pool (current experience's kept inputs and
the replay buffer) is scored by s(x) = ||grad_theta CE(x)||^2 on the FP32 model (eval mode, one
backward per candidate); candidates at or above the 99th percentile of the scores are dropped as
outliers; then each seen class gets an even share k of `calib_samples`, filled with the
highest-scoring candidate of each of k k-means clusters (scikit-learn) of the class's backbone
embeddings.

Distillation between the quantized and the FP32 model (section 2.6, `distill_steps=N`, PTQ
only): after calibration the snapshot's quantizer scales (every weight row's step and every
layer's input step, as s = s0 * exp(theta), theta starting at 0) are tuned for N Adam steps
(`distill_lr`) with the FP32 model of the same experience as the teacher, on minibatches of
`distill_batch` calibration samples (current experience and buffer): tau^2 KL of the logits
(section 1.1, tau = `distill_temperature`) plus `distill_relation` times the relation loss of the
embeddings (section 1.3), the distillation add-ons' own loss functions. Rounding passes gradients
straight through, so a scale's gradient is LSQ's (q - w/s inside the grid, +-qmax where clipped).
Only scales move: weights stay on their grid, the bit-widths, size and BOPs are unchanged. The
record's `distill` holds the accuracy row before the tuning, the first and last loss and its wall
time; the tuning is not training of the run (the profiler does not meter it), and the optional
low-rank adapter some variants add is not built.

Outlier smoothing (section 2.6, QuantVGGT-style, PTQ only): `smooth="hadamard"` rotates the input
space of every Linear layer the model runs: W <- W H^T and x <- x H^T with H an orthonormal
Walsh-Hadamard matrix (of the largest power of two dividing the width, block-diagonal above it),
so an outlier channel is spread over the block before the per-tensor input grid is fit;
`"hadamard_channel"` then also smooths per input channel as SmoothQuant does (one more calibration
pass: s_c = max|x_c|^alpha / max|W_:,c|^(1-alpha), alpha = `smooth_alpha`; x <- x / s,
W <- W diag(s)). The FP32 product is unchanged; the record counts the online transforms' work
(`smoothing_ops` per sample: n log2(block) additions per input row for a fast transform, one
division per input value for smoothing) apart from the BOPs. Conv2d layers are left as they are.
It is described for timm ViT backbones; it applies to any Linear layer.

Modes:

* `ptq` (default). `after_evaluation` (after each experience's FP32 evaluation) deep-copies
  the backbone and head, folds every BatchNorm2d into the Conv2d whose output it normalises
  (found by tracing one forward), calibrates on up to `calib_samples` inputs, fake-quantizes
  weights and activations and scores the copy with the runner's `evaluate`. The copy runs
  through the strategy's own `predict_logits` (its backbone and head are swapped in for the
  call and swapped back), so methods with another inference rule keep it. The FP32 model
  is never written to: training continues on the same FP32 weights.
  Calibration data: the add-on cannot reach the experience's training set from its hooks,
  so `loss` (which sees every training batch) keeps a class-balanced reservoir of the
  current experience's un-augmented inputs (`batch.x_raw` when set), about
  `calib_samples / classes` per class, without gradients and with its own random generator
  (training, its random stream and its loss are unchanged; `loss` returns None). At
  calibration these are pooled with the replay buffer's stored inputs (`strategy.buffer`
  when it stores inputs of the same shape; read with `all()`, which draws no random numbers)
  and `calib_samples` are drawn class-balanced over all seen classes.
* `qat`: `setup` turns every Conv2d / Linear of the backbone and head into a fake-quant
  layer of the same parameters (the class is swapped, so parameter names, shapes, the
  optimiser and checkpoints are unchanged): weights per output channel, symmetric min-max,
  straight-through estimator; inputs with a running (EMA) min/max observer updated in
  training and frozen in evaluation. Layers a growing head creates are converted at the
  next experience start. The run's accuracy matrix is then the fake-quant model's own
  accuracy; `after_evaluation` records size and BOPs (from one stored training input) only. Calibrators, BN folding and
  per-group weights apply to `ptq` only.

Each `ptq` record in `aux_results["quantize"]` holds the quantized accuracy row (one
accuracy per test experience, 0 for unseen ones), the FP32 row recomputed with the same
evaluation, their seen-experience means and `delta_acc` = FP32 - quantized, average
forgetting (`clbench.metrics.forgetting_max`) of the quantized and FP32 rows so far (None
after the first experience, or after a resume; it is derivable from the stored rows), the
analytic model size and BOPs per sample (section 2.5) of the quantized and the FP32 model,
and the calibration samples, sources and wall time.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clbench.auxiliary.base import Aux, AuxConfig
from clbench.config import (integers_at_least, non_negative_integers, non_negative_numbers, one_of,
                            open_unit_interval, positive_integers, positive_numbers, require)
from clbench.errors import UsageError
from clbench.registry import register_aux

PRESETS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W2A4": (2, 4)}
CALIBRATORS = ("minmax", "percentile", "mse")
MSE_RATIOS = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))  # 0.50, 0.55, ..., 1.00
MIN_BITS, MAX_BITS = 2, 16
_SAMPLE_CAP = 1 << 18  # activation values kept per layer for the percentile and mse calibrators
_EPS = 1e-12


# --------------------------------------------------------------------------- quantizers
def symmetric_scale(max_abs: torch.Tensor, bits: int) -> torch.Tensor:
    """`s = max|x| / (2^(b-1) - 1)` (never 0, so an all-zero channel stays 0)."""
    return torch.clamp(max_abs / (2 ** (bits - 1) - 1), min=_EPS)


def quantize_symmetric(x: torch.Tensor, bits: int, max_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_hat, q, s) on the restricted signed grid; `max_abs` broadcasts against `x` (per channel)."""
    qmax = 2 ** (bits - 1) - 1
    s = symmetric_scale(max_abs, bits)
    q = torch.clamp(torch.round(x / s), -qmax, qmax)
    return s * q, q, s


def affine_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """(s, z) of the unsigned asymmetric grid over [lo, hi] (widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2**bits - 1
    s = max((hi - lo) / levels, _EPS)
    z = int(min(max(round(-lo / s), 0), levels))
    return s, z


def quantize_affine(x: torch.Tensor, bits: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(x_hat, q, s, z): `q = clamp(round(x/s) + z, 0, 2^b - 1)`, `x_hat = s (q - z)`."""
    s, z = affine_params(lo, hi, bits)
    q = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
    return s * (q - z), q, s, z


def _rows(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """The weight as (rows, k): one row per output channel, or per group of inputs (Linear)."""
    if group_size and w.dim() == 2:
        out, cols = w.shape
        pad = (-cols) % group_size
        if pad:  # zeros change neither max|w| nor the error
            w = F.pad(w, (0, pad))
        return w.reshape(out * ((cols + pad) // group_size), group_size), pad
    return w.reshape(w.shape[0], -1), 0


def weight_max_abs(rows: torch.Tensor, bits: int, method: str, percentile: float = 99.99) -> torch.Tensor:
    """Clipping value per row (shape (rows, 1)) chosen by `method`."""
    a = rows.abs()
    top = a.amax(dim=1, keepdim=True)
    if method == "minmax":
        return top
    if method == "percentile":
        return torch.quantile(a, percentile / 100.0, dim=1, keepdim=True)
    best, best_err = top, None
    for ratio in MSE_RATIOS:
        m = top * ratio
        err = ((quantize_symmetric(rows, bits, m)[0] - rows) ** 2).sum(dim=1, keepdim=True)
        if best_err is None:
            best, best_err = m, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, m, best), torch.where(better, err, best_err)
    return best


def fake_quant_weight(w: torch.Tensor, bits: int, method: str = "minmax", group_size: int = 0,
                      percentile: float = 99.99) -> tuple[torch.Tensor, int]:
    """(w_hat, number of scales): symmetric per output channel (per group for 2-D weights if asked)."""
    scale = weight_row_scales(w, bits, method, group_size, percentile)
    return quantize_rows(w.detach(), scale, 2 ** (bits - 1) - 1, group_size), scale.shape[0]


def weight_row_scales(w: torch.Tensor, bits: int, method: str = "minmax", group_size: int = 0,
                      percentile: float = 99.99) -> torch.Tensor:
    """The symmetric grid's step per row of `_rows(w, group_size)`, shape (rows, 1)."""
    rows, _ = _rows(w.detach(), group_size)
    return symmetric_scale(weight_max_abs(rows, bits, method, percentile), bits)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, qmax, group_size: int = 0, ste: bool = False) -> torch.Tensor:
    """`scale * clamp(round(rows / scale), -qmax, qmax)` back in `w`'s shape; `qmax` is a number or a
    (rows, 1) tensor (mixed precision). With `ste` the gradient reaches `scale` as in LSQ: q - w/s
    inside the grid, +-qmax where clipped."""
    rows, pad = _rows(w, group_size)
    x = rows / scale
    q = torch.clamp(round_ste(x) if ste else torch.round(x), -qmax, qmax)
    w_hat = scale * q
    if pad:
        w_hat = w_hat.reshape(w.shape[0], -1)[:, : w.shape[1]]
    return w_hat.reshape(w.shape).to(w.dtype)


def channel_kurtosis(w: torch.Tensor) -> torch.Tensor:
    """kappa_c = E[(w - mu_c)^4] / sigma_c^4 over each output channel's weights (population moments);
    a constant channel has kappa 0."""
    rows = w.detach().reshape(w.shape[0], -1).double()
    centred = rows - rows.mean(dim=1, keepdim=True)
    var = (centred**2).mean(dim=1)
    fourth = (centred**4).mean(dim=1)
    return torch.where(var > 0, fourth / var.clamp_min(1e-300) ** 2, torch.zeros_like(var))


def kurtosis_assignment(kurtosis: list[torch.Tensor], sizes: list[int], fraction: float) -> list[torch.Tensor]:
    """Which output channels get the higher bit-width: the heaviest-tailed channels over all layers,
    taken in decreasing kappa while their weights stay within `fraction` of all the weights
    (sizes[l]: weights per channel of layer l). One bool mask per layer."""
    flat = torch.cat(kurtosis)
    per_channel = torch.cat([torch.full((len(k),), n, dtype=torch.long) for k, n in zip(kurtosis, sizes)])
    budget = fraction * int(per_channel.sum())
    high = torch.zeros(len(flat), dtype=torch.bool)
    used = 0
    for i in torch.argsort(flat, descending=True, stable=True).tolist():
        if used + int(per_channel[i]) > budget:
            break
        high[i], used = True, used + int(per_channel[i])
    return list(high.split([len(k) for k in kurtosis]))


def gradient_scores(strategy, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s(x) = ||grad_theta CE(x)||^2 of each sample on the FP32 model in eval mode (a Fisher proxy;
    parameters' .grad are left as they were)."""
    from clbench.models.freeze import eval_mode

    params = [p for p in strategy.parameters() if p.requires_grad]
    scores = []
    device = params[0].device if params else x.device
    with eval_mode(strategy), torch.enable_grad():
        for xi, yi in zip(x, y):
            out = strategy(xi[None].to(device))
            logits = getattr(out, "logits", out)
            loss = F.cross_entropy(logits, yi[None].to(device))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            scores.append(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
    return torch.tensor(scores, dtype=torch.float64)


def diverse_top(embeddings: torch.Tensor, scores: torch.Tensor, k: int, seed: int) -> list[int]:
    """k indices: k-means (k clusters) of the embeddings, the highest score of each cluster."""
    if len(scores) <= k:
        return list(range(len(scores)))
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(embeddings.double().numpy())
    picked = []
    for cluster in range(k):
        members = [i for i, c in enumerate(labels.tolist()) if c == cluster]
        if members:
            picked.append(max(members, key=lambda i: float(scores[i])))
    return sorted(picked)


def salient_selection(strategy, pool: dict[int, list[torch.Tensor]], n: int, seed: int,
                      outlier_percentile: float = 99.0) -> tuple[list[torch.Tensor], int]:
    """Section 2.6's salient calibration data: score every candidate by `gradient_scores`, drop
    those at or above the `outlier_percentile`-th percentile of the scores, then per class (an even
    share of `n`) the highest-scoring sample of each k-means cluster of the embeddings."""
    from clbench.models.freeze import eval_mode

    classes = sorted(c for c in pool if pool[c])
    x = torch.stack([t.float() for c in classes for t in pool[c]])
    y = torch.tensor([c for c in classes for _ in pool[c]])
    scores = gradient_scores(strategy, x, y)
    keep = scores < torch.quantile(scores, outlier_percentile / 100.0) if len(scores) > 1 else torch.ones(1, dtype=torch.bool)
    device = next(strategy.parameters()).device
    with eval_mode(strategy), torch.no_grad():
        embeddings = torch.cat([strategy.backbone(chunk.to(device)).flatten(1).cpu() for chunk in x.split(256)])
    share = {c: n // len(classes) + (1 if i < n % len(classes) else 0) for i, c in enumerate(classes)}
    chosen = []
    for c in classes:
        rows = ((y == c) & keep).nonzero().flatten()
        picked = diverse_top(embeddings[rows], scores[rows], share[c], seed + c) if len(rows) else []
        chosen += [x[int(rows[i])] for i in picked]
    return chosen, int((~keep).sum())


def activation_range(lo: float, hi: float, sample: torch.Tensor, bits: int, method: str,
                     percentile: float = 99.99) -> tuple[float, float]:
    """[lo, hi] of an activation from its exact min/max and a sample of its values.
    Never-negative activations keep lo = 0 (unsigned grid, zero point 0)."""
    unsigned = lo >= 0
    if unsigned:
        lo = 0.0
    if method == "minmax" or sample.numel() == 0:
        return lo, hi
    sample = sample.float()
    if method == "percentile":
        p = percentile / 100.0
        hi = float(torch.quantile(sample, p))
        if not unsigned:
            lo = float(torch.quantile(sample, 1.0 - p))
        return lo, hi
    best, best_err = (lo, hi), math.inf
    for ratio in MSE_RATIOS:
        err = float(((quantize_affine(sample, bits, ratio * lo, ratio * hi)[0] - sample) ** 2).sum())
        if err < best_err:
            best, best_err = (ratio * lo, ratio * hi), err
    return best


# --------------------------------------------------------------------------- BN folding
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode `bn` into `conv` in place: w' = w g/sqrt(v+eps), b' = (b - m) g/sqrt(v+eps) + beta."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
        factor = gamma / std
        bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
        conv.weight.copy_(conv.weight * factor.reshape(-1, *[1] * (conv.weight.dim() - 1)))
        new_bias = (bias - bn.running_mean) * factor + beta
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, attr))
    return out


def find_conv_bn_pairs(model: nn.Module, run: Any) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Pairs (conv, bn) where bn's input is exactly conv's output in the forward `run()`."""
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    pairs: list[tuple[nn.Module, nn.Module]] = []
    hooks = []

    def after_conv(module, _inputs, output):
        produced[id(output)] = (module, output)

    def before_bn(module, inputs):
        found = produced.get(id(inputs[0])) if inputs else None
        if found is not None and found[1] is inputs[0]:
            pairs.append((found[0], module))

    for m in model.modules():
        if type(m) is nn.Conv2d:
            hooks.append(m.register_forward_hook(after_conv))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    convs = [id(c) for c, _ in pairs]
    bns = [id(b) for _, b in pairs]
    unique = []
    for conv, bn in pairs:  # a module used twice is not folded (its other uses would change)
        if (convs.count(id(conv)) == 1 and bns.count(id(bn)) == 1 and bn.track_running_stats
                and bn.running_mean is not None and conv.out_channels == bn.num_features):
            unique.append((conv, bn))
    return unique


def fold_batchnorm(model: nn.Module, run: Any) -> int:
    """Fold the BatchNorm2d layers of `model` (a copy, in eval mode) into their convs; returns how many."""
    pairs = find_conv_bn_pairs(model, run)
    parents = _parents(model)
    for conv, bn in pairs:
        fold_conv_bn(conv, bn)
        for parent, attr in parents.get(id(bn), []):
            parent._modules[attr] = nn.Identity()
    return len(pairs)


# --------------------------------------------------------------------------- outlier smoothing
def hadamard(n: int) -> torch.Tensor:
    """An orthonormal n x n rotation: the Walsh-Hadamard matrix of the largest power of two dividing
    n (Sylvester's construction, scaled by 1/sqrt(block)), repeated block-diagonally."""
    block = n & -n
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / math.sqrt(block)] * (n // block))


def smoothing_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel divisor s_c = max|x_c|^alpha / max|W_:,c|^(1-alpha) (1 where a
    channel is all zero), so x/s and W diag(s) compute the same product with flatter inputs."""
    w_max = weight.detach().abs().reshape(weight.shape[0], weight.shape[1], -1).amax(dim=(0, 2))
    s = act_max.clamp_min(_EPS) ** alpha / w_max.clamp_min(_EPS) ** (1 - alpha)
    return torch.where((act_max > 0) & (w_max > 0), s, torch.ones_like(s))


# --------------------------------------------------------------------------- PTQ layers
class _PTQLayer(nn.Module):
    """A Conv2d / Linear of the snapshot with fake-quantized weights and input."""

    def __init__(self, layer: nn.Module, name: str):
        super().__init__()
        self.layer = layer
        self.name = name
        self.w_bits = self.a_bits = 32
        self.state = "observe"  # observe (FP32 pass, statistics) | quant | shape (FP32 pass, record input shape)
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.generator: torch.Generator | None = None
        self.scale, self.zero_point = 1.0, 0
        self.n_scales = 0
        self.input_shape: tuple[int, ...] | None = None
        self.grid: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (row scales, row qmax, group size)
        self.log_w_scale: nn.Parameter | None = None  # set while the scales are fine-tuned
        self.log_a_scale: nn.Parameter | None = None
        # outlier smoothing (Linear only): the input is rotated (x H^T) and divided per channel by
        # `smooth`; the weight was multiplied by the inverse of both, so the FP32 product is unchanged
        self.rotation: torch.Tensor | None = None
        self.smooth: torch.Tensor | None = None
        self.channel_max: torch.Tensor | None = None

    def rotate(self) -> None:
        """W <- W H^T, and the input will be x H^T (H orthonormal: the product is unchanged)."""
        weight = self.layer.weight
        self.rotation = hadamard(weight.shape[1]).to(weight.device, weight.dtype)
        weight.copy_(weight @ self.rotation.T)

    def smooth_channels(self, alpha: float) -> None:
        """W <- W diag(s), and the input will be divided by s (s from the observed `channel_max`)."""
        self.smooth = smoothing_factors(self.channel_max, self.layer.weight, alpha)
        self.layer.weight.mul_(self.smooth)
        self.channel_max = None

    def start_learning(self) -> list[nn.Parameter]:
        """Makes the weight row scales and the input scale trainable, as s = s0 * exp(theta) with
        theta = 0 (so the layer computes what it computed before); the FP32 weight is kept to be
        re-quantized with the moving scales. Returns the new parameters."""
        scale, _, _ = self.grid
        self.w_fp = self.layer.weight.detach().clone()
        self.log_w_scale = nn.Parameter(torch.zeros_like(scale))
        self.log_a_scale = nn.Parameter(torch.zeros((), device=scale.device)) if self.a_bits < 32 else None
        return [p for p in (self.log_w_scale, self.log_a_scale) if p is not None]

    def finish_learning(self) -> None:
        """Bakes the tuned scales in: the quantized weight is written, the input scale fixed."""
        with torch.no_grad():
            self.layer.weight.copy_(self._weight(ste=False))
            if self.log_a_scale is not None:
                self.scale = float(self.scale * self.log_a_scale.exp())
        self.log_w_scale = self.log_a_scale = None
        del self.w_fp

    def _weight(self, ste: bool) -> torch.Tensor:
        scale, qmax, group = self.grid
        return quantize_rows(self.w_fp, scale * self.log_w_scale.exp(), qmax, group, ste=ste)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = x @ self.rotation.T
        if self.smooth is not None:
            x = x / self.smooth
        if self.state == "channels":  # the smoothing pass: per input channel max |x|
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)
            self.channel_max = m if self.channel_max is None else torch.maximum(self.channel_max, m)
            return self.layer(x)
        if self.log_w_scale is not None:  # fine-tuning the scales
            if self.log_a_scale is not None:
                s, z, levels = self.scale * self.log_a_scale.exp(), self.zero_point, 2**self.a_bits - 1
                x = s * (torch.clamp(round_ste(x / s) + z, 0, levels) - z)
            return torch.func.functional_call(self.layer, {"weight": self._weight(ste=True)}, (x,))
        if self.state == "observe":
            v = x.detach()
            self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
            flat = v.reshape(-1)
            room = _SAMPLE_CAP - self.kept
            if room > 0:
                take = min(room, flat.numel(), _SAMPLE_CAP // 4)
                idx = torch.randint(flat.numel(), (take,), generator=self.generator).to(flat.device)
                self.samples.append(flat[idx].float().cpu())
                self.kept += take
        elif self.state == "quant" and self.a_bits < 32:
            s, z, levels = self.scale, self.zero_point, 2**self.a_bits - 1
            x = s * (torch.clamp(torch.round(x / s) + z, 0, levels) - z)
        elif self.state == "shape" and self.input_shape is None:  # the one-sample pass; later passes
            self.input_shape = tuple(x.shape)  # over calibration batches must not overwrite it
        return self.layer(x)


def _ptq_layers(model: nn.Module) -> list[_PTQLayer]:
    return [m for m in model.modules() if isinstance(m, _PTQLayer)]


# --------------------------------------------------------------------------- QAT layers
class _QATMixin:
    q_w_bits: int
    q_a_bits: int
    q_lo: float | None
    q_hi: float | None
    q_momentum: float = 0.1

    def _q_init(self, w_bits: int, a_bits: int) -> None:
        self.q_w_bits, self.q_a_bits, self.q_lo, self.q_hi = w_bits, a_bits, None, None

    def _q_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            if self.q_lo is None:
                self.q_lo, self.q_hi = lo, hi
            else:
                m = self.q_momentum
                self.q_lo, self.q_hi = (1 - m) * self.q_lo + m * lo, (1 - m) * self.q_hi + m * hi
        if self.q_lo is None or self.q_a_bits >= 32:
            return x
        x_hat = quantize_affine(x.detach(), self.q_a_bits, self.q_lo, self.q_hi)[0]
        return x + (x_hat - x).detach()  # straight-through estimator

    def _q_weight(self) -> torch.Tensor:
        w = self.weight
        if self.q_w_bits >= 32 or w.numel() == 0:
            return w
        return w + (fake_quant_weight(w.detach(), self.q_w_bits)[0] - w).detach()


class QATLinear(_QATMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._q_input(x), self._q_weight(), self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._q_input(x), self._q_weight(), self.bias)


_QAT_CLASSES = {nn.Linear: QATLinear, nn.Conv2d: QATConv2d}


# --------------------------------------------------------------------------- size and BOPs
def model_size_bytes(layers: list[tuple[int, int, int, int, int]], unquantized_params: int) -> int:
    """Section 2.5: sum over quantized layers of ceil(n_w b_w / 8) + 4 n_scales + n_zp zp_bytes,
    plus 4 bytes per unquantized parameter. `layers`: (n_w, b_w, n_scales, n_zero_points, zp_bytes)."""
    total = sum(math.ceil(n_w * b_w / 8) + 4 * n_s + n_z * zp for n_w, b_w, n_s, n_z, zp in layers)
    return int(total + 4 * unquantized_params)


def bops(layer_macs: list[tuple[int, int, int]], total_macs: int) -> int:
    """BOPs = sum MACs_l b_w b_a over quantized layers + the rest of the forward's MACs at 32 x 32."""
    quantized = sum(m for m, _, _ in layer_macs)
    return int(sum(m * bw * ba for m, bw, ba in layer_macs) + max(total_macs - quantized, 0) * 32 * 32)


def _macs(fn) -> int:
    from clbench.edge.flops import measure_flops

    with torch.enable_grad():  # the counter's first use runs a self-test with a backward pass
        return int(measure_flops(fn)) // 2


# --------------------------------------------------------------------------- the add-on
def bit_widths(config, *names: str) -> None:
    require(config, names, lambda v: MIN_BITS <= v <= MAX_BITS, f"an integer from {MIN_BITS} to {MAX_BITS}")


@dataclass(frozen=True)
class QuantizeConfig(AuxConfig):
    """The bit-widths resolve from `bits` (weights and activations at b bits), then `preset`
    (W4A8, ...), then 8; `weight_calib` from the weight bit-width (mse at 4 bits or fewer, else
    minmax). The resolved Config holds them all."""

    mode: str = "ptq"  # ptq | qat
    preset: str | None = None  # W8A8 | W4A8 | W4A4 | W2A4
    weight_bits: int | None = None
    act_bits: int | None = None
    bits: int | None = None
    weight_calib: str | None = None  # minmax | percentile | mse
    act_calib: str = "percentile"
    percentile: float = 99.99
    group_size: int = 0  # 0: one weight scale per output channel
    quantize_first_last: bool = False
    calib_samples: int = 512
    fold_bn: bool = True
    mixed: str = "none"  # none | kurtosis
    high_bits: int = 8
    high_fraction: float = 0.1
    calib_select: str = "balanced"  # balanced | fisher
    distill_steps: int = 0
    distill_lr: float = 0.01
    distill_temperature: float = 2.0
    distill_relation: float = 1.0
    distill_batch: int = 32
    smooth: str = "none"  # none | hadamard | hadamard_channel
    smooth_alpha: float = 0.5
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "mode", ("ptq", "qat"))
        require(self, ["distill_steps"], lambda v: v >= 0, "0 (off) or a positive integer")
        if self.distill_steps and self.mode != "ptq":
            raise UsageError(f"distill_steps={self.distill_steps} needs mode=ptq (it tunes a PTQ snapshot's "
                             f"scales); got mode={self.mode!r}")
        one_of(self, "smooth", ("none", "hadamard", "hadamard_channel"))
        if self.smooth != "none" and self.mode != "ptq":
            raise UsageError(f"smooth={self.smooth} needs mode=ptq; got mode={self.mode!r}")
        open_unit_interval(self, "smooth_alpha", "high_fraction")
        positive_numbers(self, "distill_lr", "distill_temperature")
        non_negative_numbers(self, "distill_relation")
        integers_at_least(self, 2, "distill_batch")
        weight_bits, act_bits = self.weight_bits, self.act_bits
        if self.bits is not None:  # `bits=b`: weights and activations at b bits
            bit_widths(self, "bits")
            weight_bits = self.bits if weight_bits is None else weight_bits
            act_bits = self.bits if act_bits is None else act_bits
        if self.preset is not None:
            key = str(self.preset).upper()
            if key not in PRESETS:
                raise UsageError(f"preset={self.preset!r} is unknown; expected one of {', '.join(PRESETS)} "
                                 f"(or weight_bits=..., act_bits=...)")
            w, a = PRESETS[key]
            for name, given, implied in (("weight_bits", weight_bits, w), ("act_bits", act_bits, a)):
                if given is not None and given != implied:
                    raise UsageError(f"{name}={given!r} contradicts preset={self.preset!r} ({name}={implied}); "
                                     f"expected one of them")
            weight_bits, act_bits = w, a
        object.__setattr__(self, "weight_bits", 8 if weight_bits is None else weight_bits)
        object.__setattr__(self, "act_bits", 8 if act_bits is None else act_bits)
        bit_widths(self, "weight_bits", "act_bits", "high_bits")
        if self.weight_calib is None:
            object.__setattr__(self, "weight_calib", "mse" if self.weight_bits <= 4 else "minmax")
        one_of(self, "weight_calib", CALIBRATORS)
        one_of(self, "act_calib", CALIBRATORS)
        require(self, ["percentile"], lambda v: 50 < v <= 100, "a number in (50, 100]")
        require(self, ["group_size"], lambda v: v >= 0, "0 (per channel) or a positive integer")
        positive_integers(self, "calib_samples")
        one_of(self, "mixed", ("none", "kurtosis"))
        one_of(self, "calib_select", ("balanced", "fisher"))
        non_negative_integers(self, "seed")


@register_aux("quantize")
class Quantize(Aux):
    """Post-training (default) or quantization-aware fake quantization; PTQ scores a quantized
    snapshot after every experience (see the module docstring)."""

    family = "quantize"
    Config = QuantizeConfig

    def __init__(self, cfg: QuantizeConfig | None = None, /, **values):
        super().__init__(cfg, **values)
        c = self.cfg
        self.smooth, self.smooth_alpha = c.smooth, c.smooth_alpha
        self.distill_steps, self.distill_lr, self.distill_batch = c.distill_steps, c.distill_lr, c.distill_batch
        self.distill_temperature, self.distill_relation = c.distill_temperature, c.distill_relation
        self.mixed, self.high_bits, self.high_fraction = c.mixed, c.high_bits, c.high_fraction
        self.calib_select = c.calib_select
        self.mode, self.weight_bits, self.act_bits = c.mode, c.weight_bits, c.act_bits
        self.weight_calib, self.act_calib, self.percentile = c.weight_calib, c.act_calib, c.percentile
        self.group_size, self.quantize_first_last = c.group_size, c.quantize_first_last
        self.calib_samples, self.fold_bn, self.seed = c.calib_samples, c.fold_bn, c.seed
        self.edge_bits = (c.weight_bits, c.act_bits) if c.quantize_first_last else (8, 8)
        # calibration reservoir of the current experience: class -> list of inputs (CPU)
        self._reservoir: dict[int, torch.Tensor] = {}  # class -> [per-class capacity, *input shape]
        self._filled: dict[int, int] = {}
        self._seen: dict[int, int] = {}
        self._per_class = c.calib_samples
        self._generator = torch.Generator().manual_seed(self.seed)
        self._rows_q: list[list[float]] = []
        self._rows_fp: list[list[float]] = []
        self._example: torch.Tensor | None = None  # one input, for the QAT cost count

    # ------------------------------------------------------------------ hooks
    def setup(self, strategy) -> None:
        if self.mode == "qat":
            self._convert_qat(strategy)

    def on_experience_start(self, strategy, exp) -> None:
        self._reservoir, self._filled, self._seen = {}, {}, {}
        self._per_class = max(1, math.ceil(self.calib_samples / max(1, len(exp.classes))))
        if exp.is_first:
            self._rows_q, self._rows_fp = [], []
        if self.mode == "qat":
            self._convert_qat(strategy)  # a grown head brings new Linear layers

    def loss(self, batch, out, strategy):
        """Keeps calibration inputs (no gradient, own random generator); adds no loss term."""
        x = batch.x_raw if getattr(batch, "x_raw", None) is not None else batch.x
        x = x.detach()
        if self._example is None:
            self._example = x[:1].cpu().clone()
        if self.mode != "ptq":
            return None
        labels = batch.y.detach().cpu().tolist() if batch.y.dim() == 1 else []
        if not labels:
            return None
        # this runs inside every training step (the profiler counts it): one draw per batch and one
        # gather-and-write per class, not an op per sample
        draws = torch.rand(len(labels), generator=self._generator).tolist()
        writes: dict[int, dict[int, int]] = {}  # class -> slot -> row (a later row wins a slot)
        for i, label in enumerate(labels):
            seen = self._seen.get(label, 0)
            self._seen[label] = seen + 1
            filled = self._filled.get(label, 0)
            if filled < self._per_class:
                slot, self._filled[label] = filled, filled + 1
            else:
                slot = int(draws[i] * (seen + 1))  # uniform over 0..seen: reservoir sampling
                if slot >= self._per_class:
                    continue
            writes.setdefault(label, {})[slot] = i
        for label, slots in writes.items():
            store = self._reservoir.get(label)
            if store is None:
                store = self._reservoir[label] = torch.empty((self._per_class, *x.shape[1:]), dtype=x.dtype)
            rows = torch.tensor(list(slots.values()), device=x.device)
            store[torch.tensor(list(slots))] = x.index_select(0, rows).cpu()
        return None

    def after_evaluation(self, strategy, exp, evaluate):
        if self.mode == "qat":
            return self._qat_record(strategy, exp)
        start = time.perf_counter()
        data, sources = self._calibration_data(strategy, exp)
        if data is None:
            return {"experience": exp.index, "mode": "ptq", "skipped": "no calibration inputs: the strategy took no "
                    "training steps through the add-on's loss hook and has no replay buffer of inputs"}
        snapshot, info = self._quantized_snapshot(strategy, data)
        calib_seconds = time.perf_counter() - start
        if self.distill_steps:
            before = evaluate(lambda x: self._predict(strategy, snapshot, x))
            info["distill"] = {**self._distill_scales(strategy, snapshot, data), "accuracy_before": list(before),
                               "avg_acc_before": sum(before[: exp.index + 1]) / (exp.index + 1)}
        row_q = evaluate(lambda x: self._predict(strategy, snapshot, x))
        row_fp = evaluate(strategy.predict_logits)
        seen = exp.index + 1
        avg_q, avg_fp = sum(row_q[:seen]) / seen, sum(row_fp[:seen]) / seen
        self._rows_q.append(list(row_q))
        self._rows_fp.append(list(row_fp))
        complete = len(self._rows_q) == seen
        return {
            "experience": exp.index,
            "mode": "ptq",
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "first_last_bits": list(self.edge_bits),
            "weight_calib": self.weight_calib,
            "act_calib": self.act_calib,
            "accuracy": list(row_q),
            "accuracy_fp32": list(row_fp),
            "avg_acc": avg_q,
            "avg_acc_fp32": avg_fp,
            "delta_acc": avg_fp - avg_q,
            "forgetting": _forgetting(self._rows_q) if complete else None,
            "forgetting_fp32": _forgetting(self._rows_fp) if complete else None,
            **info,
            "calib_samples": int(data.shape[0]),
            "calib_sources": sources,
            "calib_seconds": calib_seconds,
        }

    def report(self) -> dict[str, Any]:
        """The resolved settings (bit-widths and calibrators as resolved from `bits`, `preset` and the
        defaults) and the bit-widths the first and last layers ran at."""
        return {**super().report(), "first_last_bits": list(self.edge_bits)}

    # ------------------------------------------------------------------ calibration data
    def _calibration_data(self, strategy, exp) -> tuple[torch.Tensor | None, dict[str, int]]:
        pool: dict[int, list[torch.Tensor]] = {c: list(v[: self._filled[c]]) for c, v in self._reservoir.items()}
        current = sum(len(v) for v in pool.values())
        shape = next((v[0].shape for v in pool.values() if v), None)
        from_buffer = 0
        buffer = getattr(strategy, "buffer", None)
        if buffer is not None and hasattr(buffer, "all") and len(buffer) > 0:
            stored = buffer.all()
            xs, ys = stored.get("x"), stored.get("y")
            if xs is not None and ys is not None and ys.dim() == 1 and xs.is_floating_point() \
                    and (shape is None or tuple(xs.shape[1:]) == tuple(shape)):
                for x, y in zip(xs, ys.tolist()):
                    pool.setdefault(int(y), []).append(x)
                    from_buffer += 1
        if not any(pool.values()):
            return None, {}
        sources = {"current": current, "buffer": from_buffer, "classes": len([c for c in pool if pool[c]])}
        if self.calib_select == "fisher":
            chosen, dropped = salient_selection(strategy, pool, self.calib_samples, self.seed)
            return torch.stack([x.float() for x in chosen]), {**sources, "dropped_outliers": dropped}
        # class-balanced: round-robin over classes until calib_samples are drawn
        chosen: list[torch.Tensor] = []
        order = {c: torch.randperm(len(v), generator=torch.Generator().manual_seed(self.seed + 7919 * c)).tolist()
                 for c, v in pool.items()}
        depth = 0
        while len(chosen) < self.calib_samples and any(depth < len(v) for v in pool.values()):
            for c in sorted(pool):
                if depth < len(pool[c]) and len(chosen) < self.calib_samples:
                    chosen.append(pool[c][order[c][depth]])
            depth += 1
        data = torch.stack([x.float() for x in chosen])
        return data, sources

    # ------------------------------------------------------------------ the quantized snapshot
    def _predict(self, strategy, snapshot: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        if next(snapshot.parameters()).device != x.device:
            snapshot.to(x.device)
        with _swapped(strategy, snapshot):
            return strategy.predict_logits(x)

    def _quantized_snapshot(self, strategy, data: torch.Tensor) -> tuple[nn.ModuleDict, dict[str, Any]]:
        """Post-training quantization of a frozen copy of the strategy's backbone and head, calibrated on
        `data`: BN folding, wrapping, one FP32 pass for the execution order, optional smoothing, one
        observation pass, then every layer the model runs quantized in turn. Returns the snapshot and
        its record (layer counts, bit-widths, size and BOPs)."""
        from clbench.models.freeze import eval_mode

        device = next(strategy.parameters()).device
        snapshot = _frozen_copy(strategy)
        data = data.to(device)
        fp32_params = sum(p.numel() for p in snapshot.parameters())
        with eval_mode(strategy), torch.no_grad():
            run_one = lambda: self._predict(strategy, snapshot, data[:1])  # noqa: E731

            def run_all():  # a pass over the calibration data, for the layers' current state
                for chunk in data.split(128):
                    self._predict(strategy, snapshot, chunk)

            folded = fold_batchnorm(snapshot, run_one) if self.fold_bn else 0
            used, first, total_macs = _execution_order(self._wrap_layers(snapshot), run_one)
            smoothed = self._smooth(used, run_all)
            for w in used:
                w.state = "observe"
            run_all()
            # the layers at the chosen bit-width (first and classifier too with quantize_first_last)
            inner = [w for w in used if self.quantize_first_last or not (w is first or w.in_head)]
            high = self._high_bit_channels(inner)
            layer_sizes, layer_macs = [], []
            for w in used:
                sizes, macs = self._quantize_layer(w, w is first or w.in_head, high.get(id(w)), device)
                layer_sizes += sizes
                layer_macs += macs
            quantized_weights = {id(w.layer.weight) for w in used}
            unquantized = sum(p.numel() for p in snapshot.parameters() if id(p) not in quantized_weights)
        return snapshot, _snapshot_record(
            used, smoothed, high, layer_sizes, layer_macs, unquantized=unquantized, fp32_params=fp32_params,
            total_macs=total_macs, folded=folded)

    def _wrap_layers(self, snapshot: nn.ModuleDict) -> list[_PTQLayer]:
        """Every Conv2d / Linear of the snapshot (with weights) replaced, wherever it is used, by a
        `_PTQLayer` around it, each with its own sampling generator; in module order."""
        parents = _parents(snapshot)
        head_ids = {id(m) for m in snapshot["head"].modules()}
        wrappers: dict[int, _PTQLayer] = {}
        for name, m in list(snapshot.named_modules()):
            if type(m) in (nn.Linear, nn.Conv2d) and id(m) not in wrappers and m.weight.numel() > 0:
                w = _PTQLayer(m, name)
                w.generator = torch.Generator().manual_seed(self.seed + len(wrappers))
                w.in_head = id(m) in head_ids
                wrappers[id(m)] = w
                for parent, attr in parents.get(id(m), []):
                    parent._modules[attr] = w
        return list(wrappers.values())

    def _smooth(self, used: list[_PTQLayer], run_all) -> list[_PTQLayer]:
        """Outlier smoothing of the Linear layers the model runs (`smooth`): the Hadamard rotation,
        then for `hadamard_channel` one pass for the per-channel input maxima and SmoothQuant's
        per-channel division. Returns the smoothed layers (none when `smooth="none"`)."""
        smoothed = [w for w in used if isinstance(w.layer, nn.Linear)] if self.smooth != "none" else []
        for w in smoothed:
            w.rotate()
        if self.smooth == "hadamard_channel" and smoothed:
            for w in smoothed:
                w.state = "channels"
            run_all()
            for w in smoothed:
                w.smooth_channels(self.smooth_alpha)
        return smoothed

    def _high_bit_channels(self, inner: list[_PTQLayer]) -> dict[int, torch.Tensor]:
        """`mixed="kurtosis"`: id(layer) -> bool mask of its output channels promoted to `high_bits`
        (over the layers at the chosen bit-width); empty otherwise."""
        if self.mixed != "kurtosis" or not inner:
            return {}
        masks = kurtosis_assignment([channel_kurtosis(w.layer.weight) for w in inner],
                                    [w.layer.weight[0].numel() for w in inner], self.high_fraction)
        return {id(w): m for w, m in zip(inner, masks)}

    def _quantize_layer(self, w: _PTQLayer, edge: bool, high: torch.Tensor | None,
                        device: torch.device) -> tuple[list[tuple[int, ...]], list[tuple[int, int, int]]]:
        """Quantizes one observed layer: its bit-widths (`edge_bits` for the first layer and the
        classifier), its input grid, its weight written onto its grid (promoted channels `high` at
        `high_bits`); switches it to "quant". Returns its `model_size_bytes` and `bops` entries."""
        w.w_bits, w.a_bits = self.edge_bits if edge else (self.weight_bits, self.act_bits)
        self._calibrate_input(w)
        share = self._quantize_weight(w, high)
        entries = _cost_entries(w, share, self.high_bits, device)
        w.state = "quant"
        return entries

    def _calibrate_input(self, w: _PTQLayer) -> None:
        """The input's asymmetric grid (scale, zero point) from its observed range and samples."""
        sample = torch.cat(w.samples) if w.samples else torch.empty(0)
        lo, hi = activation_range(w.lo, w.hi, sample, w.a_bits, self.act_calib, self.percentile)
        w.scale, w.zero_point = affine_params(lo, hi, w.a_bits)
        w.samples = []

    def _quantize_weight(self, w: _PTQLayer, high: torch.Tensor | None) -> float:
        """The weight's row scales (per output channel, or per group for Linear), the rows of the
        promoted channels on the `high_bits` grid, the weight written quantized. Returns the share of
        the layer's channels that were promoted."""
        group = self.group_size if isinstance(w.layer, nn.Linear) else 0
        scale = weight_row_scales(w.layer.weight, w.w_bits, self.weight_calib, group, self.percentile)
        qmax = torch.full_like(scale, 2 ** (w.w_bits - 1) - 1)
        share = float(high.float().mean()) if high is not None else 0.0  # of this layer's channels
        if share:  # a promoted channel's rows (its groups) take the high-bit grid
            rows = high.to(scale.device).repeat_interleave(scale.shape[0] // high.numel()).view(-1, 1)
            high_scale = weight_row_scales(w.layer.weight, self.high_bits, self.weight_calib, group, self.percentile)
            scale = torch.where(rows, high_scale, scale)
            qmax = torch.where(rows, torch.full_like(qmax, 2 ** (self.high_bits - 1) - 1), qmax)
        w.grid, w.n_scales = (scale, qmax, group), scale.shape[0]
        w.layer.weight.copy_(quantize_rows(w.layer.weight, scale, qmax, group))
        return share

    def _distill_scales(self, strategy, snapshot: nn.ModuleDict, data: torch.Tensor) -> dict[str, Any]:
        """Section 2.6's FP32-to-quantized distillation: `distill_steps` Adam steps on the quantized
        snapshot's weight row scales and input scales (nothing else moves), the FP32 model of the same
        experience as the teacher, on minibatches of the calibration samples (current experience and
        buffer). Loss: tau^2 KL of the logits (section 1.1) + `distill_relation` x the relation loss
        of the embeddings the head reads (section 1.3; left out where the forward gives none)."""
        from clbench.auxiliary.distill import logit_kd, relation_kd
        from clbench.models.freeze import eval_mode
        from clbench.types import Output

        start = time.perf_counter()
        layers = [w for w in _ptq_layers(snapshot) if w.grid is not None]  # the layers quantized
        params = [p for w in layers for p in w.start_learning()]
        optimizer = torch.optim.Adam(params, lr=self.distill_lr)
        device = next(strategy.parameters()).device
        generator = torch.Generator().manual_seed(self.seed + 104729)
        losses: list[float] = []
        relation_used = False

        def outputs(x):
            out = strategy(x)
            return (out.logits, out.features) if isinstance(out, Output) else (out, None)

        # its own random stream and no .grad written anywhere: the FP32 run is untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(strategy), \
                torch.enable_grad():
            for _ in range(self.distill_steps):
                rows = torch.randint(len(data), (min(self.distill_batch, len(data)),), generator=generator)
                x = data[rows].to(device)
                with torch.no_grad():
                    teacher_logits, teacher_features = outputs(x)
                with _swapped(strategy, snapshot):
                    logits, features = outputs(x)
                loss = logit_kd(logits, teacher_logits, self.distill_temperature)
                if self.distill_relation and features is not None and teacher_features is not None and len(x) >= 2:
                    loss = loss + self.distill_relation * relation_kd(features, teacher_features)
                    relation_used = True
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
                losses.append(float(loss.detach()))
        for w in layers:
            w.finish_learning()
        return {"steps": self.distill_steps, "loss_first": losses[0], "loss_last": losses[-1],
                "relation_term": relation_used, "tuned_scales": sum(p.numel() for p in params),
                "seconds": time.perf_counter() - start}

    # ------------------------------------------------------------------ QAT
    def _convert_qat(self, strategy) -> None:
        modules = list(strategy.backbone.modules()) + list(strategy.head.modules())
        first = next((m for m in strategy.backbone.modules() if type(m) in _QAT_CLASSES or isinstance(m, _QATMixin)), None)
        head_ids = {id(m) for m in strategy.head.modules()}
        for m in modules:
            cls = _QAT_CLASSES.get(type(m))
            if cls is None:
                continue
            m.__class__ = cls
            bits = self.edge_bits if (m is first or id(m) in head_ids) else (self.weight_bits, self.act_bits)
            m._q_init(*bits)

    def _qat_record(self, strategy, exp) -> dict[str, Any]:
        layers = [m for m in set(strategy.backbone.modules()) | set(strategy.head.modules()) if isinstance(m, _QATMixin)]
        layer_sizes = [(m.weight.numel(), m.q_w_bits, m.weight.shape[0], 1, math.ceil(m.q_a_bits / 8))
                       for m in layers if m.weight.numel()]
        quantized = {id(m.weight) for m in layers}
        params = list(strategy.backbone.parameters()) + list(strategy.head.parameters())
        unquantized = sum(p.numel() for p in params if id(p) not in quantized)
        record: dict[str, Any] = {"experience": exp.index, "mode": "qat", "weight_bits": self.weight_bits,
                                  "act_bits": self.act_bits, "first_last_bits": list(self.edge_bits),
                                  "quantized_layers": len(layer_sizes),
                                  "size_bytes": model_size_bytes(layer_sizes, unquantized),
                                  "size_bytes_fp32": 4 * sum(p.numel() for p in params)}
        if self._example is not None:  # BOPs from one training input's forward
            from clbench.models.freeze import eval_mode

            device = next(strategy.parameters()).device
            x = self._example.to(device)
            shapes: dict[int, tuple[int, ...]] = {}

            def record_shape(module, inputs) -> None:  # a pre-hook that returns something replaces the input
                shapes.setdefault(id(module), tuple(inputs[0].shape))

            hooks = [m.register_forward_pre_hook(record_shape) for m in layers]
            try:
                with eval_mode(strategy), torch.no_grad():  # eval: the observers do not move
                    total = _macs(lambda: strategy.predict_logits(x))
                    layer_macs = [(_macs(lambda: m(torch.zeros(shapes[id(m)], device=device))), m.q_w_bits, m.q_a_bits)
                                  for m in layers if id(m) in shapes]
            finally:
                for h in hooks:
                    h.remove()
            record.update(macs=total, bops=bops(layer_macs, total), bops_fp32=total * 32 * 32)
        return record


def _frozen_copy(strategy) -> nn.ModuleDict:
    """A deep copy of the strategy's backbone and head in eval mode, no parameter requiring grad."""
    snapshot = copy.deepcopy(nn.ModuleDict({"backbone": strategy.backbone, "head": strategy.head}))
    snapshot.eval()
    for p in snapshot.parameters():
        p.requires_grad_(False)
    return snapshot


def _execution_order(layers: list[_PTQLayer], run_one) -> tuple[list[_PTQLayer], _PTQLayer | None, int]:
    """One FP32 forward `run_one()` with every layer recording its input shape: (the layers it ran, in
    module order; the first non-head layer it ran; the forward's MACs)."""
    order: list[_PTQLayer] = []
    hooks = [w.register_forward_pre_hook(lambda mod, _i: order.append(mod) if mod not in order else None)
             for w in layers]
    for w in layers:
        w.state = "shape"
    total_macs = _macs(run_one)
    for h in hooks:
        h.remove()
    used = [w for w in layers if w in order]
    first = next((w for w in order if not w.in_head), None)
    return used, first, total_macs


def _cost_entries(w: _PTQLayer, share: float, high_bits: int,
                  device: torch.device) -> tuple[list[tuple[int, ...]], list[tuple[int, int, int]]]:
    """A quantized layer's `model_size_bytes` entries (its weights at `w_bits` with their scales and
    the input's scale and zero point; the promoted `share` of them at `high_bits`) and its `bops`
    entries (its MACs, measured on a zero input of the recorded shape, split the same way)."""
    zp_bytes = math.ceil(w.a_bits / 8)
    n_w = w.layer.weight.numel()
    n_high = round(share * n_w)
    sizes = [(n_w - n_high, w.w_bits, w.n_scales + 1, 1, zp_bytes)]
    if n_high:
        sizes.append((n_high, high_bits, 0, 0, 0))
    shape = w.input_shape
    macs = _macs(lambda: w.layer(torch.zeros(shape, device=device))) if shape else 0
    low = round(macs * (1 - share))
    layer_macs = [(low, w.w_bits, w.a_bits)]
    if n_high:  # a high-precision channel's MACs run at its bit-width
        layer_macs.append((macs - low, high_bits, w.a_bits))
    return sizes, layer_macs


def _snapshot_record(used: list[_PTQLayer], smoothed: list[_PTQLayer], high: dict[int, torch.Tensor],
                     layer_sizes: list[tuple[int, ...]], layer_macs: list[tuple[int, int, int]], *,
                     unquantized: int, fp32_params: int, total_macs: int, folded: int) -> dict[str, Any]:
    """The PTQ snapshot's part of the record: what was quantized, folded and smoothed, size and BOPs."""
    quantized_numel = sum(n_w for n_w, *_ in layer_sizes)
    return {
        "quantized_layers": len(used),
        # realised mean weight bit-width over the quantized layers (first and last included)
        "weight_bits_avg": sum(n_w * b_w for n_w, b_w, *_ in layer_sizes) / quantized_numel if quantized_numel else None,
        "high_bit_channels": int(sum(int(m.sum()) for m in high.values())),
        "bn_folded": folded,
        "smoothed_layers": len(smoothed),
        # what the online transforms cost per sample (a fast Walsh-Hadamard transform: n log2(block)
        # additions per input row; smoothing: one division per input value); not in the BOPs
        "smoothing_ops": sum(_smoothing_ops(w) for w in smoothed),
        "size_bytes": model_size_bytes(layer_sizes, unquantized),
        "size_bytes_fp32": 4 * fp32_params,
        "macs": total_macs,
        "bops": bops(layer_macs, total_macs),
        "bops_fp32": total_macs * 32 * 32,
    }


def _smoothing_ops(w: _PTQLayer) -> int:
    n = w.layer.weight.shape[1]
    rows = math.prod(w.input_shape[:-1]) if w.input_shape else 1
    return rows * n * ((n & -n).bit_length() - 1) + (rows * n if w.smooth is not None else 0)


def _forgetting(rows: list[list[float]]) -> float | None:
    from clbench.metrics import forgetting_max

    value = forgetting_max(rows) if len(rows) >= 2 else math.nan
    return None if math.isnan(value) else value


@contextmanager
def _swapped(strategy, snapshot: nn.ModuleDict) -> Iterator[None]:
    """The strategy's backbone and head replaced by the snapshot's for one call (module table
    entries only: no parameter of the strategy is touched)."""
    modules = strategy._modules
    saved = modules["backbone"], modules["head"]
    modules["backbone"], modules["head"] = snapshot["backbone"], snapshot["head"]
    try:
        yield
    finally:
        modules["backbone"], modules["head"] = saved
