"""Segmentation metrics: a confusion matrix that accumulates on device over batches, devices
and hosts (it is a sum), then per-class IoU, mIoU and mIoU over a class subset (mIoU* = 13 of
the 16 SYNTHIA classes), and the paper-style table.

IoU_c = TP / (TP + FP + FN). A prediction outside [0, C) (e.g. 255, "no label") on a valid
ground-truth pixel is a false negative of the ground-truth class and a false positive of no
class, as cityscapesscripts counts it (there a trainId 255 becomes labelId 0, "unlabeled",
ignored in evaluation), so the matrix has one extra column for such predictions. A class absent
from both the ground truth and the predictions has an undefined IoU: it is reported as NaN and
left out of the mean (the table says so), as cityscapesscripts does. The CRST code instead
counts it as 0 (``nan_to_num``), which only matters on tiny sets.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cbst_jax.labels import IGNORE_INDEX


def confusion_matrix(labels, preds, num_classes: int, ignore_index: int = IGNORE_INDEX, valid=None):
    """(C, C + 1) int32 counts: rows = ground truth, columns = predicted class, and a last column
    for predictions outside [0, C) (false negatives of the row's class). Pixels whose label is
    ``ignore_index`` (or outside [0, C)) or where ``valid`` is False are not counted.

    Jittable; on batch-sharded inputs the sum is global (XLA inserts the reduction). Sum the
    result over batches to accumulate; int32 holds 2^31 pixels (~1000 Cityscapes images) per
    call, so accumulate across calls in int64 on the host (``ConfusionAccumulator``)."""
    c = num_classes
    labels = jnp.asarray(labels).astype(jnp.int32)
    preds = jnp.asarray(preds).astype(jnp.int32)
    keep = (labels != ignore_index) & (labels >= 0) & (labels < c)
    if valid is not None:
        keep &= jnp.asarray(valid, bool)
    column = jnp.where((preds >= 0) & (preds < c), preds, c)
    flat = jnp.where(keep, labels * (c + 1) + column, c * (c + 1))
    counts = jnp.zeros(c * (c + 1) + 1, jnp.int32).at[flat.reshape(-1)].add(1)
    return counts[:-1].reshape(c, c + 1)


class ConfusionAccumulator:
    """Host-side int64 running sum of per-batch confusion matrices (exact at any dataset size)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.total = np.zeros((num_classes, num_classes + 1), np.int64)

    def add(self, cm) -> None:
        self.total += np.asarray(jax.device_get(cm), np.int64)


def per_class_iou(cm) -> np.ndarray:
    """IoU per class from a (C, C + 1) confusion matrix (or a square (C, C) one); NaN where the
    class is in neither ground truth nor prediction."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm[:, :cm.shape[0]])
    union = cm[:, :cm.shape[0]].sum(0) + cm.sum(1) - tp  # predicted + ground truth - both
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(cm, classes: Sequence[int] | None = None) -> float:
    """Mean IoU over ``classes`` (all by default), skipping NaN (absent) classes."""
    iou = per_class_iou(cm)
    if classes is not None:
        iou = iou[list(classes)]
    iou = iou[~np.isnan(iou)]
    return float(iou.mean()) if iou.size else float("nan")


def pixel_accuracy(cm) -> float:
    """Correct pixels over all counted ground-truth pixels (out-of-range predictions are wrong)."""
    cm = np.asarray(cm, np.float64)
    return float(np.trace(cm[:, :cm.shape[0]]) / cm.sum()) if cm.sum() else float("nan")


def _fmt(v: float, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}" if std is None else f"{100 * v:.1f}±{100 * std:.1f}"


def format_table(rows: Sequence[tuple[str, Sequence[float], float]], class_names: Sequence[str],
                 extra_means: dict[str, Sequence[float]] | None = None,
                 stds: Sequence[Sequence[float] | None] | None = None, markdown: bool = True) -> str:
    """Paper-style table: one row per (method, round), one column per class, then mIoU.

    ``rows`` = [(row_name, per_class_iou (C,), miou)], IoUs as fractions, printed in percent.
    ``extra_means`` adds further mean columns (e.g. {"mIoU*": [..per row..]}). ``stds`` (optional,
    per row: per-class std followed by the mIoU std) prints mean±std for multi-seed tables."""
    extra_means = extra_means or {}
    header = ["method"] + list(class_names) + ["mIoU"] + list(extra_means)
    body = []
    for i, (name, ious, miou) in enumerate(rows):
        sd = stds[i] if stds is not None else None
        cells = [name]
        for c, v in enumerate(ious):
            cells.append(_fmt(float(v), None if sd is None else float(sd[c])))
        cells.append(_fmt(float(miou), None if sd is None else float(sd[len(ious)])))
        for key, vals in extra_means.items():
            cells.append(_fmt(float(vals[i])))
        body.append(cells)
    note = "IoU in %; n/a = class absent from both ground truth and prediction, excluded from the mean."
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + "\n\n" + note
    widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]
    fmt = lambda r: "  ".join(x.rjust(w) if j else x.ljust(w) for j, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header)] + [fmt(r) for r in body] + [note])
