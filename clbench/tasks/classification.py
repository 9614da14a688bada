"""Class-incremental classification: a backbone and a growing head, scored by accuracy.

After experience i every test experience j is scored with the logits of the classes seen so
far (`R[i][j]`, the accuracy matrix); the summary metrics are `clbench.metrics` over it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from clbench import metrics as M
from clbench.models.freeze import evaluating
from clbench.tasks.base import Column, Task
from clbench.types import ExperienceInfo


@torch.no_grad()
def evaluate(strategy, loaders, n_seen: int, device=None, predict_logits=None) -> list[float]:
    """Class-IL accuracy on each test set, scoring only the `n_seen` classes seen so far.

    Logits of classes not yet seen are masked out (the head may be wider than the classes
    seen), so a test set whose classes are all unseen scores 0 by construction: it is recorded
    as 0 without a pass (the classes of experience j are the positions after those of
    experiences 0..j-1, so the test sets of unseen experiences come last). `predict_logits`
    (default: the strategy's) scores another version of the model, such as an add-on's
    quantized snapshot. A strategy with `masks_unseen_classes = False` (eTag's `mask_unseen=False`)
    is scored over all its logits, on every test set: a seen class's sample whose top logit is a
    class not seen yet is an error.
    """
    predict_logits = predict_logits or strategy.predict_logits
    masked = getattr(strategy, "masks_unseen_classes", True)
    row = []
    with evaluating(strategy, device) as device:
        for loader in loaders:
            if masked and (n_seen == 0 or _all_unseen(loader.dataset, n_seen)):
                row.append(0.0 if len(loader.dataset) else float("nan"))
                continue
            correct = total = 0
            for batch in loader:
                batch = batch.to(device)
                logits = predict_logits(batch.x)
                logits = logits[:, :n_seen] if masked else logits
                correct += int((logits.argmax(dim=1) == batch.y).sum())
                total += len(batch)
            row.append(correct / total if total else float("nan"))
    return row


def _all_unseen(dataset, n_seen: int) -> bool:
    """Whether every label of a test set that knows its labels (`targets`) is a class not seen
    yet (>= `n_seen`); a set that would have to be read to tell is scored."""
    labels = getattr(dataset, "targets", None)
    if labels is None:
        return False
    labels = torch.as_tensor(labels)
    return len(labels) > 0 and int(labels.min()) >= n_seen


def limit_test_sets(scenario, limit: int | None) -> None:
    """`limit_eval_samples`: each test experience becomes its first `limit` samples (smoke runs and
    tests; the accuracies are then those of the subset). The loaders the run scores are built from
    `scenario.test_sets` after the model, so every evaluation (initial, per experience, add-ons,
    diagnostics) sees the same subset."""
    if limit is None:
        return
    from clbench.datasets import LabelledSubset

    def first(d):
        labels = getattr(d, "targets", None)
        labels = torch.as_tensor([int(d[i][1]) for i in range(limit)]) if labels is None else torch.as_tensor(labels)[:limit]
        return LabelledSubset(d, torch.arange(limit), labels)

    scenario.test_sets = [d if len(d) <= limit else first(d) for d in scenario.test_sets]


def accuracy_column(key: str, title: str) -> Column:
    spec = M.METRICS[key]
    return Column(key, title, spec.higher_is_better, lambda r: r.metrics.get(key), 100.0, ".1f", "%")


def format_matrix(R: Sequence[Sequence[float]]) -> str:
    """Rows: after training experience i; columns: test experience j; unseen cells as dots."""
    if not R:
        return "(no experience finished)"
    n = len(R[0])
    lines = ["after \\ on " + " ".join(f"{'e' + str(j + 1):>6s}" for j in range(n))]
    for i, row in enumerate(R):
        cells = " ".join(f"{100 * v:6.1f}" if j <= i else f"{'·':>6s}" for j, v in enumerate(row))
        lines.append(f"{'exp ' + str(i + 1):>10s} {cells}")
    return "\n".join(lines)


class ClassificationTask(Task):
    name = "classification"

    def build_model(self, strategy_cls, scenario, run_cfg, cfg):
        from clbench.models.backbones import (
            build_backbone,  # timm: imported only by runs that build one
        )

        name = run_cfg.backbone or scenario.default_backbone
        # the strategy's own backbone (its DEFAULTS, resolved into run_cfg) wins over the scenario's
        backbone = build_backbone(name, pretrained=run_cfg.pretrained, weights=run_cfg.weights,
                                  in_chans=scenario.input_shape[0], img_size=scenario.input_shape[-1],
                                  download=run_cfg.download)
        limit_test_sets(scenario, run_cfg.limit_eval_samples)
        return backbone, name, cfg

    def start(self, result, strategy, scenario, loaders, device) -> None:
        result.initial_accuracy = evaluate(strategy, loaders, n_seen=0, device=device)

    def after_experience(self, result, strategy, info: ExperienceInfo, scenario, loaders, device) -> None:
        result.accuracy_matrix.append(evaluate(strategy, loaders, n_seen=len(info.seen_classes), device=device))
        evaluate_add_ons(strategy, info, loaders, device, result)
        diagnose(strategy, info, loaders, device, result)

    def finish(self, result) -> None:
        result.metrics = M.summarise(result.accuracy_matrix, result.initial_accuracy)

    def columns(self) -> list[Column]:
        return [accuracy_column("final_avg_acc", "Final acc"), accuracy_column("avg_incremental_acc", "Avg inc. acc"),
                accuracy_column("forgetting_max", "Forgetting"), accuracy_column("bwt", "BWT")]

    def print_matrix(self, result, out) -> None:
        print(f"{self.matrix_name} matrix (%), rows: after training experience i; columns: test experience j", file=out)
        print(format_matrix(result.accuracy_matrix), file=out)


def evaluate_add_ons(strategy, info: ExperienceInfo, loaders, device, result) -> None:
    """Each add-on may score its own version of the model after an experience (a quantized
    snapshot, ...) with the same evaluation; what it returns is kept per experience."""
    n_seen = len(info.seen_classes)
    for a in strategy.aux:
        # an add-on's extra evaluations draw loader seeds from the global generator: forked, so the
        # training that follows is the one a run without the add-on would do
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            record = a.after_evaluation(
                strategy, info, lambda predict_logits: evaluate(strategy, loaders, n_seen, device, predict_logits))
        if record:
            result.aux_results.setdefault(a.name, []).append(record)


def diagnose(strategy, info: ExperienceInfo, loaders, device, result) -> None:
    """The strategy's own diagnostic, when it has one (see `CLStrategy.diagnose`)."""
    from clbench.base import CLStrategy  # Lightning: imported only where a run needs it

    if type(strategy).diagnose is CLStrategy.diagnose:
        return
    with evaluating(strategy, device) as device:
        record = strategy.diagnose(info, loaders, device)
    if record:
        result.diagnostics.append({"experience": info.index, **record})
