"""Metrics against hand-computed values and scipy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitbudget.eval.metrics import ece, mcnemar, nll, paired_ttest, top1


def test_top1_and_nll():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert top1(logits, labels) == pytest.approx(2 / 3)
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (math.e + 1)) + math.log(1 / (math.exp(3) + 1))) / 3
    assert nll(logits, labels) == pytest.approx(expected)


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct): bins hold {0.9,0.9} and {0.6}
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)  # float32 0.9 is 0.8999999762
    labels = torch.tensor([0, 1, 0])
    expected = (2 / 3) * abs(0.9 - 0.5) + (1 / 3) * abs(0.6 - 1.0)
    assert ece(probs.log(), labels) == pytest.approx(expected, abs=1e-9)


def test_ece_zero_when_calibrated():
    # 4 images at confidence 0.75, 3 of them correct
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert ece(probs.log(), torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-7)  # float32 log


def test_mcnemar_and_ttest():
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
    b = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0], bool)
    result = mcnemar(a, b)
    assert (result["only_a"], result["only_b"]) == (8, 0)
    assert result["p_value"] == pytest.approx(2 * 0.5**8)
    assert mcnemar(a, a)["p_value"] == 1.0
    assert paired_ttest([1, 2, 3], [1, 2, 3]) != paired_ttest([1, 2, 3], [1, 2, 3])  # nan: no variance
    assert paired_ttest([1.0, 2.1, 3.3, 4.0], [0.5, 1.0, 2.9, 3.1]) < 0.05
