"""Sharded inference for self-training and evaluation.

One jitted function maps a padded, fixed-shape batch of uint8 images to class probabilities
at the label (canvas) size: single scale, or multi-scale + flip (MST): at every scale the image
is resized, the network's logits are bilinearly upsampled (align_corners, as CRST) back to
the canvas, turned into probabilities, and the probabilities are averaged over scales and
flips. Everything the self-training needs is reduced on the device from there:

* the two histogram passes of the exact class-wise thresholds (``cbst_jax.selection``),
* pseudo-labels (uint8) with per-class selected / correct pixel counts, and for CRST's LR*
  modes the soft labels' uint8 encoding (``cbst_jax.soft_labels``),
* a confusion matrix for evaluation,

so full-resolution float probability maps never reach the host (the reference wrote 152 MiB
of them per image). The passes recompute the forward pass instead of caching predictions:
3 forward passes per round of pseudo-labelling, no storage.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cbst_jax import crst, losses, metrics, selection, soft_labels
from cbst_jax import sharding as shd
from cbst_jax.labels import IGNORE_INDEX


def _resize_images(images, size):
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size[0], size[1], c), method="linear", antialias=False)


def _selection_counts(labels, gt, valid, num_classes: int):
    """Per class: selected pixels, selected pixels equal to ``gt``; and the valid-pixel count."""
    c = num_classes
    li = labels.astype(jnp.int32)
    picked = jnp.zeros(c + 1, jnp.int32).at[jnp.minimum(li, c).reshape(-1)].add(1)[:c]
    hit = jnp.where(li == gt.astype(jnp.int32), li, c)
    correct = jnp.zeros(c + 1, jnp.int32).at[jnp.minimum(hit, c).reshape(-1)].add(1)[:c]
    return picked, correct, jnp.sum(valid.astype(jnp.int32))


class LabelledBatch(NamedTuple):
    """Hard pseudo-labels of one batch: ``labels`` uint8 (B, H, W), batch-sharded, 255 where
    ignored or padded; ``selected`` (C,) int32 labelled pixels per class; ``correct`` (C,) int32
    labelled pixels equal to the batch's ground truth (0 without one); ``valid`` () int32 valid
    pixels of the batch."""

    labels: jax.Array
    selected: jax.Array
    correct: jax.Array
    valid: jax.Array


class SoftLabelledBatch(NamedTuple):
    """CRST LR* pseudo-labels of one batch in ``cbst_jax.soft_labels``' encoding: ``labels``
    uint8 (B, H, W) (argmax of ŷ, 255 where ŷ = 0), ``top`` uint8 (B, H, W) (the top mass),
    ``cells`` uint8 (B, ⌈H/s⌉, ⌈W/s⌉, C) (the residual cells), then ``selected``, ``correct``,
    ``valid`` as in :class:`LabelledBatch`."""

    labels: jax.Array
    top: jax.Array
    cells: jax.Array
    selected: jax.Array
    correct: jax.Array
    valid: jax.Array


class Evaluation(NamedTuple):
    """``confusion`` (C, C + 1) int64 over all batches (``metrics.confusion_matrix``: the last
    column counts predictions outside [0, C)); ``predictions``: the first kept predictions
    (host uint8 maps, each cropped to its record)."""

    confusion: np.ndarray
    predictions: list


class Predictor:
    """Probabilities, threshold statistics, pseudo-labels and confusion matrices of a model on
    batch-sharded padded batches (``EvalIterator`` batches made global with ``to_global``)."""

    def __init__(self, model, num_classes: int, mesh, canvas: tuple[int, int],
                 scales: Sequence[float] = (1.0,), flip: bool = True):
        self.model, self.num_classes, self.mesh = model, num_classes, mesh
        self.canvas = tuple(int(c) for c in canvas)
        self.scales, self.flip = tuple(float(s) for s in scales), bool(flip)
        self._rep, self._data = shd.replicated(mesh), shd.batch_sharded(mesh)
        self._jit_cache: dict = {}

    # ------------------------------------------------------------------ traced pieces
    def probs(self, variables, images):
        """(B, H, W, C) float32 probabilities averaged over scales and flips."""
        x = images.astype(jnp.float32)
        total, n = 0.0, 0
        for s in self.scales:
            size = (max(8, round(self.canvas[0] * s)), max(8, round(self.canvas[1] * s)))
            xs = x if size == self.canvas else _resize_images(x, size)
            for flipped in ((False, True) if self.flip else (False,)):
                xi = xs[:, :, ::-1] if flipped else xs
                logits = self.model.apply(variables, xi, train=False)
                if flipped:
                    logits = logits[:, :, ::-1]
                up = losses.resize_bilinear_align_corners(logits.astype(jnp.float32), self.canvas)
                total = total + jax.nn.softmax(up, axis=-1)
                n += 1
        return total / n

    def _jit(self, key, fn, **kw):
        if key not in self._jit_cache:
            self._jit_cache[key] = jax.jit(fn, **kw)
        return self._jit_cache[key]

    # ------------------------------------------------------------------ passes
    def threshold_statistics(self, variables, batches_fn, prior=None, bins=None, subsample: int = 1):
        """One histogram pass over ``batches_fn()`` (global batches); int64 (C, 65536) counts.
        ``bins`` None is the coarse pass, ``RefinementTarget.bins`` the fine one."""
        hist = selection.histogram_step(self.mesh, bins is not None, subsample)

        def step(acc, bins, variables, images, valid, prior):
            return hist(acc, bins, self.probs(variables, images), valid, prior)

        fn = self._jit(("hist", bins is not None, subsample, prior is None), step, donate_argnums=0)
        batches = ((variables, b["image"], b["valid"], prior) for b in batches_fn())
        return selection.histogram_pass(fn, batches, self.num_classes, bins, self._rep)

    def thresholds(self, variables, batches_fn, portion: float, policy: str, prior=None,
                   subsample: int = 1) -> selection.ClassThresholds:
        """Exact λ (C,) over a whole split (two streaming passes) and per-class pixel counts."""
        return selection.two_pass_thresholds(
            lambda bins: self.threshold_statistics(variables, batches_fn, prior, bins, subsample), portion, policy)

    def pseudo_labels(self, variables, batch, thresholds, prior=None) -> LabelledBatch:
        """CBST hard pseudo-labels of one global batch (:class:`LabelledBatch`)."""
        c = self.num_classes

        def step(variables, images, valid, gt, lam, prior):
            lab = selection.select_pseudo_labels(self.probs(variables, images), lam, prior)
            lab = jnp.where(valid, lab, IGNORE_INDEX).astype(jnp.uint8)
            return LabelledBatch(lab, *_selection_counts(lab, gt, valid, c))

        fn = self._jit(("pl", prior is None), step,
                       out_shardings=LabelledBatch(self._data, self._rep, self._rep, self._rep))
        lam = jax.device_put(np.asarray(thresholds, np.float32), self._rep)
        return fn(variables, batch["image"], batch["valid"], batch["label"], lam, prior)

    def soft_pseudo_labels(self, variables, batch, thresholds, *, kind: str, alpha: float, stride: int,
                           keep: str = "objective") -> SoftLabelledBatch:
        """CRST LR* labelling of one global batch (:class:`SoftLabelledBatch`, cells at
        ``stride``); ``keep``: which pixels are kept (``cbst_jax.crst.soft_pseudo_labels``)."""
        c = self.num_classes

        def step(variables, images, valid, gt, lam):
            soft = crst.soft_pseudo_labels(self.probs(variables, images), lam, kind=kind, alpha=alpha, keep=keep)
            soft = jnp.where(valid[..., None], soft, 0.0)
            lab, top, cells = soft_labels.encode(soft, stride)
            return SoftLabelledBatch(lab, top, cells, *_selection_counts(lab, gt, valid, c))

        fn = self._jit(("soft", kind, float(alpha), int(stride), keep), step,
                       out_shardings=SoftLabelledBatch(*[self._data] * 3, *[self._rep] * 3))
        lam = jax.device_put(np.asarray(thresholds, np.float32), self._rep)
        return fn(variables, batch["image"], batch["valid"], batch["label"], lam)

    def confusion(self, variables, batch, return_pred: bool = False):
        """(C, C + 1) int32 confusion matrix of one batch (``metrics.confusion_matrix``; and the
        uint8 predictions if asked)."""
        c = self.num_classes

        def step(variables, images, labels, valid):
            pred = jnp.argmax(self.probs(variables, images), axis=-1)
            cm = metrics.confusion_matrix(labels, pred, c, IGNORE_INDEX, valid)
            return cm, jnp.where(valid, pred, IGNORE_INDEX).astype(jnp.uint8)

        fn = self._jit(("cm",), step, out_shardings=(self._rep, self._data))
        cm, pred = fn(variables, batch["image"], batch["label"], batch["valid"])
        return (cm, pred) if return_pred else cm

    def evaluate(self, variables, batches: Iterable, keep_predictions: int = 0, *,
                 desc: str | None = None, total: int | None = None) -> Evaluation:
        """Confusion matrix (int64) over all ``(global batch, host batch)`` pairs, plus the first
        ``keep_predictions`` predictions (host numpy, cropped to each record) for figures. With
        ``desc``, a tqdm bar (``total`` batches) on process 0."""
        acc, kept = metrics.ConfusionAccumulator(self.num_classes), []
        if desc is not None:
            batches = tqdm(batches, desc=desc, total=total, disable=jax.process_index() != 0, leave=False)
        for batch, host_batch in batches:
            cm, pred = self.confusion(variables, batch, return_pred=True)
            acc.add(cm)
            if len(kept) < keep_predictions:
                for row, lab in local_rows(pred, host_batch):
                    if len(kept) < keep_predictions:
                        kept.append(lab)
        return Evaluation(acc.total, kept)


def local_rows(global_labels, host_batch, stride: int = 1):
    """(host row, map cropped to the record's valid region) for this host's real rows; with
    ``stride`` > 1 the maps are cell grids and keep ⌈h/stride⌉ x ⌈w/stride⌉ cells."""
    out = []
    offset = jax.process_index() * len(host_batch["index"])
    for shard in global_labels.addressable_shards:
        start = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for k in range(data.shape[0]):
            row = start + k - offset
            if 0 <= row < len(host_batch["index"]) and host_batch["index"][row] >= 0:
                valid = host_batch["valid"][row]
                h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
                out.append((row, data[k, :-(-h // stride), :-(-w // stride)]))
    out.sort(key=lambda t: t[0])
    return out
