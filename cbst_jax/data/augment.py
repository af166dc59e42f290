"""Joint image/label transforms in numpy (reference §4): random rescale, crop to a fixed size
with 255-padded labels, horizontal flip, and rare-class patch mining (crops centred on a pixel
of a rare class with probability ``p_mine``).

Images stay uint8 (normalisation happens on the device); labels are resized with nearest
neighbour and never subsampled here (the loss does that). Every random draw comes from the
caller's ``np.random.Generator``, so a record's augmentation is a pure function of its seed.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from cbst_jax.labels import IGNORE_INDEX

# ImageNet mean colour in uint8 RGB: the "mean" image padding of the CBST reference loader.
MEAN_RGB = (124, 116, 104)


def fill_value(image_fill) -> np.ndarray:
    """(3,) uint8 padding colour from 0 / an int / an RGB triple / "mean"."""
    if isinstance(image_fill, str):
        if image_fill != "mean":
            raise ValueError(f"image_fill must be a number, an RGB triple or 'mean', got {image_fill!r}")
        return np.asarray(MEAN_RGB, np.uint8)
    return np.broadcast_to(np.asarray(image_fill, np.uint8), (3,)).copy()


def rescale(image: np.ndarray, label: np.ndarray | None, scale: float):
    """Resizes by ``scale``: image bilinear (PIL), label nearest neighbour (pixel centres)."""
    h, w = image.shape[:2]
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (nh, nw) == (h, w):
        return image, label
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    if label is not None:
        label = label[nearest_source(nh, h)[:, None], nearest_source(nw, w)[None, :]]
    return image, label


def nearest_source(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each of ``n_out`` pixels resized from ``n_in`` by nearest neighbour
    (pixel centres): ``⌊(t + ½)·n_in/n_out⌋``."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def crop(image: np.ndarray, label: np.ndarray, y0: int, x0: int, height: int, width: int,
         image_fill=0, label_fill: int = IGNORE_INDEX):
    """The (height, width) window at (y0, x0); parts outside the image are padding
    (``image_fill`` colour, ``label_fill`` labels). Offsets may be negative."""
    h, w = image.shape[:2]
    out_i = np.empty((height, width, 3), np.uint8)
    out_i[:] = fill_value(image_fill)
    out_l = np.full((height, width), label_fill, np.uint8)
    sy0, sy1 = max(y0, 0), min(y0 + height, h)
    sx0, sx1 = max(x0, 0), min(x0 + width, w)
    if sy1 > sy0 and sx1 > sx0:
        out_i[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
        out_l[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = label[sy0:sy1, sx0:sx1]
    return out_i, out_l


def hflip(image: np.ndarray, label: np.ndarray):
    return image[:, ::-1], label[:, ::-1]


def _offset_range(size: int, crop_size: int) -> tuple[int, int]:
    """Allowed window offsets: inside the image when it is larger than the crop, otherwise
    the image lies wholly inside the (padded) window."""
    return min(0, size - crop_size), max(0, size - crop_size)


def crop_offsets(rng: np.random.Generator, label: np.ndarray, crop_size: tuple[int, int],
                 mine_classes=(), p_mine: float = 0.8) -> tuple[int, int, int]:
    """Window offsets (y0, x0) and the mined class (-1 if none).

    With probability ``p_mine``, a class of ``mine_classes`` present in ``label`` is chosen
    uniformly and the window is centred on a random pixel of it, clamped so that the window
    stays on the image; the pixel is always inside the window. Otherwise the offset is uniform.
    """
    h, w = label.shape
    ch, cw = crop_size
    ylo, yhi = _offset_range(h, ch)
    xlo, xhi = _offset_range(w, cw)
    mined = -1
    if len(mine_classes) and rng.random() < p_mine:
        counts = np.bincount(label.ravel(), minlength=256)
        present = [int(c) for c in mine_classes if c != IGNORE_INDEX and counts[c] > 0]
        if present:
            mined = present[rng.integers(len(present))]
            ys, xs = np.nonzero(label == mined)
            j = rng.integers(len(ys))
            y0 = int(np.clip(ys[j] - ch // 2, ylo, yhi))
            x0 = int(np.clip(xs[j] - cw // 2, xlo, xhi))
            return y0, x0, mined
    return int(rng.integers(ylo, yhi + 1)), int(rng.integers(xlo, xhi + 1)), mined


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where an augmented crop came from: the record's (height, width), its rescaled size, the
    window offsets in the rescaled image and whether it was flipped."""
    size: tuple[int, int]
    rescaled: tuple[int, int]
    offset: tuple[int, int]
    crop: tuple[int, int]
    flipped: bool

    def source_pixels(self):
        """(rows (ch,), cols (cw,)): the record pixel each crop row / column shows under the
        nearest-neighbour label transform, -1 where the crop is padding."""
        out = []
        for n_in, n_res, off, n_crop in zip(self.size, self.rescaled, self.offset, self.crop):
            t = off + np.arange(n_crop)
            src = nearest_source(n_res, n_in)[np.clip(t, 0, n_res - 1)]
            out.append(np.where((t >= 0) & (t < n_res), src, -1))
        rows, cols = out
        return rows, (cols[::-1] if self.flipped else cols)


def augment(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, *,
            crop_size: tuple[int, int], scale_range=(0.5, 1.5), flip: bool = True,
            mine_classes=(), p_mine: float = 0.8, image_fill=0, return_geometry: bool = False):
    """Training transform of one record: rescale by U(scale_range), crop ``crop_size``
    (rare-class mining, 255-padding), flip with p=0.5. Returns uint8 image and label (and the
    :class:`Geometry`, to carry soft labels through the same transform)."""
    lo, hi = scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    size = image.shape[:2]
    image, label = rescale(image, label, scale)
    rescaled = image.shape[:2]
    y0, x0, _ = crop_offsets(rng, label, crop_size, mine_classes, p_mine)
    image, label = crop(image, label, y0, x0, *crop_size, image_fill=image_fill)
    flipped = bool(flip and rng.random() < 0.5)
    if flipped:
        image, label = hflip(image, label)
    image, label = np.ascontiguousarray(image), np.ascontiguousarray(label)
    if return_geometry:
        return image, label, Geometry(tuple(size), tuple(rescaled), (y0, x0), tuple(crop_size), flipped)
    return image, label


def _cell_taps(pixels: np.ndarray, stride: int, n_cells: int):
    """Bilinear taps between cell centres for pixel indices: (lower cell, upper cell, weight of
    the upper one). Cell i covers pixels [i·s, (i+1)·s), its centre at pixel (i + ½)·s − ½."""
    u = (pixels.astype(np.float64) + 0.5) / stride - 0.5
    i0 = np.floor(u)
    w1 = (u - i0).astype(np.float32)
    i0 = i0.astype(np.int64)
    return np.clip(i0, 0, n_cells - 1), np.clip(i0 + 1, 0, n_cells - 1), w1


def warp_pixels(values: np.ndarray, geometry: Geometry, fill=0) -> np.ndarray:
    """A per-pixel map of the record (e.g. LR* top masses) through the crop's nearest-neighbour
    transform, exactly as the hard label went (``fill`` on padding)."""
    rows, cols = geometry.source_pixels()
    out = values[np.maximum(rows, 0)][:, np.maximum(cols, 0)]
    inside = (rows >= 0)[:, None] & (cols >= 0)[None, :]
    return np.where(inside.reshape(inside.shape + (1,) * (out.ndim - 2)), out, fill).astype(values.dtype)


def warp_cells(cells: np.ndarray, stride: int, geometry: Geometry, normalize: bool = True) -> np.ndarray:
    """Float32 (ch, cw, K) distributions of an augmented crop from a record's uint8 cells
    (⌈h/s⌉, ⌈w/s⌉, K) (``cbst_jax.soft_labels``): at each crop pixel, the bilinear interpolation
    between the centres of the *non-empty* cells around the record pixel the hard label came
    from (``Geometry.source_pixels``), renormalised; padding and pixels without a non-empty
    neighbour are all-zero rows. Separable: rows first, then columns. ``normalize=False`` skips
    the per-pixel renormalisation and the padding mask (for callers that renormalise anyway,
    as ``soft_labels.compose``: it is a positive per-pixel factor)."""
    from cbst_jax.soft_labels import dequantize

    dist = dequantize(cells)
    rows, cols = geometry.source_pixels()
    r0, r1, wr = _cell_taps(np.maximum(rows, 0), stride, dist.shape[0])
    c0, c1, wc = _cell_taps(np.maximum(cols, 0), stride, dist.shape[1])

    def sample(x):
        x = (1 - wr)[:, None, None] * x[r0] + wr[:, None, None] * x[r1]
        out = x[:, c0]
        out *= (1 - wc)[None, :, None]
        upper = x[:, c1]
        upper *= wc[None, :, None]
        out += upper
        return out

    mass = sample(dist)
    if not normalize:
        return mass
    weight = sample((dist.sum(axis=-1, keepdims=True) > 0).astype(np.float32))
    inside = ((rows >= 0)[:, None] & (cols >= 0)[None, :])[..., None] & (weight > 0)
    return np.where(inside, mass / np.where(weight > 0, weight, 1.0), 0.0).astype(np.float32)
