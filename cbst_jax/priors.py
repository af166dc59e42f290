"""The spatial prior q_n(c) of CBST-SP: how likely class c is at image position n, counted on
the source label maps.

The reference never released how its prior was built (only a (19, 1024, 2048) ``.mat`` file).
Our construction, and why:

1. count each class at every position of a fixed *working resolution* (label maps resized by
   nearest neighbour at pixel centres, ``cbst_jax.data.io.resize_nearest``, so GTA5's 1052x1914
   and Cityscapes' 1024x2048 both fit);
2. smooth each class's count map with a Gaussian of standard deviation ``sigma`` (working-
   resolution pixels), because the counts of a few thousand images are noisy at rare classes;
3. normalise **per class over positions** (``normalize="class"``, the default, as the paper
   describes it: Σ_n q_n(c) = const): each class map is scaled to mean 1 over positions, so q
   says *where* a class occurs and nothing about *how often*;
4. floor it, q <- max(q, floor), so no class is impossible anywhere (a zero would forbid a class
   from ever being pseudo-labelled there).

The alternative, **per-position normalisation over classes** (``normalize="pixel"``: q_n is a
distribution over classes at each position, mixed with a uniform floor), also multiplies every
prediction by the class's frequency at that position. That is a class-frequency prior, the
opposite of class balancing: on the embedded benchmark it starved the rare classes (light and
sign pseudo-labels vanished; CBST-SP fell below CBST, docs/results.md), so it is only an option.

Arrays are (H, W, C), class axis last, so q broadcasts against NHWC probabilities.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np
from scipy import ndimage

from cbst_jax.atomic_files import atomic_write
from cbst_jax.data.io import resize_nearest

NORMALIZATIONS = ("pixel", "class")


def count_classes(label_maps: Iterable[np.ndarray], num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) int64 per-position class counts at the working resolution ``size``; 255 is skipped."""
    counts = np.zeros((size[0] * size[1], num_classes), np.int64)
    flat_pos = np.arange(size[0] * size[1])
    for label in label_maps:
        lab = resize_nearest(np.asarray(label), size).reshape(-1).astype(np.int64)
        keep = lab < num_classes
        np.add.at(counts, (flat_pos[keep], lab[keep]), 1)
    return counts.reshape(size[0], size[1], num_classes)


def prior_from_counts(counts: np.ndarray, sigma: float = 4.0, floor: float = 1e-3,
                      normalize: str = "class") -> np.ndarray:
    """Smooth, normalise and floor per-position class counts -> float32 (H, W, C) prior."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZATIONS}")
    num_classes = counts.shape[-1]
    if not 0 <= floor * num_classes < 1:
        raise ValueError(f"floor={floor} too large for {num_classes} classes (need floor * C < 1)")
    smooth = counts.astype(np.float64)
    if sigma > 0:
        smooth = ndimage.gaussian_filter(smooth, sigma=(sigma, sigma, 0), mode="nearest")
    if normalize == "pixel":
        total = smooth.sum(-1, keepdims=True)
        q = np.where(total > 0, smooth / np.maximum(total, 1e-300), 1.0 / num_classes)
        q = (1 - num_classes * floor) * q + floor
    else:
        mean = smooth.mean(axis=(0, 1), keepdims=True)
        q = np.where(mean > 0, smooth / np.maximum(mean, 1e-300), 1.0)
        q = np.maximum(q, floor)
    return q.astype(np.float32)


def build_spatial_prior(label_maps: Iterable[np.ndarray], num_classes: int, size=(128, 256),
                        sigma: float = 4.0, floor: float = 1e-3, normalize: str = "class") -> np.ndarray:
    """Spatial prior from an iterable of source (H, W) trainId label maps (255 = ignore)."""
    return prior_from_counts(count_classes(label_maps, num_classes, tuple(size)), sigma, floor, normalize)


def resize_prior(prior: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (half-pixel centres) resize of an (H, W, C) prior to a prediction size; a
    per-position distribution stays one because bilinear weights are convex."""
    prior = np.asarray(prior, np.float32)
    if prior.shape[:2] == tuple(size):
        return prior
    zoom = (size[0] / prior.shape[0], size[1] / prior.shape[1], 1)
    out = ndimage.zoom(prior, zoom, order=1, mode="nearest", grid_mode=True)
    return out.astype(np.float32)


def save_prior(path: str, prior: np.ndarray, **meta) -> None:
    """Writes ``prior`` and its construction settings to ``path`` (.npz) atomically."""
    path = os.fspath(path)
    atomic_write(path, lambda f: np.savez_compressed(f, prior=np.asarray(prior, np.float32), meta=json.dumps(meta)))


def load_prior(path: str, num_classes: int | None = None) -> np.ndarray:
    """Loads a prior saved by ``save_prior``; checks its class count when given."""
    try:
        with np.load(os.fspath(path)) as f:
            prior = f["prior"]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a spatial-prior .npz with a 'prior' array ({e})") from None
    if prior.ndim != 3 or (num_classes is not None and prior.shape[-1] != num_classes):
        raise ValueError(f"{path}: prior has shape {prior.shape}, expected (H, W, {num_classes or 'C'})")
    return prior.astype(np.float32)
