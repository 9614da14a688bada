"""Regressions found by the real-architecture smoke runs (tests/test_real_architectures.py), kept small and fast."""

from __future__ import annotations

import pytest

from clbench.engine.runner import RunSpec, run


def _numel(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# iCaRL's class means, its nearest-mean classifier: seen classes x 32 (clbench_mlp_tiny's width) after each experience
@pytest.mark.parametrize("strategy, teacher_attr, class_means", [("lwf", "teacher", (0, 0)),
                                                                 ("icarl", "old_model", (2 * 32, 4 * 32))])
def test_a_frozen_teacher_snapshot_is_not_counted_in_total_params(tmp_path, fast_config_for, strategy, teacher_attr,
                                                                  class_means):
    """The teacher copy serves training only: `total_params` is the model (backbone, head and what it keeps
    for inference), and the snapshot's size is reported beside it as `teacher_params` (before the fix it
    was added to the count)."""
    model, teacher = [], []

    def keep(i, result, s):
        model.append(_numel(s.backbone, s.head) + class_means[i])
        snapshot = getattr(s, teacher_attr)
        teacher.append(None if snapshot is None else _numel(snapshot))

    result = run(RunSpec(strategy, "synthetic-2", run=fast_config_for(tmp_path, flops="off"), seed=0), on_experience=keep)
    assert result.status == "completed", result.error
    records = result.edge["per_experience"]
    assert teacher[0] is None and teacher[1] > 0  # the second experience trains against a teacher
    assert [r["total_params"] for r in records] == model
    assert [r.get("teacher_params") for r in records] == teacher


def test_ranpac_counts_its_random_projection_and_readout_in_total_params(tmp_path, fast_config_for):
    """W (d x M) and the ridge readout (M x classes) are layers of RanPAC's inference network held as
    buffers; before the fix `total_params` left both out."""
    counted = []
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", flops="off")
    spec = RunSpec("ranpac", "synthetic-2", run=cfg, seed=0, strategy_overrides={"bottleneck": 4, "projection_dim": 32})
    result = run(spec, on_experience=lambda i, r, s: counted.append(sum(p.numel() for p in s.parameters())))
    assert result.status == "completed", result.error
    classes = 4  # synthetic-2: two experiences of two classes
    for record, parameters in zip(result.edge["per_experience"], counted):
        assert record["total_params"] == parameters + 64 * 32 + 32 * classes  # clbench_vit_tiny: width 64
        assert record["stored_state_bytes"] == (64 * 32 + 32 * classes) * 4


def test_preprompt_calibrates_when_the_statistics_pass_missed_some_classes(tmp_path, fast_config_for):
    """With `limit_train_batches` the statistics pass may meet only some of the task's classes; the
    calibration set is built from the classes it met (before the fix: KeyError on the first class missed)."""
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", batch_size=2, limit_train_batches=1, flops="off")
    spec = RunSpec("preprompt", "digits32-2", run=cfg, seed=0, strategy_overrides={
        "prompt_length": 2, "prompt_blocks": 2, "calibration_epochs": 1, "calibration_batch": 16})
    result = run(spec)
    assert result.status == "completed", result.error  # 2 of 5 classes measured per task at most
    assert len(result.accuracy_matrix) == 2


VIT_TINY_WIDTH = 64  # clbench_vit_tiny's embedding
CLASSES = 4  # synthetic-2: two experiences of two classes


def _run_counting_parameters(tmp_path, fast_config_for, strategy: str, **overrides):
    """A synthetic-2 run on clbench_vit_tiny, with each experience's parameter count beside its record."""
    counted = []
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", flops="off")
    spec = RunSpec(strategy, "synthetic-2", run=cfg, seed=0, strategy_overrides=overrides)
    result = run(spec, on_experience=lambda i, r, s: counted.append(sum(p.numel() for p in s.parameters())))
    assert result.status == "completed", result.error
    return list(zip(result.edge["per_experience"], counted))


@pytest.mark.parametrize("strategy, width, overrides", [("simplecil", VIT_TINY_WIDTH, {}),
                                                        ("aper", 2 * VIT_TINY_WIDTH, {"bottleneck": 4})])
def test_prototype_classifiers_count_their_class_means_in_total_params(tmp_path, fast_config_for, strategy, width,
                                                                       overrides):
    """SimpleCIL's and APER's classifier is one prototype per class (all classes x the embedding width:
    d, and APER's [pre-trained; adapted] 2d), kept as float64 buffers; before the fix `total_params` left
    it out."""
    for record, parameters in _run_counting_parameters(tmp_path, fast_config_for, strategy, **overrides):
        assert record["total_params"] == parameters + CLASSES * width
        assert record["stored_state_bytes"] == CLASSES * width * 8


def test_ease_counts_its_prototypes_in_every_subspace_in_total_params(tmp_path, fast_config_for):
    """EASE's classifier is a prototype per class in every subspace (subspaces x classes x d), a buffer
    beside the stored adapters; before the fix only the adapters were counted."""
    adapter = 4 * (VIT_TINY_WIDTH * 4 + 4 + 4 * VIT_TINY_WIDTH + VIT_TINY_WIDTH)  # 4 blocks: W_down, b_down, W_up, b_up
    for t, (record, parameters) in enumerate(_run_counting_parameters(tmp_path, fast_config_for, "ease", bottleneck=4)):
        stored = (t + 1) * adapter + (t + 1) * CLASSES * VIT_TINY_WIDTH
        assert record["total_params"] == parameters + stored
        assert record["stored_state_bytes"] == stored * 4
