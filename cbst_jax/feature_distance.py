"""DAFormer's ImageNet feature distance (FD) on thing classes: keeps the student's bottleneck
features on source images close to those of a frozen ImageNet-initialised encoder.

lhoyer/DAFormer ``mmseg/models/uda/dacs.py`` (``calc_feat_dist``, ``masked_feat_dist``) with
``configs/_base_/uda/dacs_a999_fdthings.py``: ``imnet_feature_dist_lambda = 0.005``, thing
classes ``[6, 7, 11, 12, 13, 14, 15, 16, 17, 18]`` (Cityscapes trainIds: traffic light, traffic
sign, person, rider, car, truck, bus, train, motorcycle, bicycle),
``imnet_feature_dist_scale_min_ratio = 0.75``:

* features: the last (deepest) encoder stage (``feat[-1]``) of the student's forward on the
  source batch and of the frozen model in eval mode, no gradient into the latter;
* labels at the feature resolution (``mmseg/utils/utils.py`` ``downscale_label_ratio``):
  ``s = label_width // feature_width``; each ``s x s`` cell takes its most frequent value (the
  ignore label competing as one more class, first class on ties) if that value covers at least
  ``min_ratio`` of the cell, else ignore;
* ``FD = mean over cells labelled with a thing class of ||f_student - f_imagenet||_2``
  (over channels), added to the loss times ``lambda``. It is applied at every iteration.

Differences: a batch without any thing cell gives 0 here (torch's mean of an empty set is NaN);
the L2 norm's gradient at a zero difference is 0 (as torch's ``norm`` backward), not NaN.

Which layer is "the bottleneck" depends on the network; the caller names the submodule by its
flax path (:func:`capture_filter`), read from the forward's ``intermediates``
(:func:`captured`), so no network needs a second output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cbst_jax.labels import IGNORE_INDEX

WEIGHT = 0.005  # imnet_feature_dist_lambda
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # imnet_feature_dist_classes
MIN_RATIO = 0.75  # imnet_feature_dist_scale_min_ratio


def capture_filter(path):
    """``capture_intermediates`` filter keeping the ``__call__`` output of the module at ``path``."""
    path = tuple(path)
    return lambda module, method: method == "__call__" and tuple(module.path) == path


def captured(intermediates, path):
    """The output captured at module ``path`` from a forward's ``intermediates`` collection."""
    node = intermediates
    for name in path:
        node = node[name]
    return node["__call__"][0]


def downscale_labels(labels, scale: int, num_classes: int, min_ratio: float = MIN_RATIO,
                     ignore_label: int = IGNORE_INDEX):
    """(B, H, W) labels -> (B, H//s, W//s) int32: each ``s x s`` cell's majority value when it
    covers at least ``min_ratio`` of the cell, else ``ignore_label`` (values >= C are ignore)."""
    b, h, w = labels.shape
    if scale < 2:
        raise ValueError(f"feature distance needs labels larger than the features (scale {scale})")
    hh, ww = h // scale, w // scale
    lab = jnp.minimum(labels[:, :hh * scale, :ww * scale].astype(jnp.int32), num_classes)
    onehot = (lab[..., None] == jnp.arange(num_classes + 1)).astype(jnp.float32)
    ratio = onehot.reshape(b, hh, scale, ww, scale, num_classes + 1).sum((2, 4)) / np.float32(scale * scale)
    cls = jnp.argmax(ratio, axis=-1).astype(jnp.int32)
    keep = (cls < num_classes) & (jnp.max(ratio, axis=-1) >= np.float32(min_ratio))
    return jnp.where(keep, cls, ignore_label)


def _safe_norm(x):
    """||x||_2 over the last axis with gradient 0 at x = 0."""
    sq = jnp.sum(x * x, axis=-1)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def feature_distance(student, imagenet, labels, num_classes: int, classes=THING_CLASSES,
                     min_ratio: float = MIN_RATIO, ignore_label: int = IGNORE_INDEX):
    """FD of (B, h, w, D) student and frozen features on (B, H, W) source labels (unweighted):
    ``(mean distance over thing cells, number of thing cells)``."""
    h, w = student.shape[1:3]
    scale = labels.shape[2] // w
    cells = downscale_labels(labels, scale, num_classes, min_ratio, ignore_label)
    if cells.shape[1:] != (h, w):
        raise ValueError(f"labels {labels.shape[1:]} at scale {scale} give {cells.shape[1:]} cells, "
                         f"the features are {(h, w)}")
    mask = jnp.isin(cells, jnp.asarray(classes, jnp.int32))
    dist = _safe_norm(student.astype(jnp.float32) - jax.lax.stop_gradient(imagenet).astype(jnp.float32))
    n = jnp.sum(mask, dtype=jnp.int32)
    return jnp.sum(jnp.where(mask, dist, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32), n


__all__ = ["WEIGHT", "THING_CLASSES", "MIN_RATIO", "capture_filter", "captured", "downscale_labels",
           "feature_distance"]
