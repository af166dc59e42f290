"""How CRST's LR* soft pseudo-labels are kept between labelling and retraining.

CRST wrote each image's soft labels as a float32 (C, H, W) ``.npy`` (152 MiB at 1024x2048) and
resized them bilinearly when cropping. Here every LR* minimiser keeps the order of p/λ, so a soft
label splits as ``ŷ = m·e_c + (1 − m)·ρ``: the hard label c (CBST's argmax), its mass m, and a
residual distribution ρ over the other classes. A round stores, per target image,

* ``c`` as the usual uint8 trainId PNG (255 = ignored), at full resolution;
* ``m`` at full resolution as uint8 ``round(255·m)`` (0 where ignored);
* ρ as **cells**: the residual mass ``ŷ − m·e_c`` summed over the kept pixels of each
  ``stride x stride`` block, normalised to a distribution and quantised to uint8 - 19 bytes a
  cell (0.6 MB raw at 1024x2048, stride 8). The residual is the small part of ŷ (a few % for
  a confident model), so only it is kept coarse; the label and its weight stay per pixel.

Retraining rebuilds a crop's ŷ at exactly the record pixels the hard crop came from: c and m by
the same nearest-neighbour transform, ρ by bilinear interpolation between kept cell centres
(``augment.warp_cells``) with class c removed and renormalised (all of ``1 − m`` goes to c when
no residual is left). Rows are shipped as uint8 and renormalised by the train step.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SCALE = 255


def pool_cells(soft, stride: int):
    """(B, H, W, K) rows (all-zero = not counted) -> (B, ⌈H/s⌉, ⌈W/s⌉, K) sums over each
    ``stride x stride`` block (H, W zero-padded). Jittable."""
    b, h, w, k = soft.shape
    s = int(stride)
    hc, wc = -(-h // s), -(-w // s)
    soft = jnp.pad(soft.astype(jnp.float32), ((0, 0), (0, hc * s - h), (0, wc * s - w), (0, 0)))
    return soft.reshape(b, hc, s, wc, s, k).sum(axis=(2, 4))


def encode(soft, stride: int):
    """Soft labels (B, H, W, K) (all-zero rows = ignored) -> (hard uint8 (B, H, W) with 255 =
    ignored, top mass uint8 (B, H, W), residual cells uint8 (B, ⌈H/s⌉, ⌈W/s⌉, K)). Jittable."""
    soft = soft.astype(jnp.float32)
    k = soft.shape[-1]
    kept = jnp.sum(soft, axis=-1) > 0
    hard = jnp.argmax(soft, axis=-1)
    top = jnp.max(soft, axis=-1)
    residual = soft * (1.0 - (jnp.arange(k) == hard[..., None]))
    cells = pool_cells(residual, stride)
    return (jnp.where(kept, hard, 255).astype(jnp.uint8), quantize(jnp.where(kept, top, 0.0)),
            quantize(normalize_rows(cells)))


def quantize(x):
    """Values in [0, 1] -> uint8 ``round(255·x)`` (halves up); works on jnp and numpy. A
    distribution over K ≤ 255 classes never quantises to all zeros (its largest entry is ≥ 1/K)."""
    if isinstance(x, np.ndarray):  # host hot path (every target crop of an LR* round): 3 passes
        y = np.multiply(x, SCALE, dtype=np.float32)
        np.clip(y, 0.0, SCALE, out=y)
        y += 0.5
        return y.astype(np.uint8)
    return jnp.floor(jnp.clip(x, 0.0, 1.0) * SCALE + 0.5).astype(jnp.uint8)


def dequantize(cells: np.ndarray) -> np.ndarray:
    """uint8 cells -> float32 rows renormalised to sum 1 (all-zero rows stay zero)."""
    x = np.asarray(cells, np.float32)
    total = x.sum(axis=-1, keepdims=True)
    return np.divide(x, total, out=np.zeros_like(x), where=total > 0)


def normalize_rows(x):
    """jnp: rows divided by their sum (uint8 or float input), all-zero rows stay zero."""
    x = x.astype(jnp.float32)
    total = jnp.sum(x, axis=-1, keepdims=True)
    return jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), 0.0)


def compose(hard: np.ndarray, top: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Host side: ŷ = m·e_c + (1 − m)·ρ per pixel, float32 (…, K), from the hard labels c (uint8,
    255 = ignored), top masses m (uint8) and residual weights (float (…, K), e.g. from
    ``augment.warp_cells``; any positive per-pixel scale, as they are renormalised here).
    ρ drops class c and is renormalised; without residual the whole mass goes to c. Ignored
    pixels are all-zero rows. ``residual`` is overwritten (it is the output buffer)."""
    out = np.asarray(residual, np.float32)
    kept = hard != 255
    c = np.where(kept, hard, 0).astype(np.intp)[..., None]
    np.put_along_axis(out, c, 0.0, axis=-1)
    total = out.sum(axis=-1, keepdims=True)
    m = top.astype(np.float32)[..., None] / SCALE
    has = total > 0
    out *= np.where(has & kept[..., None], (1.0 - m) / np.where(has, total, 1.0), 0.0)
    np.put_along_axis(out, c, np.where(kept[..., None], np.where(has, m, 1.0), 0.0), axis=-1)
    return out


__all__ = ["SCALE", "pool_cells", "encode", "quantize", "dequantize", "normalize_rows", "compose"]
