"""Confusion matrix and IoU against a pixel-by-pixel loop; sharded accumulation on 8 devices."""
import math

import jax
import numpy as np

from cbst_jax import metrics, sharding


def loop_confusion(labels, preds, c, ignore=255):
    cm = np.zeros((c, c), np.int64)
    for y, p in zip(labels.reshape(-1), preds.reshape(-1)):
        if y != ignore and y < c:
            cm[y, p] += 1
    return cm


def test_confusion_matches_loop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (4, 9, 7)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = 255
    preds = rng.integers(0, 6, labels.shape).astype(np.uint8)
    cm = np.asarray(jax.jit(metrics.confusion_matrix, static_argnums=2)(labels, preds, 6))
    np.testing.assert_array_equal(cm, loop_confusion(labels, preds, 6))


def test_valid_mask_and_sharded_accumulation():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, (16, 6, 5)).astype(np.uint8)
    preds = rng.integers(0, 5, labels.shape).astype(np.uint8)
    valid = rng.random(labels.shape) < 0.7
    mesh = sharding.make_mesh()
    acc = metrics.ConfusionAccumulator(5)
    fn = jax.jit(metrics.confusion_matrix, static_argnums=2)
    for sl in (slice(0, 8), slice(8, 16)):
        batch = sharding.to_global({"y": labels[sl], "p": preds[sl], "v": valid[sl]}, mesh)
        acc.add(fn(batch["y"], batch["p"], 5, 255, batch["v"]))
    masked = np.where(valid, labels, 255)
    np.testing.assert_array_equal(acc.total, loop_confusion(masked, preds, 5))


def test_iou_and_means():
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    iou = metrics.per_class_iou(cm)
    assert math.isclose(iou[0], 5 / (5 + 1 + 2)) and math.isclose(iou[1], 3 / (3 + 2 + 1))
    assert math.isnan(iou[2])  # absent from GT and prediction
    assert math.isclose(metrics.mean_iou(cm), (iou[0] + iou[1]) / 2)
    assert math.isclose(metrics.mean_iou(cm, classes=[1]), iou[1])
    cm_fp = np.array([[5, 1], [0, 0]])  # class 1 predicted but never in GT: IoU 0, counted
    assert metrics.per_class_iou(cm_fp)[1] == 0.0


def test_table_format():
    text = metrics.format_table([("ST r1", [0.5, float("nan")], 0.5)], ["road", "sky"],
                                extra_means={"mIoU*": [0.25]})
    assert "| ST r1 | 50.0 | n/a | 50.0 | 25.0 |" in text and "excluded from the mean" in text
    text = metrics.format_table([("CBST", [0.5, 0.4], 0.45)], ["road", "sky"], stds=[[0.01, 0.02, 0.03]])
    assert "50.0±1.0" in text and "45.0±3.0" in text
