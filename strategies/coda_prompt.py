"""CODA-Prompt: COntinual Decomposed Attention-based prompting (Smith et al., CVPR 2023; official
code github.com/GT-RIPL/CODA-Prompt, and LAMDA-PILOT's port, read for the details below).

A frozen pre-trained ViT is prefix-tuned in its first `prompt_blocks` blocks (0-4) by a prompt
that is a soft, input-dependent mix of a pool of M components. In every prompted block:

    q(x)     = [CLS] of the frozen, unprompted ViT (no gradient)
    alpha_m  = cos(q(x) * A_m, K_m)                        (attention vector A_m, key K_m)
    prompt   = sum_m alpha_m P_m                             (P_m: 2 x prompt_length tokens)

and the prompt's first `prompt_length` tokens are put in front of the attention keys, the other
`prompt_length` in front of the values (`clbench.models.prompts.PrefixRouter`). Everything is
differentiable end to end; a linear head reads the prompted [CLS].

Per task t of T (T = the scenario's number of experiences), the components form T groups of
M // T: task t trains group t only, through the mix over groups 0..t (earlier groups frozen,
later ones unused). Right before task t its group is drawn at random, orthogonal (Gram-Schmidt)
to everything the earlier groups span and to itself, with unit rows, separately for P, K and A
of each block. Loss: cross-entropy over the current task's classes (earlier classes' logits are
-inf), plus the optional orthogonality penalty mu * sum_blocks (pen(P) + pen(K) + pen(A)) over
the components in use, pen(X) = mean((X X^T - I)^2); mu = `ortho_weight`, 0 in PILOT and in the
official scripts. Inference: groups 0..t mixed the same way, head over all seen classes.
PILOT's recipe is the default: Adam lr 0.001, weight decay 0, batch 128, 20 epochs (50 on
ImageNet-R), cosine schedule, M = 100, 4 + 4 prefix tokens, blocks 0-4.

Details reconstructed from the official code (the paper leaves them open):
- T is `ExperienceInfo.num_experiences`; the group size is floor(M / T), as in the code, and the
  M - T * floor(M / T) left-over components are never used. M < T is refused at the first task.
- q is the frozen backbone's pooled output with no prompt, timm's final-norm [CLS] (the code's
  `feat(x)[:, 0]`), taken without gradient in the module's current mode, as the code does.
- P_m is stored as (2, prompt_length, D) (key-prefix tokens, then value-prefix tokens, the
  code's 8 tokens split 4 + 4); a token's D values are split into (heads, head_dim) after the
  qkv projection, as the code's prefix tuning does; PrefixRouter applies them.
- Initialisation: the code draws the new group's rows from N(0, I), removes their projections
  on every earlier row one by one and normalises them (redrawing a degenerate row); later rows
  are zero. That is exactly orthogonal only while the earlier rows stay mutually orthogonal,
  which training (with mu = 0) does not keep. Here the projection is onto the span of all the
  earlier rows (an orthonormal basis of them is built first), so the new group is orthogonal
  to the earlier ones as the paper says, whatever training did to them.
- Earlier groups: the code detaches them in the forward but leaves them in the optimiser,
  which with weight decay 0 leaves them unchanged. Here each component is its own parameter
  and only the current group's are given to the optimiser, so they stay bit-identical whatever
  `weight_decay` is.
- The penalty's normalisation (mean over the f x f entries) and its scope (all f components in
  use, the earlier ones detached; summed over blocks) are the code's.
- alpha is computed as (q (A * K/|K|)^T) / |q * A| (the same cosine, without the
  batch x M x D intermediate the code builds).
Schedule: the official/PILOT `CosineSchedule`, lr * cos(99 pi e / (200 (E - 1))) at epoch e of E
(it ends at 1.6% of lr, not at 0), is `lr_schedule="coda_cosine"` and what `--paper-settings`
uses; the tiny default keeps clbench's `cosine` (lr to 0 over the fit's epochs). Both are
stepped per epoch.
Deviation: the head is clbench's growing linear head over the seen classes (the
code keeps a full-width head and slices its logits to the seen classes: the same function).
Blocks 0-4 need a ViT of depth >= 5; on `clbench_vit_tiny` (depth 4) set `prompt_blocks` to 4 or
less (PrefixRouter refuses more, naming the depth). M must not exceed the feature width (the
components of a block are kept orthogonal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clbench.strategies._ptm import MOS_TABLE
from clbench.base import CLStrategy
from clbench.config import LR_SCHEDULES, StrategyConfig
from clbench.errors import UsageError
from clbench.models.backbones import PILOT_VIT_B16_IN21K, ptm_defaults
from clbench.models.prompts import PrefixRouter, mask_to
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo, Output


@dataclass(frozen=True)
class CodaPromptConfig(StrategyConfig):
    optimizer: str = "adam"
    lr: float = 0.001
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    pool_size: int = 100  # M components per prompted block, T groups of M // T
    prompt_length: int = 4  # key-prefix tokens per component (and as many value-prefix tokens)
    prompt_blocks: int = 5  # blocks 0..prompt_blocks-1 are prompted
    ortho_weight: float = 0.0  # mu of the orthogonality penalty on P, K, A
    lr_schedules = LR_SCHEDULES + ("coda_cosine",)

    def __post_init__(self):
        super().__post_init__()
        for name in ("pool_size", "prompt_length", "prompt_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name}={value!r} is invalid; expected a positive integer")
        if not (math.isfinite(self.ortho_weight) and self.ortho_weight >= 0):
            raise UsageError(f"ortho_weight={self.ortho_weight!r} is invalid; expected a finite number >= 0")


class ComponentPool(nn.Module):
    """M prompt components of every prompted block, one parameter each (so a group can be
    frozen by leaving it out of the optimiser): P_m (blocks, 2, length, D), K_m and A_m
    (blocks, d). All zero until their group is initialised."""

    def __init__(self, size: int, blocks: int, length: int, dim: int, key_dim: int):
        super().__init__()
        self.prompts = nn.ParameterList(nn.Parameter(torch.zeros(blocks, 2, length, dim)) for _ in range(size))
        self.keys = nn.ParameterList(nn.Parameter(torch.zeros(blocks, key_dim)) for _ in range(size))
        self.attention = nn.ParameterList(nn.Parameter(torch.zeros(blocks, key_dim)) for _ in range(size))
        self.requires_grad_(False)

    def __len__(self) -> int:
        return len(self.prompts)

    def stacked(self, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Components 0..stop-1, block first: P (blocks, stop, 2, length, D), K and A (blocks, stop, d)."""
        stop = len(self) if stop is None else stop
        return tuple(torch.stack(list(params[:stop]), dim=1) for params in (self.prompts, self.keys, self.attention))

    def parameters_of(self, start: int, stop: int) -> list[nn.Parameter]:
        return [p for params in (self.prompts, self.keys, self.attention) for p in params[start:stop]]

    @torch.no_grad()
    def init_group(self, start: int, stop: int) -> None:
        """Components start..stop-1 of every block: random unit rows orthogonal to each other and
        to the span of components 0..start-1, for P (flattened), K and A separately."""
        for params in (self.prompts, self.keys, self.attention):
            for block in range(params[0].shape[0]):
                earlier = torch.stack([params[m][block].flatten() for m in range(start)]) if start else None
                width = params[0][block].numel()
                rows = orthogonal_rows(earlier if earlier is not None else params[0].new_zeros(0, width), stop - start)
                for i, m in enumerate(range(start, stop)):
                    params[m][block].copy_(rows[i].view_as(params[m][block]))

    def ortho_penalty(self, stop: int) -> torch.Tensor:
        """sum over blocks of pen(P) + pen(K) + pen(A) over components 0..stop-1."""
        prompts, keys, attention = self.stacked(stop)
        total = prompts.new_zeros(())
        for block in range(prompts.shape[0]):
            for x in (prompts[block].flatten(1), keys[block], attention[block]):
                total = total + ortho_penalty(x)
        return total


@register_strategy("coda_prompt")
class CodaPrompt(CLStrategy):
    """Frozen ViT prefix-tuned by an attention-weighted sum of prompt components; one new orthogonal group per task."""

    Config = CodaPromptConfig
    DEFAULTS = ptm_defaults(PILOT_VIT_B16_IN21K)  # PILOT's ViT-B/16-IN21K, 224 px, no normalisation; tiny ViT on tiny data
    contract_scenario = "digits32-5"
    contract_backbone = "clbench_vit_tiny"
    contract_overrides = {"pool_size": 10, "prompt_length": 2, "prompt_blocks": 4}  # M = 2 T
    needs_vit_backbone = True
    PAPER_SETTINGS = {  # PILOT's exps/coda_prompt.json and coda_prompt_inr.json (= the official configs)
        "cifar100-10": {"class_order": "paper", "epochs": 20, "batch_size": 128, "global_batch_size": 128,
                        "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0,
                        "lr_schedule": "coda_cosine", "pool_size": 100, "prompt_length": 4, "prompt_blocks": 5,
                        "ortho_weight": 0.0},
        "imagenet-r-10": {"class_order": "paper", "epochs": 50, "batch_size": 128, "global_batch_size": 128,
                        "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0,
                          "lr_schedule": "coda_cosine", "pool_size": 100, "prompt_length": 4, "prompt_blocks": 5,
                          "ortho_weight": 0.0},
    }
    PUBLISHED = {  # CODA's own CIFAR numbers are on ViT-B/16-IN1K (another backbone): not declared here
        "imagenet-r-10": {"metric": "final_avg_acc", "value": 0.7227, "source": MOS_TABLE},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone.requires_grad_(False)

        cfg = self.cfg
        self.router = PrefixRouter(self.backbone, cfg.prompt_blocks)
        dim, key_dim = self.router.heads * self.router.head_dim, self.backbone.num_features
        widest = min(key_dim, 2 * cfg.prompt_length * dim)
        if cfg.pool_size > widest:
            raise UsageError(f"pool_size={cfg.pool_size} is invalid for this backbone; expected at most {widest} "
                             f"(the feature width: a block's components are kept orthogonal)")
        self.pool = ComponentPool(cfg.pool_size, cfg.prompt_blocks, cfg.prompt_length, dim, key_dim)

    # ---- groups: task t trains components [start, stop) = [t M//T, (t+1) M//T)
    def group(self, exp: ExperienceInfo) -> tuple[int, int]:
        size = self.cfg.pool_size // exp.num_experiences
        if size < 1:
            raise UsageError(f"pool_size={self.cfg.pool_size} is invalid for {exp.num_experiences} experiences; "
                             f"expected at least one component per task (pool_size >= {exp.num_experiences})")
        return exp.index * size, (exp.index + 1) * size

    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        start, stop = self.group(exp)
        self.pool.init_group(start, stop)  # orthogonal to the earlier groups
        self.pool.requires_grad_(False)
        for p in self.pool.parameters_of(start, stop):  # only the new group trains
            p.requires_grad_(True)

    # ---- the prompt: q -> alpha -> sum_m alpha_m P_m, per block
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """q(x): [CLS] of the frozen backbone without prompts, no gradient."""
        with torch.no_grad(), self.router.using(None):
            return self.backbone(x)

    def prompt(self, x: torch.Tensor) -> torch.Tensor:
        """The prefix (blocks, 2, batch, length, heads, head_dim) mixed from the groups in use."""
        _, stop = self.group(self.experience)
        prompts, keys, attention = self.pool.stacked(stop)
        alpha = coda_weights(self.query(x), attention, keys)  # (blocks, batch, stop)
        mixed = torch.einsum("nbm,nmcld->ncbld", alpha, prompts)
        return mixed.reshape(*mixed.shape[:-1], self.router.heads, self.router.head_dim)

    def forward(self, x: torch.Tensor) -> Output:
        prefix = self.prompt(x) if self.experience is not None else None
        with self.router.using(prefix):
            features = self.backbone(x)
        return Output(self.head(features), features)

    # ---- loss: CE over the current classes (+ mu * orthogonality penalty)
    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.remember(self(batch.x))
        terms = {"ce": F.cross_entropy(mask_to(out.logits, self.experience.classes), batch.y)}
        if self.cfg.ortho_weight > 0:
            terms["ortho"] = self.cfg.ortho_weight * self.pool.ortho_penalty(self.group(self.experience)[1])
        return terms

    def lr_schedule(self, optimizer, name: str | None = None):
        if (name or self.cfg.lr_schedule) != "coda_cosine":
            return super().lr_schedule(optimizer, name)
        epochs = self.trainer.max_epochs  # the code's K; with one epoch its formula divides by 0: lr stays
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: 1.0 if epochs <= 1 else math.cos(99 * math.pi * e / (200 * (epochs - 1))))


def coda_weights(q: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """alpha[n, b, m] = cos(q_b * A_nm, K_nm) for queries q (batch, d) and attention vectors and
    keys (blocks, M, d): sum_i q_i A_i K^_i / |q * A| with K^ = K / |K|."""
    numerator = torch.einsum("bd,nmd->nbm", q, attention * F.normalize(keys, dim=-1))
    norm = torch.einsum("bd,nmd->nbm", q.square(), attention.square()).sqrt()
    return numerator / norm.clamp_min(1e-12)


def orthogonal_rows(earlier: torch.Tensor, count: int) -> torch.Tensor:
    """`count` unit rows drawn from N(0, I) and orthogonalised (Gram-Schmidt, twice for float
    accuracy) against the span of the rows of `earlier` (k, n) and against each other; a row
    left (numerically) in that span is drawn again."""
    n = earlier.shape[1]
    basis: list[torch.Tensor] = []
    for row in earlier.double():  # an orthonormal basis of the earlier rows' span
        v = _orthogonalised(row, basis)
        if v.norm() > 1e-8 * max(row.norm().item(), 1e-30):
            basis.append(v / v.norm())
    if len(basis) + count > n:
        raise ValueError(f"cannot draw {count} rows orthogonal to a {len(basis)}-dimensional span in R^{n}")
    rows = []
    while len(rows) < count:
        v = _orthogonalised(torch.randn(n, dtype=torch.float64, device=earlier.device), basis)
        if v.norm() < 1e-8:
            continue  # degenerate draw: the code restarts too
        basis.append(v / v.norm())
        rows.append(basis[-1])
    return (torch.stack(rows) if rows else earlier.new_zeros(0, n).double()).to(earlier.dtype)


def _orthogonalised(v: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    if not basis:
        return v
    b = torch.stack(basis)
    for _ in range(2):
        v = v - b.T @ (b @ v)
    return v


def ortho_penalty(x: torch.Tensor) -> torch.Tensor:
    """mean((X X^T - I)^2) over the rows of X (the code's normalisation of ||X X^T - I||^2)."""
    gram = x @ x.T
    return (gram - torch.eye(len(x), dtype=x.dtype, device=x.device)).square().mean()
