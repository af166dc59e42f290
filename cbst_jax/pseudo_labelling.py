"""Labelling the target: the first step of every self-training round.

At the round's portion p the current model's predictions on the whole target train split give
the thresholds λ (one per class for CBST, one pooled for ST, over prior-weighted scores for the
-SP variants: ``cbst_jax.selection``, streamed and exact), then every image's pseudo-labels
ŷ = argmax q·p/λ where that ratio is ≥ 1, else ignored (for CRST's LR* methods the soft
minimisers of the label-regularised objective at the same λ), written to the stage's
:class:`~cbst_jax.pseudo_label_store.PseudoLabelStore` with a manifest of the round's
statistics. Only host-sized uint8 maps leave the devices.
"""
from __future__ import annotations

import jax
import numpy as np

from cbst_jax import sharding as shd
from cbst_jax.methods import Method, Stage
from cbst_jax.predict import local_rows
from cbst_jax.pseudo_label_store import Manifest, PseudoLabelStore


def label_target(exp, variables, method: Method, stage: Stage, portion: float, store: PseudoLabelStore) -> Manifest:
    """Thresholds at ``portion``, then the pseudo-labels of the whole target train split;
    returns the manifest (also written, last, into ``store``)."""
    cfg = exp.config
    target = exp.data.target_train
    hidden = exp.data.hidden_label_key
    prior = exp.prior if method.spatial_prior else None
    show = jax.process_index() == 0

    def batches():
        return (g for g, _ in exp.batches(target, hidden, desc=f"{stage.key} λ"))

    lam, class_counts = exp.predictor.thresholds(variables, batches, portion, method.policy, prior,
                                                 cfg.self_training.select_subsample)
    if show:
        store.begin()
    shd.barrier("pl-begin")
    c = exp.num_classes
    kind = method.label_regularizer
    stride = cfg.self_training.soft_label_stride
    picked, correct, valid_n = np.zeros(c, np.int64), np.zeros(c, np.int64), 0
    for g, host in exp.batches(target, hidden, desc=f"{stage.key} labels"):
        if kind:  # CRST LR*: soft labels from the same class-balanced λ
            lab, top, cells, p, k, v = exp.predictor.soft_pseudo_labels(
                variables, g, lam, kind=kind, alpha=cfg.self_training.label_reg_weight[kind], stride=stride,
                keep=cfg.self_training.label_reg_keep[kind])
            for (row, t), (_, cell) in zip(local_rows(top, host), local_rows(cells, host, stride)):
                store.write_soft(int(host["index"][row]), t, cell)
        else:
            lab, p, k, v = exp.predictor.pseudo_labels(variables, g, lam, prior)
        for row, label in local_rows(lab, host):
            store.write(int(host["index"][row]), label)
        picked += np.asarray(p, np.int64)
        correct += np.asarray(k, np.int64)
        valid_n += int(v)
    shd.barrier("pl-written")
    manifest = Manifest(method=method.name, round=stage.round, portion=portion, policy=method.policy,
                        thresholds=lam.tolist(), class_counts=np.asarray(class_counts).tolist(),
                        selected=picked.tolist(), correct=correct.tolist(), valid_pixels=valid_n,
                        mine_classes=mining_classes(class_counts, c), num_records=len(target),
                        has_ground_truth=hidden is not None, soft_label_stride=stride if kind else None)
    if show:
        store.finish(manifest)
    shd.barrier("pl-done")
    return manifest


def mining_classes(class_counts, num_classes: int, share: float = 1e-3, rarest: int = 3) -> list[int]:
    """Classes for rare-class patch mining (reference §1a.7): those whose predicted-pixel share is
    below ``share`` (rarest first); if none, the ``rarest`` rarest predicted classes."""
    counts = np.asarray(class_counts, np.float64)[:num_classes]
    total = counts.sum()
    if total <= 0:
        return []
    order = [int(c) for c in np.argsort(counts, kind="stable") if counts[c] > 0]
    rare = [c for c in order if counts[c] / total < share]
    return rare or order[:rarest]
