"""Joint image/label transforms of the training crops (reference §4), crop first: random rescale,
a fixed-size window (255-padded labels, zero-padded image), horizontal flip, and rare-class patch
mining (the window centred on a pixel of a rare class with probability ``p_mine``).

A crop is first drawn as a :class:`Geometry` (the record's size, its rescaled size, the window's
offset in the rescaled image, the flip), then cut: the image by resampling only the part of the
record under the window (bilinear at pixel centres, one ``cv2.warpAffine``: what CRST's loader
gets from ``cv2.resize(INTER_LINEAR)`` of the whole image and a crop, tested against an exact
float reference), the label by the nearest-neighbour rule of ``cbst_jax.data.io.nearest_indices``
at exactly the record pixels ``Geometry.source_pixels`` names, mapped through the record's id
table on the crop only. The random draws, the geometry and the labels are exactly those of
rescaling the whole record first and cropping after (what this module did before; tested against
a brute force). At scale 1 the image is a plain window. The image filter changed with the move:
the previous whole-record resize was Pillow's bilinear, which widens its kernel when shrinking
(CBST's choice); this one samples without widening, as CRST (DeepLab-v2, our recipe) does.
Rescaling a 1914x1052 record whole took 20-24 ms (issue 13's profile); warping its 512x1024 crop
takes 3-4 ms.

Images stay uint8 (normalisation happens on the device); labels are never subsampled here (the
loss does that). Every random draw comes from the caller's ``np.random.Generator``, so a crop is a
pure function of its seed.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from cbst_jax.data.io import nearest_indices
from cbst_jax.labels import IGNORE_INDEX


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
            src = nearest_indices(n_res, n_in)[np.clip(t, 0, n_res - 1)]
            out.append(np.where((t >= 0) & (t < n_res), src, -1))
        rows, cols = out
        return rows, (cols[::-1] if self.flipped else cols)


def _offset_range(size: int, crop_size: int) -> tuple[int, int]:
    """Allowed window offsets: inside the image when it is larger than the crop, otherwise
    the image lies wholly inside the (padded) window."""
    return min(0, size - crop_size), max(0, size - crop_size)


def _mined_pixel(rng: np.random.Generator, label: np.ndarray, table: np.ndarray | None,
                 rescaled: tuple[int, int], mine_classes):
    """(row, col) of a uniformly drawn pixel of a uniformly drawn mine class present in the
    rescaled label, or None when none is present. The draws are those of ``np.nonzero(rescaled ==
    class)`` (row-major) on the rescaled label, which is never built: it repeats some record rows
    and columns and drops others, so each kept record pixel stands for (its row's repeats) x (its
    column's repeats) rescaled pixels at known places."""
    h, w = label.shape
    row_src, row_first, row_rep = np.unique(nearest_indices(rescaled[0], h), return_index=True, return_counts=True)
    col_src, col_first, col_rep = np.unique(nearest_indices(rescaled[1], w), return_index=True, return_counts=True)
    classes = np.arange(256) if table is None else table.astype(np.int64)
    wanted = [int(c) for c in mine_classes if c != IGNORE_INDEX]
    is_mine = np.isin(classes, wanted).astype(np.uint8)
    mask = cv2.LUT(label, is_mine) if label.dtype == np.uint8 else is_mine[label]
    points = cv2.findNonZero(mask)                                 # (x, y) in row-major order
    if points is None:
        return None
    xs, ys = points.reshape(-1, 2).astype(np.int64).T
    row_kept, col_kept = np.zeros(h, bool), np.zeros(w, bool)
    row_kept[row_src], col_kept[col_src] = True, True
    keep = row_kept[ys] & col_kept[xs]                             # record pixels the rescale keeps
    ys, xs = ys[keep], xs[keep]
    found = classes[label[ys, xs]]
    present = [c for c in wanted if (found == c).any()]
    if not present:
        return None
    mined = present[rng.integers(len(present))]
    a = np.searchsorted(row_src, ys[found == mined])               # kept row / column of each pixel
    b = np.searchsorted(col_src, xs[found == mined])
    per_pixel = col_rep[b]                                         # rescaled columns each stands for
    rows, starts = np.unique(a, return_index=True)
    ends = np.append(starts[1:], len(a))
    per_row = np.add.reduceat(per_pixel, starts)                   # class pixels in one rescaled row
    per_block = per_row * row_rep[rows]                            # ... times the row's repeats
    j = int(rng.integers(int(per_block.sum())))                    # index into the rescaled nonzero list
    r = int(np.searchsorted(np.cumsum(per_block), j, side="right"))
    repeat, q = divmod(j - int(per_block[:r].sum()), int(per_row[r]))
    cum = np.cumsum(per_pixel[starts[r]:ends[r]])
    m = int(np.searchsorted(cum, q, side="right"))
    row = int(row_first[rows[r]]) + repeat
    col = int(col_first[b[starts[r] + m]]) + q - (int(cum[m - 1]) if m else 0)
    return row, col


def sample_geometry(rng: np.random.Generator, label: np.ndarray, *, crop_size: tuple[int, int],
                    scale_range=(0.5, 1.5), flip: bool = True, mine_classes=(), p_mine: float = 0.8,
                    label_table: np.ndarray | None = None) -> Geometry:
    """The crop of a record with (H, W) ``label`` (ids through ``label_table`` when given): scale
    ~ U(scale_range); with probability ``p_mine`` a class of ``mine_classes`` present in the
    rescaled label is chosen uniformly and the window centred on a uniformly chosen pixel of it,
    clamped so that the window stays on the image (the pixel stays inside it); otherwise a
    uniform window; flip with p=0.5."""
    lo, hi = scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    h, w = label.shape[:2]
    rescaled = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    ch, cw = crop_size
    ylo, yhi = _offset_range(rescaled[0], ch)
    xlo, xhi = _offset_range(rescaled[1], cw)
    centre = None
    if len(mine_classes) and rng.random() < p_mine:
        centre = _mined_pixel(rng, label, label_table, rescaled, mine_classes)
    if centre is not None:
        y, x = centre
        y0, x0 = int(np.clip(y - ch // 2, ylo, yhi)), int(np.clip(x - cw // 2, xlo, xhi))
    else:
        y0, x0 = int(rng.integers(ylo, yhi + 1)), int(rng.integers(xlo, xhi + 1))
    flipped = bool(flip and rng.random() < 0.5)
    return Geometry((h, w), rescaled, (y0, x0), (int(ch), int(cw)), flipped)


def _inside(off: int, n_crop: int, n_res: int) -> tuple[int, int]:
    """The rescaled rows [t0, t1) a window of ``n_crop`` at ``off`` covers inside ``n_res``."""
    return max(off, 0), min(off + n_crop, n_res)


def crop_image(image: np.ndarray, geometry: Geometry, out: np.ndarray | None = None) -> np.ndarray:
    """(ch, cw, 3) uint8 crop of an (H, W, 3) record: the record resized bilinearly to
    ``geometry.rescaled`` (pixel centres, edges clamped: ``cv2.resize`` INTER_LINEAR, as CRST's
    loader) and windowed, flipped and zero-padded, computed on the window only (one
    ``cv2.warpAffine``, the flip in its map); written into ``out`` when given (a batch slot)."""
    (h, w), (nh, nw), (y0, x0), (ch, cw) = geometry.size, geometry.rescaled, geometry.offset, geometry.crop
    if out is None:
        out = np.empty((ch, cw, 3), np.uint8)
    ty0, ty1 = _inside(y0, ch, nh)
    tx0, tx1 = _inside(x0, cw, nw)
    c0, c1 = tx0 - x0, tx1 - x0                                    # crop columns inside, before the flip
    if geometry.flipped:
        c0, c1 = cw - c1, cw - c0
    if ty1 <= ty0 or tx1 <= tx0:
        out[:] = 0
        return out
    if (nh, nw) == (h, w):
        window = image[ty0:ty1, tx0:tx1]
        out[ty0 - y0:ty1 - y0, c0:c1] = window[:, ::-1] if geometry.flipped else window
    else:
        # crop pixel (i, j) shows rescaled pixel (y0 + i, x0 + j) (mirrored: x0 + cw - 1 - j), which
        # samples the record at (t + ½)·(record size / rescaled size) − ½
        sy, sx = h / nh, w / nw
        xs = [-sx, (x0 + cw - 0.5) * sx - 0.5] if geometry.flipped else [sx, (x0 + 0.5) * sx - 0.5]
        to_record = np.array([[xs[0], 0.0, xs[1]], [0.0, sy, (y0 + 0.5) * sy - 0.5]])
        got = cv2.warpAffine(image, to_record, (cw, ch), dst=out, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)
        if got is not out:  # OpenCV writes into ``dst`` only when it is contiguous and of the right shape
            out[:] = got
    out[:ty0 - y0], out[ty1 - y0:] = 0, 0                          # padding
    out[:, :c0], out[:, c1:] = 0, 0
    return out


def _gather(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return values[np.maximum(rows, 0)][:, np.maximum(cols, 0)]


def crop_label(label: np.ndarray, geometry: Geometry, label_table: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """(ch, cw) uint8 label crop: the record's (H, W) ids at ``Geometry.source_pixels``, through
    ``label_table`` (256,) when given, 255 on padding; written into ``out`` when given."""
    rows, cols = geometry.source_pixels()
    ids = _gather(label, rows, cols)
    if out is None:
        out = np.empty(geometry.crop, np.uint8)
    if label_table is None:
        out[:] = ids
    else:
        np.take(label_table, ids, out=out)
    out[rows < 0] = IGNORE_INDEX
    out[:, cols < 0] = IGNORE_INDEX
    return out


def augment(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, *,
            crop_size: tuple[int, int], scale_range=(0.5, 1.5), flip: bool = True,
            mine_classes=(), p_mine: float = 0.8, label_table: np.ndarray | None = None,
            return_geometry: bool = False, out: tuple[np.ndarray, np.ndarray] | None = None):
    """Training transform of one record: rescale by U(scale_range), crop ``crop_size``
    (rare-class mining, padding), flip with p=0.5 (:func:`sample_geometry`). ``label`` holds
    trainIds, or raw ids with their (256,) ``label_table``. Returns the uint8 image and label
    crops (and the :class:`Geometry`, to carry soft labels through the same transform), written
    into ``out`` = (image slot, label slot) when given."""
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} differ in size")
    geometry = sample_geometry(rng, label, crop_size=crop_size, scale_range=scale_range, flip=flip,
                                  mine_classes=mine_classes, p_mine=p_mine, label_table=label_table)
    image_out, label_out = (None, None) if out is None else out
    image, label = crop_image(image, geometry, image_out), crop_label(label, geometry, label_table, label_out)
    if return_geometry:
        return image, label, geometry
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
    out = _gather(values, rows, cols)
    out[rows < 0] = fill
    out[:, cols < 0] = fill
    return out


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
