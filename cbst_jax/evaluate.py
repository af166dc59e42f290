"""Evaluation of a model on the target evaluation split: the confusion matrix over the whole
split (mIoU, per-class IoU, pixel accuracy: ``cbst_jax.metrics``) and a few predictions kept
for figures."""
from __future__ import annotations


def evaluate(exp, variables, keep: int = 4, desc: str = "evaluate"):
    """(confusion matrix int64 (C, C), the first ``keep`` predictions as host arrays)."""
    batches = exp.batches(exp.data.target_eval, desc=desc)
    return exp.predictor.evaluate(variables, batches, keep)
