"""The exact class thresholds of :mod:`cbst_jax.selection`, computed inside one jitted program.

Offline, the two histogram passes run on device and the step between them on the host
(:func:`selection.plan_refinement`, :func:`selection.finish_thresholds`). An online step cannot
stop for the host, so this module does that host arithmetic on device, bit for bit:

* the rank ``floor(N_c p)`` exactly as the reference computes it, ``int(np.floor(n * p))``: the
  float64 product rounded to nearest even, then floored (:func:`selection_rank`). Without
  float64 on device, the portion travels as its two 32-bit words (:func:`portion_words`) and the
  product ``N * significand`` (31 x 53 bits) is formed and rounded in 16-bit integer limbs. This
  matters: for p = 0.3 and N = 10 the float64 product is 3.0, the exact one 2.99999...;
* the bin holding that rank and the rank inside it (:func:`descending_select`, the same
  ``searchsorted`` on counts summed from the top);
* the threshold from the two 16-bit halves of its order-preserving key (:func:`key_to_float`).

The histograms themselves are :mod:`cbst_jax.selection`'s (the caller passes them in, so that
they can be summed over devices), so on the same confidences :func:`thresholds` returns the
float32 values :func:`selection.thresholds_from_confidence` returns.

Counts are int32: the pixels of one threshold computation must number fewer than 2**31.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cbst_jax.selection import KEY_HALF_BITS

_LIMBS = 6  # 16-bit limbs of N * significand (< 2**84)
_MASK16 = np.uint32(0xFFFF)


def portion_words(portion: float) -> np.ndarray:
    """The float64 bits of ``portion`` in (0, 1] as (2,) uint32 ``[high word, low word]``."""
    p = float(portion)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"portion must lie in (0, 1], got {portion}")
    bits = int(np.float64(p).view(np.uint64))
    return np.array([bits >> 32, bits & 0xFFFFFFFF], np.uint32)


def _shift_right(limbs, k):
    """``value >> k`` of (..., L) 16-bit limbs (uint32) for int32 shifts ``k >= 0`` (...)."""
    n = limbs.shape[-1]
    padded = jnp.concatenate([limbs, jnp.zeros(limbs.shape[:-1] + (2,), jnp.uint32)], -1)
    q = jnp.minimum(k >> 4, n + 1)[..., None] + jnp.arange(n)
    q = jnp.minimum(q, n + 1)
    r = (k & 15).astype(jnp.uint32)[..., None]
    a = jnp.take_along_axis(padded, q, -1)
    b = jnp.take_along_axis(padded, jnp.minimum(q + 1, n + 1), -1)
    return ((a >> r) | (b << (16 - r))) & _MASK16


def _bit(limbs, pos):
    """Bit ``pos >= 0`` (int32, ...) of (..., L) limbs, as uint32 0/1."""
    limb = jnp.take_along_axis(limbs, jnp.minimum(pos >> 4, limbs.shape[-1] - 1)[..., None], -1)[..., 0]
    inside = (pos >> 4) < limbs.shape[-1]
    return jnp.where(inside, (limb >> (pos & 15).astype(jnp.uint32)) & 1, 0)


def _any_below(limbs, pos):
    """Whether any bit below position ``pos`` (int32, ...) is set."""
    start = 16 * jnp.arange(limbs.shape[-1], dtype=jnp.int32)
    width = jnp.clip(pos[..., None] - start, 0, 16).astype(jnp.uint32)
    masks = jnp.where(width >= 16, _MASK16, (jnp.uint32(1) << width) - 1)
    return jnp.any((limbs & masks) != 0, axis=-1)


def selection_rank(counts, words):
    """``floor(fl64(N * p))`` (int32) for int32 counts ``N >= 0`` (any shape) and a portion's
    :func:`portion_words`: the rank ``selection.selection_rank`` computes on the host."""
    n = jnp.asarray(counts, jnp.int32).astype(jnp.uint32)
    hi, lo = jnp.asarray(words, jnp.uint32)[0], jnp.asarray(words, jnp.uint32)[1]
    exponent = ((hi >> 20) & 0x7FF).astype(jnp.int32)  # p = m * 2**(exponent - 1075), 2**52 <= m < 2**53
    top = (hi & 0xFFFFF) | 0x100000
    m = (lo & _MASK16, lo >> 16, top & _MASK16, top >> 16)
    nl = (n & _MASK16, n >> 16)
    cols = [jnp.zeros_like(n) for _ in range(_LIMBS + 1)]
    for i, ni in enumerate(nl):
        for j, mj in enumerate(m):
            prod = ni * mj  # < 2**32
            cols[i + j] = cols[i + j] + (prod & _MASK16)
            cols[i + j + 1] = cols[i + j + 1] + (prod >> 16)
    limbs, carry = [], jnp.zeros_like(n)
    for k in range(_LIMBS):
        v = cols[k] + carry
        limbs.append(v & _MASK16)
        carry = v >> 16
    product = jnp.stack(limbs, -1)  # N * m, exact
    limb_bits = 32 - jax.lax.clz(product).astype(jnp.int32)
    length = jnp.max(jnp.where(product != 0, 16 * jnp.arange(_LIMBS, dtype=jnp.int32) + limb_bits, 0), -1)
    drop = jnp.maximum(length - 53, 0)  # bits below float64's 53-bit significand
    kept = _shift_right(product, drop)
    guard = jnp.where(drop > 0, _bit(product, jnp.maximum(drop - 1, 0)), 0)
    sticky = (drop > 1) & _any_below(product, drop - 1)
    up = (guard == 1) & (sticky | ((kept[..., 0] & 1) == 1))  # round to nearest, ties to even
    kept = kept.at[..., 0].add(up.astype(jnp.uint32))
    for k in range(_LIMBS - 1):  # carry of the rounding increment
        kept = kept.at[..., k + 1].add(kept[..., k] >> 16).at[..., k].set(kept[..., k] & _MASK16)
    scale = (1075 - exponent) - drop  # fl64(N p) = kept * 2**-scale, scale >= 21 for p <= 1
    rank = _shift_right(kept, jnp.broadcast_to(scale, drop.shape))
    return (rank[..., 0] | (rank[..., 1] << 16)).astype(jnp.int32)


def descending_select(rows, ranks):
    """Per row of (C, K) int32 counts, the bin holding the ``rank``-th largest element (1-based)
    and the rank inside that bin, as ``selection._descending_select`` finds them."""
    from_top = jnp.cumsum(rows[:, ::-1], axis=1, dtype=jnp.int32)
    j = jnp.sum(from_top < ranks[:, None], axis=1, dtype=jnp.int32)  # searchsorted, side="left"
    before = jnp.where(j > 0, jnp.take_along_axis(from_top, jnp.maximum(j - 1, 0)[:, None], 1)[:, 0], 0)
    return rows.shape[1] - 1 - j, ranks - before


def key_to_float(key):
    """Inverse of the histograms' order-preserving float32 -> uint32 key."""
    key = jnp.asarray(key, jnp.uint32)
    bits = jnp.where(key >> 31 == 1, key & np.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def thresholds(coarse: Callable[[], jax.Array], fine: Callable[[jax.Array], jax.Array], words):
    """Exact per-class thresholds (C,) float32 (policy "cbst") from the two passes:
    ``coarse()`` returns the (C, 65536) int32 pass-1 counts, ``fine(bins)`` the pass-2 counts
    for (C,) int32 bins (-1: none), e.g. ``selection.coarse_histogram_from_confidence`` and
    ``selection.fine_histogram_from_confidence`` summed over devices. Also returns the
    per-class pixel counts (C,) int32."""
    counts = coarse()
    per_class = jnp.sum(counts, axis=1, dtype=jnp.int32)
    ranks = selection_rank(per_class, words)
    active = ranks > 0
    bins, in_bin = descending_select(counts, jnp.maximum(ranks, 1))
    bins = jnp.where(active, bins, -1).astype(jnp.int32)
    low, _ = descending_select(fine(bins), jnp.where(active, in_bin, 1))
    key = (jnp.maximum(bins, 0).astype(jnp.uint32) << KEY_HALF_BITS) | low.astype(jnp.uint32)
    return jnp.where(active, key_to_float(key), np.float32(1.0)), per_class


__all__ = ["portion_words", "selection_rank", "descending_select", "key_to_float", "thresholds"]
