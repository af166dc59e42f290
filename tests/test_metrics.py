"""Confusion matrix and IoU against a pixel-by-pixel loop and against cityscapesscripts' own
evaluation code; sharded accumulation on 8 devices."""
import copy
import math

import jax
import numpy as np
import pytest
from PIL import Image

from cbst_jax import labels as labels_lib, metrics, sharding


def loop_confusion(labels, preds, c, ignore=255):
    """Rows: ground truth; columns: predicted class, then one for predictions outside [0, c)."""
    cm = np.zeros((c, c + 1), np.int64)
    for y, p in zip(labels.reshape(-1), preds.reshape(-1)):
        if y != ignore and y < c:
            cm[y, p if p < c else c] += 1
    return cm


def test_confusion_matches_loop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (4, 9, 7)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = 255
    preds = rng.integers(0, 6, labels.shape).astype(np.uint8)
    preds[rng.random(labels.shape) < 0.1] = 255
    preds[rng.random(labels.shape) < 0.05] = 7
    cm = np.asarray(jax.jit(metrics.confusion_matrix, static_argnums=2)(labels, preds, 6))
    np.testing.assert_array_equal(cm, loop_confusion(labels, preds, 6))


def cityscapes_miou(tmp_path, gt_train, pred_train):
    """mIoU of cityscapesscripts' pixel-level evaluation (its PNG reader, confusion matrix and
    IoU code) on trainId maps, converted to the labelIds it evaluates (trainId 255 -> its
    ``trainId2label[255]``, "unlabeled"). Its module reads CITYSCAPES_DATASET at import to
    place its default paths (nothing is read or written there by the calls used here)."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev
    from cityscapesscripts.helpers.labels import trainId2label

    lut = np.zeros(256, np.uint8)
    for train_id, label in trainId2label.items():
        if 0 <= train_id <= 255:
            lut[train_id] = label.id
    args = copy.copy(ev.args)  # its module-level settings, left as they are
    args.evalInstLevelScore, args.quiet, args.JSONOutput = False, True, False
    conf = ev.generateMatrix(args)
    for i, (gt, pred) in enumerate(zip(gt_train, pred_train)):
        gt_file, pred_file = tmp_path / f"gt_{i}.png", tmp_path / f"pred_{i}.png"
        Image.fromarray(lut[gt]).save(gt_file)
        Image.fromarray(lut[pred]).save(pred_file)
        ev.evaluatePair(str(pred_file), str(gt_file), conf, {}, {}, args)
    scores = {label: ev.getIouScoreForLabel(label, conf, args) for label in args.evalLabels}
    return ev.getScoreAverage(scores, args), scores


@pytest.mark.parametrize("agreement, out_of_range", [(0.7, 0.0), (0.7, 0.1), (1.0, 0.1), (0.7, 0.5)])
def test_miou_agrees_with_cityscapesscripts(tmp_path, monkeypatch, agreement, out_of_range):
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 19, (3, 20, 30)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = np.where(rng.random(gt.shape) < agreement, gt, rng.integers(0, 19, gt.shape)).astype(np.uint8)
    pred[rng.random(gt.shape) < out_of_range] = 255  # "no prediction", as in 255-filled maps
    pred[gt == 255] = np.where(rng.random((gt == 255).sum()) < 0.5, 255, 3)
    gt[gt == 7], pred[pred == 7] = 8, 8  # class 7 in neither: NaN, left out of both means
    want, per_label = cityscapes_miou(tmp_path, gt, pred)
    cm = np.asarray(metrics.confusion_matrix(gt, pred, 19))
    np.testing.assert_array_equal(cm, loop_confusion(gt, pred, 19))
    assert math.isclose(metrics.mean_iou(cm), want, rel_tol=1e-12)
    iou = metrics.per_class_iou(cm)
    for t, label_id in enumerate(labels_lib.CITYSCAPES_TRAINID_TO_ID):
        assert np.isclose(iou[t], per_label[label_id], rtol=1e-12, atol=0, equal_nan=True), t
    assert np.isnan(iou[7])
    if out_of_range:
        assert want < 0.95  # the pixels without a prediction cost IoU (dropping them gave 1.0)


def test_all_out_of_range_predictions_score_zero():
    gt = np.array([[0, 1], [1, 255]], np.uint8)
    cm = metrics.confusion_matrix(gt, np.full_like(gt, 255), 2)
    np.testing.assert_array_equal(cm, [[0, 0, 1], [0, 0, 2]])
    assert metrics.mean_iou(cm) == 0.0 and metrics.pixel_accuracy(cm) == 0.0


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
    cm = np.array([[5, 1, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0]])
    iou = metrics.per_class_iou(cm)
    assert math.isclose(iou[0], 5 / (5 + 1 + 2)) and math.isclose(iou[1], 3 / (3 + 2 + 1))
    assert math.isnan(iou[2])  # absent from GT and prediction
    assert math.isclose(metrics.mean_iou(cm), (iou[0] + iou[1]) / 2)
    assert math.isclose(metrics.mean_iou(cm, classes=[1]), iou[1])
    cm_fp = np.array([[5, 1], [0, 0]])  # class 1 predicted but never in GT: IoU 0, counted
    assert metrics.per_class_iou(cm_fp)[1] == 0.0  # a square matrix (no out-of-range column) works
    cm_fn = np.array([[5, 1, 4], [0, 0, 0]])  # 4 pixels of class 0 without a prediction: FN
    assert math.isclose(metrics.per_class_iou(cm_fn)[0], 5 / 10) and metrics.pixel_accuracy(cm_fn) == 0.5


def test_table_format():
    text = metrics.format_table([("ST r1", [0.5, float("nan")], 0.5)], ["road", "sky"],
                                extra_means={"mIoU*": [0.25]})
    assert "| ST r1 | 50.0 | n/a | 50.0 | 25.0 |" in text and "excluded from the mean" in text
    text = metrics.format_table([("CBST", [0.5, 0.4], 0.45)], ["road", "sky"], stds=[[0.01, 0.02, 0.03]])
    assert "50.0±1.0" in text and "45.0±3.0" in text
