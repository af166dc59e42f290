"""Labelling the target: the first step of every self-training round.

At the round's portion p the current model's predictions on the whole target train split
(the network run once per image, scale and flip, its logits kept on the devices or in host RAM
for the later passes: ``cbst_jax.predictor.Predictor.label_split``) give the thresholds λ (one per class for CBST, one pooled for ST, over prior-weighted scores for the
-SP variants: ``cbst_jax.selection``, streamed and exact), then every image's pseudo-labels
ŷ = argmax q·p/λ where that ratio is ≥ 1, else ignored (for CRST's LR* methods the soft
minimisers of the label-regularised objective at the same λ), written to the stage's
:class:`~cbst_jax.pseudo_label_store.PseudoLabelStore` with a manifest of the round's
statistics (with the pass's mean prediction entropy, for ``cbst_jax.collapse_guard``). Only
host-sized uint8 maps leave the devices.
"""
from __future__ import annotations

import jax
import numpy as np

from cbst_jax import sharding as shd
from cbst_jax.methods import Method, Stage
from cbst_jax.predictor import local_rows
from cbst_jax.pseudo_label_store import Manifest, PseudoLabelStore


def label_target(exp, variables, method: Method, stage: Stage, portion: float, store: PseudoLabelStore) -> Manifest:
    """Thresholds at ``portion``, then the pseudo-labels of the whole target train split, the
    network run once per image, scale and flip (``Predictor.label_split``); returns the
    manifest (also written, last, into ``store``)."""
    target, hidden = exp.data.target_train, exp.data.hidden_label_key
    prior = exp.prior if method.spatial_prior else None
    kind = method.label_regularizer
    stride = exp.labelling.soft_label_stride
    soft = exp.labelling.soft_labelling(kind)
    show = jax.process_index() == 0
    if show:
        store.begin()
    shd.barrier("pl-begin")

    def write(host, out):
        if soft is not None:  # CRST LR*: soft labels from the same class-balanced λ
            for (row, top), (_, cells) in zip(local_rows(out.top, host), local_rows(out.cells, host, stride)):
                store.write_soft(int(host["index"][row]), top, cells)
        for row, label in local_rows(out.labels, host):
            store.write(int(host["index"][row]), label)

    res = exp.predictor.label_split(variables, lambda: exp.batches(target, hidden), portion, method.policy, prior,
                                    exp.labelling.select_subsample, write, soft=soft, desc=f"{stage.key} labels",
                                    total=-(-len(target) // exp.eval_batch_size))
    shd.barrier("pl-written")
    c = exp.num_classes
    manifest = Manifest(method=method.name, round=stage.round, portion=portion, policy=method.policy,
                        thresholds=np.asarray(res.thresholds).tolist(),
                        class_counts=np.asarray(res.class_counts).tolist(),
                        selected=np.asarray(res.selected, np.int64).tolist(),
                        correct=np.asarray(res.correct, np.int64).tolist(), valid_pixels=int(res.valid_pixels),
                        mine_classes=mining_classes(res.class_counts, c), num_records=len(target),
                        has_ground_truth=hidden is not None, soft_label_stride=stride if kind else None,
                        logits=res.cache.path,
                        mean_entropy=float(res.mean_entropy) if np.isfinite(res.mean_entropy) else None)
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
