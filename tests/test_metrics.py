"""Metrics and speed arithmetic against hand-computed values, scipy's distributions and a fake clock."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from vitbudget.eval import speed
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


def _reference_ece(conf: list[float], correct: list[bool], bins: int) -> float:
    """Guo et al.'s ECE written the plain way: bin b holds confidences in (b/bins, (b+1)/bins]."""
    total = 0.0
    for b in range(bins):
        members = [i for i, c in enumerate(conf) if max(0, math.ceil(c * bins) - 1) == b]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(sum(conf[i] for i in members) / len(members) - acc)
    return total


def test_ece_uses_15_bins_golden():
    """A case only 15 equal-width bins reproduce: every other bin count from 1 to 40 gives another value."""
    g = torch.Generator().manual_seed(0)
    conf = 0.1 + 0.9 * torch.rand(60, generator=g, dtype=torch.float64)  # the max probability of 10 classes
    correct = torch.rand(60, generator=g, dtype=torch.float64) < conf
    probs = torch.cat([conf[:, None], ((1 - conf) / 9)[:, None].expand(-1, 9)], dim=1)
    labels = torch.where(correct, 0, 1)
    golden = 0.1437621534979677
    assert _reference_ece(conf.tolist(), correct.tolist(), 15) == pytest.approx(golden, abs=1e-12)
    assert all(abs(_reference_ece(conf.tolist(), correct.tolist(), b) - golden) > 2e-3 for b in range(1, 41) if b != 15)
    assert ece(probs.log(), labels) == pytest.approx(golden, abs=1e-12)


def test_mcnemar_is_the_exact_binomial_test():
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 3, bool)  # 8 right only in a, 2 only in b, 5 both, 3 neither
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 3, bool)
    result = mcnemar(a, b)
    assert (result["only_a"], result["only_b"]) == (8, 2)
    expected = 2 * sum(math.comb(10, k) for k in range(3)) / 2**10  # two-sided: 2 * P(X <= 2), X ~ Bin(10, 1/2)
    assert expected == pytest.approx(0.109375) and result["p_value"] == pytest.approx(expected, rel=1e-12)
    assert mcnemar(b, a)["p_value"] == pytest.approx(expected, rel=1e-12)


def test_paired_ttest_by_hand():
    a, b = np.array([71.2, 70.8, 71.9, 71.5, 70.9]), np.array([70.1, 70.5, 70.2, 70.9, 70.4])
    d = a - b
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    expected = 2 * scipy_stats.t.sf(abs(t), df=len(d) - 1)
    assert t == pytest.approx(3.33082, abs=1e-5) and expected == pytest.approx(0.029084, abs=1e-6)  # d = 1.1 .3 1.7 .6 .5
    assert paired_ttest(a, b) == pytest.approx(expected, rel=1e-10)
    assert math.isnan(paired_ttest([1, 2, 3], [0, 1, 2]))  # a constant difference has no variance


class FakeClock:
    """Stands in for the `time` module of eval.speed: each start/stop pair of perf_counter calls spans the next scripted duration."""

    def __init__(self, durations: list[float]):
        self.durations = list(durations)
        self.now, self.started = 0.0, False

    def perf_counter(self) -> float:
        if self.started:
            self.now += self.durations.pop(0)
        self.started = not self.started
        return self.now


def test_speed_report_medians_and_per_round_ratios_with_a_fake_clock(monkeypatch):
    base, meth = [1.0, 4.0, 5.0], [2.0, 5.0, 9.0]  # per-round ratios 2, 1.25, 1.8: median 1.8, not 5/4 (ratio of medians)
    clock = FakeClock([t for pair in zip(base, meth) for t in pair])
    monkeypatch.setattr(speed, "time", clock)
    calls = []
    times = speed.time_interleaved({"base": calls.append, "meth": calls.append}, [torch.zeros(1), torch.ones(1)], warmup=1, repeats=3)
    assert times == {"base": base, "meth": meth} and not clock.durations
    assert [float(x) for x in calls] == [0, 0] + [0, 0, 1, 1, 0, 0]  # warm-up, then round r uses input r % 2, round-robin
    report = speed.speed_report(times, batch=8, baseline="base")
    assert report["meth"]["median_ms"] == 5000.0 and report["meth"]["images_per_s"] == pytest.approx(8 / 5.0)
    assert report["meth"]["time_ratio"] == pytest.approx(1.8) and report["base"]["time_ratio"] == 1.0


def test_rotated_rounds_start_at_each_entry_in_turn_and_keep_times_by_name(monkeypatch):
    order = []
    fns = {name: (lambda x, name=name: order.append(name)) for name in "abc"}
    clock = FakeClock([float(i) for i in range(9)])  # calls 0..8 last 0, 1, 2, ... seconds in the order they run
    monkeypatch.setattr(speed, "time", clock)
    times = speed.time_interleaved(fns, [torch.zeros(1)], warmup=0, repeats=3, rotate=True)
    assert order == list("abc" "bca" "cab")  # each entry leads one round, never always after the same one
    assert times == {"a": [0.0, 5.0, 7.0], "b": [1.0, 3.0, 8.0], "c": [2.0, 4.0, 6.0]}
