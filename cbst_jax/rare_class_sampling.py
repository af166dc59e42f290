"""Rare-class sampling (RCS) of source images, DAFormer (Hoyer et al., CVPR 2022), on the host.

lhoyer/DAFormer ``mmseg/datasets/uda_dataset.py`` (``get_rcs_class_probs``, ``UDADataset``) with
the values of ``configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py``
(``rare_class_sampling=dict(min_pixels=3000, class_temp=0.01, min_crop_ratio=0.5)``):

* ``f_c`` is class ``c``'s share of all labelled source pixels, counted per image on the full
  label maps (``tools/convert_datasets/gta.py`` writes the per-image counts; the ignore label
  is not counted);
* a class is drawn with ``P(c) = softmax((1 - f_c) / T)``, ``T = 0.01``;
* then an image uniformly among those holding *more than* ``min_pixels = 3000`` pixels of ``c``
  (``pixels > self.rcs_min_pixels``);
* the random crop of that image is re-drawn, up to 10 times, until it holds more than
  ``min_pixels * min_crop_ratio = 1500`` pixels of ``c`` (:func:`choose_crop`).

A class with no qualifying image: DAFormer asserts that none exists (and a class absent from
the source set is not in its table at all). Here such classes are left out of the draw and the
others' probabilities renormalised (``P(c) ∝ exp((1 - f_c)/T)`` over the classes that can be
sampled, ``f_c`` still the share among all pixels); :attr:`RareClassSampler.excluded` lists
them, and a source set where no class qualifies is an error.

Determinism: :meth:`RareClassSampler.draw` is a pure function of ``(seed, step)`` (a
``np.random.Generator`` seeded with both), so a resumed run draws the same images, and every
host of a multi-host run draws the same global batch and keeps its own rows.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

TEMPERATURE = 0.01  # class_temp
MIN_PIXELS = 3000  # min_pixels
MIN_CROP_RATIO = 0.5  # min_crop_ratio
CROP_REDRAWS = 10  # uda_dataset.get_rare_class_sample: for j in range(10)
_STREAM = 0x5C5  # separates this generator's streams from the pipeline's


def image_class_counts(label_maps: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
    """(N, C) int64 pixel counts of each class in each label map (values >= C are skipped)."""
    rows = []
    for label in label_maps:
        label = np.asarray(label).reshape(-1)
        rows.append(np.bincount(label[label < num_classes].astype(np.int64), minlength=num_classes))
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, num_classes), np.int64)


def class_frequencies(counts) -> np.ndarray:
    """``f_c``: each class's share of all labelled pixels (C,) float64."""
    totals = np.asarray(counts, np.int64).sum(0)
    if totals.sum() == 0:
        raise ValueError("the source label maps hold no labelled pixel")
    return totals / totals.sum()


def sampling_probabilities(frequencies, temperature: float = TEMPERATURE, eligible=None) -> np.ndarray:
    """``P(c) ∝ exp((1 - f_c) / T)`` over the ``eligible`` classes (all by default), 0 elsewhere."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    f = np.asarray(frequencies, np.float64)
    eligible = np.ones(f.shape, bool) if eligible is None else np.asarray(eligible, bool)
    if not eligible.any():
        raise ValueError("no class can be sampled")
    logits = np.where(eligible, (1.0 - f) / temperature, -np.inf)
    p = np.exp(logits - logits[eligible].max())
    return p / p.sum()


class RareClassSampler:
    """Which source image each row of a step draws: ``draw(step, n) -> (classes, images)``."""

    def __init__(self, counts, *, temperature: float = TEMPERATURE, min_pixels: int = MIN_PIXELS, seed: int = 0):
        counts = np.asarray(counts, np.int64)
        if counts.ndim != 2 or counts.shape[0] == 0:
            raise ValueError(f"counts must be (images, classes) with at least one image, got {counts.shape}")
        self.seed = int(seed)
        self.frequencies = class_frequencies(counts)
        qualifying = counts > min_pixels
        self.images_of = tuple(np.flatnonzero(qualifying[:, c]) for c in range(counts.shape[1]))
        eligible = qualifying.any(0)
        self.excluded = tuple(int(c) for c in np.flatnonzero(~eligible))
        self.probabilities = sampling_probabilities(self.frequencies, temperature, eligible)

    def draw(self, step: int, n: int):
        """Classes (n,) and source image indices (n,) of training step ``step``."""
        rng = np.random.default_rng([self.seed, int(step), _STREAM])
        classes = rng.choice(len(self.probabilities), size=n, p=self.probabilities)
        images = np.array([self.images_of[c][rng.integers(len(self.images_of[c]))] for c in classes], np.int64)
        return classes.astype(np.int64), images


def choose_crop(draw_crop: Callable[[int], np.ndarray], cls: int, *, min_pixels: int = MIN_PIXELS,
                min_crop_ratio: float = MIN_CROP_RATIO, redraws: int = CROP_REDRAWS):
    """DAFormer's crop re-draw: ``draw_crop(attempt)`` returns the label crop of attempt
    ``attempt`` (0, 1, ...); the first of attempts ``0..redraws-1`` holding more than
    ``min_pixels * min_crop_ratio`` pixels of ``cls`` is kept, else attempt ``redraws``
    unchecked. Returns ``(attempt, crop)``."""
    need = min_pixels * min_crop_ratio
    for attempt in range(redraws):
        crop = draw_crop(attempt)
        if min_crop_ratio <= 0 or np.count_nonzero(np.asarray(crop) == cls) > need:
            return attempt, crop
    return redraws, draw_crop(redraws)


__all__ = ["TEMPERATURE", "MIN_PIXELS", "MIN_CROP_RATIO", "CROP_REDRAWS", "image_class_counts",
           "class_frequencies", "sampling_probabilities", "RareClassSampler", "choose_crop"]
