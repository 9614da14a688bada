"""Online EWC (Kirkpatrick et al. 2017; online form of Schwarz et al. 2018, as in Mammoth's oEWC).

Loss: CE + lambda * sum_i F_i (theta_i - theta*_i)^2.  At the end of each experience a
"fisher" phase (inside `trainer.fit`, so the profiler sees it) accumulates
F_new = mean_n p(y_n|x_n) * (grad log p(y_n|x_n))^2 from per-sample gradients, then
F <- gamma * F + F_new and theta* <- the current weights.  Parameters added later (new
head rows) have no anchor and are unpenalised.

The Fisher is over every training sample of the experience by default (`fisher_samples`
caps it): the per-sample empirical Fisher of the papers (Kirkpatrick et al. define F as the
expectation over the task's data of the squared per-sample gradient; Schwarz et al.'s online
form and Mammoth's `ewc_on` compute it sample by sample over the whole training set, weighted
by p(y|x), as here).  Avalanche's `EWCPlugin` computes a different, cheaper estimate (the
square of each minibatch's mean gradient, averaged over minibatches), which is not the
paper's: clbench does not offer it.

Per-sample gradients are computed in one batched pass, three ways, all giving the same sum
(up to float rounding):
- "linear" (networks whose trainable parameters all belong to plain `nn.Linear` layers, each
  called once per forward): one forward and one backward of sum_n log p(y_n|x_n) with hooks
  that keep each layer's input a_n and output gradient delta_n; the per-sample weight
  gradient is delta_n a_n^T, so sum_n w_n (delta_n a_n^T)^2 = (w delta^2)^T (a^2), one matrix
  product per layer (inputs with extra dimensions, e.g. tokens, build the per-sample
  gradients with an einsum instead).  Exact because in eval mode each sample's output
  depends on that sample alone; the first call of each strategy checks this against the
  per-sample loop on the batch's first samples and uses vmap from then on if they differ.
- "vmap" (any other network): `torch.func` (`functional_call` + `vmap(grad(.))` over the
  batch, in chunks that bound the memory of the stacked gradients).
- "loop": one autograd call per sample, the fallback for a network that vmap cannot batch
  (a forward with data-dependent Python control flow such as `.item()`, in-place writes to
  buffers, random ops, or BatchNorm left in training mode by a custom `eval`), once per
  strategy, with a warning.
The estimate runs in eval mode (BatchNorm reads its running statistics, dropout is off).
`fisher_path` records which one ran.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from clbench.base import CLStrategy
from clbench.config import StrategyConfig, non_negative_numbers
from clbench.errors import UsageError
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo, Phase


@dataclass(frozen=True)
class Config(StrategyConfig):
    ewc_lambda: float = 10.0
    gamma: float = 1.0
    fisher_samples: int | None = None  # cap on samples used for the Fisher estimate (None: all)

    def __post_init__(self):
        super().__post_init__()
        if self.fisher_samples is not None and self.fisher_samples < 1:
            raise UsageError(f"fisher_samples={self.fisher_samples} is invalid; expected a positive integer (or none: all)")
        non_negative_numbers(self, "ewc_lambda", "gamma")


@register_strategy("ewc")
class EWC(CLStrategy):
    """Online elastic weight consolidation with a per-sample diagonal Fisher."""

    Config = Config
    distributed_sums = ("_fisher_new", "_fisher_count")  # DDP: each rank's Fisher terms, summed over ranks
    PAPER_SETTINGS = {  # Mammoth's oEWC best args (Mammoth protocol: er.MAMMOTH_PROTOCOL)
        name: {"backbone": "resnet18_cifar", "pretrained": False, "class_order": "natural", "optimizer": "sgd",
               "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "constant", "batch_size": 32, "global_batch_size": 32,
               "lr": 0.03, "gamma": 1.0, **values}
        for name, values in (("cifar10-5", {"ewc_lambda": 10.0, "epochs": 50}),
                             ("tinyimagenet-10", {"ewc_lambda": 25.0, "epochs": 100}))
    }
    PUBLISHED = {  # the DER paper's Table 2 values, as CLFD's Table 1 carries them over
        "cifar10-5": {"metric": "final_avg_acc", "value": 0.1949, "source": "CLFD paper (NeurIPS 2024), Table 1 "
                      "(= DER paper Table 2), oEWC, S-CIFAR-10 Class-IL"},
        "tinyimagenet-10": {"metric": "final_avg_acc", "value": 0.0758, "source": "CLFD paper (NeurIPS 2024), Table 1 "
                            "(= DER paper Table 2), oEWC, S-Tiny-ImageNet Class-IL"},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self._fisher_new: dict[str, torch.Tensor] = {}
        self._fisher_count = 0
        self.vectorised_fisher = True  # False after vmap failed once on this network: the per-sample loop
        self.linear_fisher: bool | None = None  # the "linear" path: None until checked on this network's first batch
        self.fisher_path: str | None = None  # "linear", "vmap" or "loop": the path of the last estimate
        self._penalty_terms: tuple | None = None  # (parameter identities, [(parameter, Fisher, anchor, overlap)]), cached

    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        # the Fisher is a sum over samples: its batch size changes only the rounding, and larger
        # batches pay the per-step costs (the loop's, the per-sample pass's set-up) fewer times
        return [Phase("train"), Phase("fisher", epochs=1, batch_size=FISHER_BATCH)]

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.remember(self(batch.x))
        return {"ce": F.cross_entropy(out.logits, batch.y), "ewc": self.cfg.ewc_lambda * self.penalty()}

    def training_step(self, batch: Batch, batch_idx: int):
        if self.phase.name == "fisher":
            self.accumulate_fisher(batch)
            return None  # no backward, no optimiser step: the Fisher pass only reads gradients
        return super().training_step(batch, batch_idx)

    def penalty(self) -> torch.Tensor:
        """sum_i F_i (theta_i - theta*_i)^2 over the anchored parameters (a head's rows added later are free)."""
        terms = self.penalty_terms()
        if not terms:
            return torch.zeros((), device=self.device)
        params, fishers, anchors, overlaps = zip(*terms)
        return QuadraticPenalty.apply(fishers, anchors, overlaps, *params)

    def penalty_terms(self) -> list:
        """(parameter, Fisher, anchor, overlap) of every anchored parameter, the Fisher and anchor on
        the parameter's device: built once per parameter set (the head grows, `to` moves the model)."""
        params = [(name, p) for name, p in self.named_parameters() if name in self.anchor]
        key = tuple((id(p), p.device) for _, p in params)
        if self._penalty_terms is None or self._penalty_terms[0] != key:
            terms = []
            for name, p in params:
                anchor, fisher = self.anchor[name].to(p.device), self.fisher[name].to(p.device)
                overlap = None if anchor.shape == p.shape else tuple(slice(0, s) for s in anchor.shape)
                terms.append((p, fisher, anchor, overlap))
            self._penalty_terms = (key, terms)
        return self._penalty_terms[1]

    def accumulate_fisher(self, batch: Batch) -> None:
        """Add p(y|x) * (grad log p(y|x))^2 of each sample of `batch` (up to `fisher_samples` in all)."""
        limit = self.cfg.fisher_samples
        n = len(batch) if limit is None else max(0, min(len(batch), limit - self._fisher_count))
        if n == 0:
            return
        x, y = batch.x[:n], batch.y[:n]
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                terms = None
                if self.linear_fisher is None:
                    self.linear_fisher = linear_fisher_agrees(self, params, x, y)
                if self.linear_fisher:
                    terms = linear_fisher_sum(self, params, x, y)
                    self.fisher_path = "linear" if terms is not None else None
                    if terms is None:  # a layer called twice in this forward: per-sample squares do not split
                        self.linear_fisher = False
                if terms is None and self.vectorised_fisher:
                    try:
                        terms = vectorised_fisher_sum(self, params, x, y)
                    except (RuntimeError, NotImplementedError) as err:
                        self.vectorised_fisher = False
                        warnings.warn(f"EWC: per-sample gradients cannot be vectorised on this network ({err}); "
                                      "falling back to one autograd call per sample", RuntimeWarning, stacklevel=2)
                    else:
                        self.fisher_path = "vmap"
                if terms is None:
                    terms = looped_fisher_sum(self, params, x, y)
                    self.fisher_path = "loop"
        finally:
            self.train(was_training)
        for name, term in terms.items():
            acc = self._fisher_new.get(name)
            self._fisher_new[name] = term if acc is None else acc + term
        self._fisher_count += n

    def on_experience_end(self, exp: ExperienceInfo, train_set) -> None:
        for name, f_sum in self._fisher_new.items():
            f_new = (f_sum / max(self._fisher_count, 1)).cpu()
            old = self.fisher.get(name)
            if old is not None:
                grown = torch.zeros_like(f_new)
                grown[tuple(slice(0, s) for s in old.shape)] = self.cfg.gamma * old
                f_new = f_new + grown
            self.fisher[name] = f_new
        self.anchor = {n: p.detach().cpu().clone() for n, p in self.named_parameters() if n in self.fisher}
        self._fisher_new, self._fisher_count, self._penalty_terms = {}, 0, None
        super().on_experience_end(exp, train_set)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**{f"fisher.{n}": t for n, t in self.fisher.items()}, **{f"anchor.{n}": t for n, t in self.anchor.items()}}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k[len("fisher."):]: v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}
        self._penalty_terms = None


FISHER_BATCH = 256  # the fisher phase's batch size (per device under DDP)

# Stacked per-sample gradients of one vmap chunk hold (chunk x parameters) numbers: this bounds them.  On CPU,
# vmapped convolutions run as grouped convolutions that get slower per sample as the chunk grows (ResNet-18 on one
# thread: 3 samples per chunk beat 12 and 48), so the CPU budget is small (128 MiB in float32); elsewhere 512 MiB.
FISHER_CHUNK_ELEMENTS = {"cpu": 2**25}
FISHER_CHUNK_ELEMENTS_DEFAULT = 2**27


def vectorised_fisher_sum(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_n p(y_n|x_n) * (grad log p(y_n|x_n))^2 per parameter, the per-sample gradients from
    `vmap(grad(.))` over `functional_call(model, ...)` (the model in eval mode)."""
    detached = {name: p.detach() for name, p in params.items()}

    def log_likelihood(p, xi, yi):
        log_probs = F.log_softmax(functional_call(model, p, (xi[None],)).logits[0], dim=0)
        log_p = log_probs.gather(0, yi.reshape(1))[0]  # indexing with the batched label would be data-dependent
        return log_p, log_p

    per_sample = vmap(grad(log_likelihood, has_aux=True), in_dims=(None, 0, 0))
    numel = max(1, sum(p.numel() for p in params.values()))
    chunk = max(1, FISHER_CHUNK_ELEMENTS.get(x.device.type, FISHER_CHUNK_ELEMENTS_DEFAULT) // numel)
    total = {name: torch.zeros_like(p) for name, p in detached.items()}
    for start in range(0, len(x), chunk):
        grads, log_p = per_sample(detached, x[start : start + chunk], y[start : start + chunk])
        weight = log_p.detach().exp()
        for name, g in grads.items():
            g = g.detach().reshape(len(g), -1)
            total[name] += (weight @ (g * g)).view_as(total[name])  # sum_n w_n g_n^2 as one product
    return total


def looped_fisher_sum(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same sum with one autograd call per sample (the fallback, and the reference in tests)."""
    total: dict[str, torch.Tensor] = {}
    for i in range(len(x)):
        log_p = F.log_softmax(model(x[i : i + 1]).logits, dim=1)[0, y[i]]
        grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
        weight = log_p.detach().exp()
        for name, g in zip(params, grads):
            if g is not None:
                term = weight * g.detach() ** 2
                total[name] = term if name not in total else total[name] + term
    return total


class QuadraticPenalty(torch.autograd.Function):
    """sum_i sum(F_i * (p_i[overlap_i] - anchor_i)^2) as one autograd node: the very values autograd
    gives for that expression written out per parameter (the same elementwise operations in the same
    order: forward sum_i, from zero, of sum(F_i * d_i^2); backward (grad * F_i) * (2 d_i) into the
    overlap, zero elsewhere), without recording about ten nodes per parameter every step."""

    @staticmethod
    def forward(ctx, fishers, anchors, overlaps, *params):
        views = [p if overlap is None else p[overlap] for p, overlap in zip(params, overlaps)]
        diffs = torch._foreach_sub(views, list(anchors))
        weighted = torch._foreach_mul(diffs, diffs)
        torch._foreach_mul_(weighted, list(fishers))
        total = torch.zeros((), dtype=weighted[0].dtype, device=weighted[0].device)
        for term in weighted:
            total = total + term.sum()
        ctx.diffs, ctx.fishers, ctx.overlaps = diffs, fishers, overlaps
        ctx.shapes = [p.shape for p in params]
        return total

    @staticmethod
    def backward(ctx, grad):
        grads = torch._foreach_mul(list(ctx.fishers), grad)
        torch._foreach_mul_(grads, torch._foreach_mul(ctx.diffs, 2.0))
        out = []
        for g, overlap, shape in zip(grads, ctx.overlaps, ctx.shapes):
            if overlap is not None:
                full = g.new_zeros(shape)
                full[overlap] = g
                g = full
            out.append(g)
        ctx.diffs = None
        return (None, None, None, *out)


def linear_layers(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.nn.Linear] | None:
    """The plain `nn.Linear` layers that hold every parameter of `params`, by module name; None when
    a parameter lies elsewhere (a convolution, a norm's affine, a bare parameter) or in a Linear
    subclass with its own forward."""
    owners: dict[str, torch.nn.Linear] = {}
    covered = set()
    for module_name, module in model.named_modules():
        if type(module).forward is not torch.nn.Linear.forward or not isinstance(module, torch.nn.Linear):
            continue
        for attr in ("weight", "bias"):
            name = f"{module_name}.{attr}" if module_name else attr
            if name in params:
                owners[module_name] = module
                covered.add(name)
    return owners if covered == set(params) else None


def linear_fisher_sum(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """sum_n p(y_n|x_n) * (grad log p(y_n|x_n))^2 per parameter for a network whose trainable
    parameters all lie in plain Linear layers: one forward and one backward of sum_n log p(y_n|x_n),
    each layer's per-sample gradient rebuilt from its input a_n and output gradient delta_n
    (weight: delta_n a_n^T, bias: delta_n).  None when the network is not of that form or a layer
    runs more than once in the forward.  Exact when each sample's output depends on that sample
    alone (eval mode); `linear_fisher_agrees` checks it."""
    layers = linear_layers(model, params)
    if layers is None:
        return None
    seen: dict[str, list] = {name: [] for name in layers}

    def keep(name):
        def hook(module, inputs, output):
            record = [inputs[0].detach().clone(), None]
            seen[name].append(record)
            if output.requires_grad:  # a tensor hook: the gradient of this output, before any in-place op on it
                output.register_hook(lambda g: record.__setitem__(1, g.detach()))
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    try:
        log_p = F.log_softmax(model(x).logits, dim=1).gather(1, y[:, None])[:, 0]
        torch.autograd.grad(log_p.sum(), list(params.values()), allow_unused=True)  # the output hooks see each delta
    finally:
        for handle in handles:
            handle.remove()
    if any(len(calls) > 1 for calls in seen.values()):
        return None
    weight = log_p.detach().exp()
    total: dict[str, torch.Tensor] = {}
    for module_name, module in layers.items():
        prefix = f"{module_name}." if module_name else ""
        calls = seen[module_name]
        a, delta = (calls[0] if calls else (None, None))
        for attr in ("weight", "bias"):
            if prefix + attr in params:
                total[prefix + attr] = torch.zeros_like(params[prefix + attr].detach())
        if a is None or delta is None:
            continue  # not on this forward's path: zero gradients
        a, delta = a.to(delta.dtype), delta
        if a.dim() == 2:
            w_delta2 = weight[:, None] * delta * delta
            if prefix + "weight" in params:
                total[prefix + "weight"] = w_delta2.T @ (a * a)
            if prefix + "bias" in params:
                total[prefix + "bias"] = w_delta2.sum(0)
        else:  # extra dimensions (tokens, positions): the per-sample gradient sums over them
            a, delta = a.reshape(len(a), -1, a.shape[-1]), delta.reshape(len(delta), -1, delta.shape[-1])
            if prefix + "weight" in params:  # stacked per-sample gradients, in chunks that bound their memory
                budget = FISHER_CHUNK_ELEMENTS.get(a.device.type, FISHER_CHUNK_ELEMENTS_DEFAULT)
                chunk = max(1, budget // (a.shape[-1] * delta.shape[-1]))
                for start in range(0, len(a), chunk):
                    part = slice(start, start + chunk)
                    g = torch.einsum("bto,bti->boi", delta[part], a[part])
                    total[prefix + "weight"] += torch.einsum("b,boi->oi", weight[part], g * g)
            if prefix + "bias" in params:
                g = delta.sum(1)
                total[prefix + "bias"] = weight @ (g * g)
    return total


def linear_fisher_agrees(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                         y: torch.Tensor, samples: int = 4, rtol: float = 1e-4) -> bool:
    """Whether `linear_fisher_sum` applies to this network and equals the per-sample loop on the
    first `samples` samples of a batch (each parameter within rtol of its largest entry): a network
    whose samples interact in eval mode (a layer mixing the batch) fails it."""
    if linear_layers(model, params) is None:
        return False
    x, y = x[:samples], y[:samples]
    fast = linear_fisher_sum(model, params, x, y)
    if fast is None:
        return False
    slow = looped_fisher_sum(model, params, x, y)
    for name, f in fast.items():
        ref = slow.get(name, torch.zeros_like(f))
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if not torch.allclose(f, ref, rtol=0.0, atol=rtol * scale + 1e-30):
            return False
    return True
