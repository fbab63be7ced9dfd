"""Metric definitions against hand-computed matrices."""

import re

import pytest

from spg_fast.harness.metrics import average_accuracy, backward_transfer, forgetting, summary

R = [[0.9], [0.7, 0.8], [0.6, 0.85, 0.95]]


def test_hand_computed():
    assert average_accuracy(R) == pytest.approx((0.6 + 0.85 + 0.95) / 3)
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.85 - 0.8)) / 2)
    # task 0: best before the end 0.9 -> 0.6; task 1: best 0.8 -> 0.85 (no forgetting, negative)
    assert forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.85)) / 2)


def test_weighted_by_test_size():
    s = summary(R, [100, 300, 50])
    assert s["acc_weighted"] == pytest.approx((0.6 * 100 + 0.85 * 300 + 0.95 * 50) / 450)
    assert s["bwt_weighted"] == pytest.approx(((0.6 - 0.9) * 100 + (0.85 - 0.8) * 300) / 400)
    assert s["forgetting_weighted"] == pytest.approx((0.3 * 100 - 0.05 * 300) / 400)


def test_forgetting_uses_the_best_earlier_accuracy():
    r = [[0.5], [0.9, 0.7], [0.4, 0.7, 0.8]]
    assert forgetting(r) == pytest.approx(((0.9 - 0.4) + (0.7 - 0.7)) / 2)


def test_single_task_and_bad_shapes():
    assert backward_transfer([[0.7]]) == forgetting([[0.7]]) == 0.0
    with pytest.raises(ValueError, match=re.escape("row i holding tasks 0..i")):
        average_accuracy([[0.5], [0.5]])
