"""clbench.metrics against hand-computed matrices, and forgetting against Avalanche's own metric."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clbench import metrics as M

# R[i][j]: accuracy on experience j after training experience i.  Column 0 rises after
# its own experience and then falls, so "max - last" and "diag - last" differ.
R = [
    [0.60, 0.00, 0.00],
    [0.90, 0.80, 0.00],
    [0.30, 0.50, 0.70],
]


def test_final_average_accuracy():
    assert M.final_average_accuracy(R) == pytest.approx((0.30 + 0.50 + 0.70) / 3)


def test_average_incremental_accuracy():
    steps = [0.60, (0.90 + 0.80) / 2, (0.30 + 0.50 + 0.70) / 3]
    assert M.average_incremental_accuracy(R) == pytest.approx(sum(steps) / 3)


def test_forgetting_max_is_max_minus_last():
    # column 0: max(0.6, 0.9) - 0.3 = 0.6; column 1: 0.8 - 0.5 = 0.3
    assert M.forgetting_max(R) == pytest.approx((0.6 + 0.3) / 2)


def test_forgetting_diag_is_diag_minus_last():
    # column 0: 0.6 - 0.3 = 0.3; column 1: 0.8 - 0.5 = 0.3
    assert M.forgetting_diag(R) == pytest.approx(0.3)


def test_the_two_forgetting_definitions_differ_when_accuracy_rises_after_learning():
    assert M.forgetting_max(R) > M.forgetting_diag(R)
    monotone = [[0.6, 0.0, 0.0], [0.5, 0.8, 0.0], [0.3, 0.5, 0.7]]
    assert M.forgetting_max(monotone) == pytest.approx(M.forgetting_diag(monotone))


def test_backward_transfer_is_minus_diag_forgetting():
    assert M.backward_transfer(R) == pytest.approx((0.3 - 0.6 + 0.5 - 0.8) / 2)
    improving = [[0.5, 0.0], [0.7, 0.9]]
    assert M.backward_transfer(improving) == pytest.approx(0.2)
    assert M.forgetting_diag(improving) == pytest.approx(-0.2)


def test_forward_transfer_against_the_untrained_model():
    with_transfer = [[0.6, 0.4, 0.2], [0.9, 0.8, 0.3], [0.3, 0.5, 0.7]]
    b = [0.1, 0.5, 0.25]
    # j=1: R[0,1] - b1 = 0.4 - 0.5; j=2: R[1,2] - b2 = 0.3 - 0.25
    assert M.forward_transfer(with_transfer, b) == pytest.approx((-0.1 + 0.05) / 2)
    # class-IL masking: unseen columns are 0, so FWT is minus the mean untrained accuracy
    assert M.forward_transfer(R, b) == pytest.approx(-(0.5 + 0.25) / 2)


def test_plasticity_is_the_diagonal_mean():
    assert M.plasticity(R) == pytest.approx((0.6 + 0.8 + 0.7) / 3)


def test_single_experience_metrics():
    one = [[0.75]]
    assert M.final_average_accuracy(one) == 0.75
    assert M.average_incremental_accuracy(one) == 0.75
    assert M.plasticity(one) == 0.75
    for fn in (M.forgetting_max, M.forgetting_diag, M.backward_transfer):
        assert math.isnan(fn(one))
    assert math.isnan(M.forward_transfer(one, [0.1]))


def test_partial_matrix_uses_rows_so_far():
    """A run stopped after two of three experiences is scored over the experiences trained."""
    partial = R[:2]
    assert M.final_average_accuracy(partial) == pytest.approx((0.90 + 0.80) / 2)
    assert M.forgetting_diag(partial) == pytest.approx(0.60 - 0.90)
    # Mammoth's max runs over the rows before the last, so an improved experience forgets negatively
    assert M.forgetting_max(partial) == pytest.approx(0.60 - 0.90)


def test_malformed_matrix_is_rejected():
    with pytest.raises(ValueError):
        M.final_average_accuracy([0.1, 0.2])
    with pytest.raises(ValueError):
        M.final_average_accuracy([[0.1], [0.2]])  # more rows than experiences


def test_summarise_names_and_directions():
    out = M.summarise(R, initial=[0.1, 0.5, 0.25])
    assert out["final_avg_acc"] == pytest.approx(0.5)
    assert out["forgetting_max"] == pytest.approx(0.45)
    assert out["forgetting_diag"] == pytest.approx(0.3)
    assert out["fwt"] == pytest.approx(-0.375)
    assert M.METRICS["forgetting_max"].higher_is_better is False
    assert M.METRICS["bwt"].higher_is_better is True
    assert "fwt" not in M.summarise(R)


# --------------------------------------------------------------------------- Avalanche's own forgetting
N_SAMPLES = 20  # accuracies in R are multiples of 1/20, so logits can realise them exactly


def _predictions_with_accuracy(acc: float):
    """Labels and logits (2 classes) whose argmax accuracy is exactly `acc`."""
    y = torch.zeros(N_SAMPLES, dtype=torch.long)
    logits = torch.zeros(N_SAMPLES, 2)
    correct = round(acc * N_SAMPLES)
    logits[:correct, 0] = 1.0
    logits[correct:, 1] = 1.0
    return y, logits


def avalanche_stream_forgetting(matrix) -> float:
    """Drive Avalanche 0.6's StreamForgetting plugin metric through its own hooks, one eval per row.

    The fake strategy carries only what the hooks read: the experience ids and the
    minibatch labels/outputs of one evaluation iteration per test experience.
    """
    from avalanche.evaluation.metrics import StreamForgetting

    metric = StreamForgetting()
    for i, row in enumerate(matrix):
        metric.before_training_exp(SimpleNamespace(experience=SimpleNamespace(current_experience=i)))
        metric.before_eval(None)
        for j, acc in enumerate(row):
            y, logits = _predictions_with_accuracy(acc)
            strategy = SimpleNamespace(experience=SimpleNamespace(current_experience=j), mb_y=y, mb_output=logits)
            metric.before_eval_exp(strategy)
            metric.after_eval_iteration(strategy)
            metric.after_eval_exp(strategy)
    return float(metric.result())


def test_avalanche_accuracy_driver_is_exact():
    from avalanche.evaluation.metrics import TaskAwareAccuracy

    acc = TaskAwareAccuracy()
    y, logits = _predictions_with_accuracy(0.35)
    acc.update(y, logits, 0)
    assert acc.result(0)[0] == pytest.approx(0.35)


def test_forgetting_diag_matches_avalanche_stream_forgetting():
    ours_diag, ours_max = M.forgetting_diag(R), M.forgetting_max(R)
    theirs = avalanche_stream_forgetting(R)
    assert theirs == pytest.approx(ours_diag, abs=1e-9)
    assert theirs != pytest.approx(ours_max, abs=1e-3)  # Avalanche is the diagonal definition, not max


def test_forgetting_diag_matches_avalanche_on_a_random_matrix():
    rng = np.random.default_rng(0)
    t = 5
    m = np.round(rng.integers(0, N_SAMPLES + 1, size=(t, t)) / N_SAMPLES, 4)
    m[np.triu_indices(t, 1)] = 0.0
    assert avalanche_stream_forgetting(m.tolist()) == pytest.approx(M.forgetting_diag(m), abs=1e-9)


# ------------------------------------------------------------------ a run stopped early: fewer rows than experiences
# After 2 of 3 experiences the matrix has 2 rows; every metric reads the rows it has, never a column count.
PARTIAL = [
    [0.60, 0.10, 0.20],
    [0.40, 0.80, 0.30],
]


def test_metrics_of_a_partial_matrix_read_its_rows():
    assert M.average_incremental_accuracy(PARTIAL) == pytest.approx((0.60 + (0.40 + 0.80) / 2) / 2)
    assert M.backward_transfer(PARTIAL) == pytest.approx(0.40 - 0.60)
    assert M.plasticity(PARTIAL) == pytest.approx((0.60 + 0.80) / 2)
    # FWT over experience 1 only: R[0][1] - b_1 (experience 2 is not reached yet)
    assert M.forward_transfer(PARTIAL, [0.05, 0.25, 0.15]) == pytest.approx(0.10 - 0.25)


def test_forward_transfer_is_defined_from_two_experiences():
    assert M.forward_transfer([[0.5, 0.2], [0.4, 0.9]], [0.1, 0.05]) == pytest.approx(0.2 - 0.05)
    assert math.isnan(M.forward_transfer([[0.5, 0.2]], [0.1, 0.05]))


def test_a_boolean_matrix_is_read_as_numbers():
    # correct/incorrect per experience (a one-sample test set) is a matrix of booleans
    assert M.forgetting_max([[True, False], [False, True]]) == pytest.approx(1.0)


def test_a_malformed_matrix_says_what_it_expected():
    with pytest.raises(ValueError, match=r"accuracy matrix must be \(rows <= experiences\) x experiences, got shape \(3, 2\)"):
        M.final_average_accuracy([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
