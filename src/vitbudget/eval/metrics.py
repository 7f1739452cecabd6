"""Accuracy, calibration and significance from logits and labels."""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor


def top1(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


def nll(logits: Tensor, labels: Tensor) -> float:
    return float(F.cross_entropy(logits.double(), labels))


def ece(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error over equal-width confidence bins (Guo et al. 2017)."""
    probs = logits.double().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # bin b holds confidences in (edges[b], edges[b+1]]; confidence 0 cannot occur after softmax
    index = torch.bucketize(conf, edges[1:-1], right=False)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += float(sel.double().mean()) * abs(float(conf[sel].mean()) - float(correct[sel].mean()))
    return total


def paired_ttest(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of a paired t-test between per-seed scores; nan when undefined."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or np.allclose(a - b, (a - b)[0]):
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test on per-image correctness of two predictors over the same images."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(stats.binomtest(min(only_a, only_b), n, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def _binned_ece(conf: np.ndarray, correct: np.ndarray, index: np.ndarray, bins: int, weights: np.ndarray) -> np.ndarray:
    """ECE of several resamples at once: weights (S, N) counts of each image in each resample."""
    total = weights.sum(axis=1)
    out = np.zeros(weights.shape[0])
    for b in range(bins):
        sel = index == b
        if not sel.any():
            continue
        w = weights[:, sel]
        n = w.sum(axis=1)
        gap = np.abs(w @ conf[sel] - w @ correct[sel])  # |sum conf - sum correct| = n * |mean conf - accuracy|
        out += np.where(n > 0, gap, 0.0) / total
    return out


def ece_difference(logits_a: Tensor, logits_b: Tensor, labels: Tensor, samples: int = 2000, bins: int = 15, seed: int = 0) -> dict[str, float]:
    """ECE(a) - ECE(b) in points, with a paired bootstrap over images (the same resample for both).

    Returns the difference, its 95 % interval and a two-sided bootstrap p-value (twice the smaller
    share of resampled differences on either side of zero).
    """
    edges = np.linspace(0, 1, bins + 1)
    parts = []
    for logits in (logits_a, logits_b):
        probs = logits.double().softmax(dim=1)
        conf, pred = probs.max(dim=1)
        conf = conf.numpy()
        parts.append((conf, (pred == labels).double().numpy(), np.searchsorted(edges[1:-1], conf, side="left")))
    n = len(labels)
    rng = np.random.default_rng(seed)
    deltas = []
    for start in range(0, samples, 100):  # resamples in chunks: a (S, N) weight matrix per chunk
        weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(min(100, samples - start))]).astype(float)
        deltas.append(100 * (_binned_ece(*parts[0], bins, weights) - _binned_ece(*parts[1], bins, weights)))
    deltas = np.concatenate(deltas)
    full = 100 * (ece(logits_a, labels, bins) - ece(logits_b, labels, bins))
    p = min(1.0, 2 * min((deltas <= 0).mean(), (deltas >= 0).mean()))
    return {"delta": full, "ci_low": float(np.percentile(deltas, 2.5)), "ci_high": float(np.percentile(deltas, 97.5)), "p_value": float(p)}


def mean_std(values) -> tuple[float, float]:
    arr = np.asarray(values, float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def cosine_similarity(features: Tensor, reference: Tensor) -> Tensor:
    """(N,) cosine similarity of each image's features to the reference's (e.g. the unpruned model's), in float64."""
    return F.cosine_similarity(features.double(), reference.double(), dim=1, eps=1e-12)


def summarize(logits: Tensor, labels: Tensor) -> dict[str, float]:
    return {"top1": 100 * top1(logits, labels), "ece": 100 * ece(logits, labels), "nll": nll(logits, labels)}


__all__ = ["cosine_similarity", "ece", "ece_difference", "mcnemar", "mean_std", "nll", "paired_ttest", "summarize", "top1"]
