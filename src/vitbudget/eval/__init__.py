"""Metrics, FLOPs, speed and the evaluation loop."""
from ..runtime.cost import dense_macs, executed_macs_per_image, macs_per_image
from .evaluate import Predictions, evaluate, measure_speed, predict
from .metrics import ece, mcnemar, nll, paired_ttest, summarize, top1

__all__ = ["Predictions", "dense_macs", "ece", "evaluate", "executed_macs_per_image", "macs_per_image", "mcnemar", "measure_speed", "nll", "paired_ttest", "predict", "summarize", "top1"]
