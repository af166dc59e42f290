"""Closed-form pseudo-label selection of CBST (Zou et al., ECCV 2018), exact and streaming.

Self-training picks, for every target pixel, the label minimising
``-sum_c y_c log(q_c p_c) - k_c y_c`` over ``y in {one-hot} U {0}``. The minimiser is
``argmax_c q_c p_c / lambda_c`` when that ratio is at least 1, else "ignore", with
``lambda_c = exp(-k_c)``. The class-balanced thresholds ``lambda_c`` are set from the
portion ``p`` of the most confident pixels of each class (CBST), of all pixels pooled
(``policy="st"``), or with a spatial prior ``q`` multiplied into the scores (CBST-SP).

Threshold (reference semantics): for class ``c``, sort descending the confidences
``max_c' (q p)_c'`` of the pixels whose argmax is ``c``; ``lambda_c`` is the element at
index ``floor(N_c p) - 1``; ``lambda_c = 1`` when ``floor(N_c p) == 0`` (also for empty
classes). ``floor(N_c p)`` is computed on the host in float64, as the reference does
(``int(np.floor(n * p))``), from exact integer counts; device code never multiplies by
``p`` (float32 rounding of ``N_c p`` can move the rank by one).

Exact thresholds without sorting or storing the confidences (radix select): non-negative
float32 values order like their uint32 bit patterns, and a sign fold makes that hold for
negative values too (a prior with small negative entries). Pass 1 counts, per class, the
high 16 bits of each confidence's key (``C x 65536`` counts); from those counts the host
picks the bin holding rank ``floor(N_c p)`` and the rank inside it. Pass 2 counts the low
16 bits of the confidences inside that bin, which pins down the exact float32 value. The
result is bit-identical to the sort definition, and both passes are sums over pixels, so
they stream over a dataset batch by batch and merge across devices and hosts by addition.

Counts: each jitted histogram is int32 (a batch may hold at most 2**30 pixels).
Running sums over a dataset are kept on device as an int32 pair
``count = hi * 2**30 + lo`` (:class:`HistogramAccumulator`, exact to 2**61 pixels, no
host sync per batch) and turned into int64 on the host once per pass.

Reference details not reproduced: the per-class lists of the reference start with a
spurious 0.0 (no effect in practice); the MXNet code also maps a computed threshold of
exactly 0.0 (possible only with a prior) to 1.0, the CRST code keeps it. NaN confidences
are not supported.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cbst_jax import sharding as shd
from cbst_jax.labels import IGNORE_INDEX

POLICIES = ("cbst", "st")
KEY_HALF_BITS = 16
NUM_BINS = 1 << KEY_HALF_BITS  # bins per class in each pass
_LO_BITS = 30  # accumulator split: count = hi * 2**30 + lo
MAX_BATCH_PIXELS = 1 << _LO_BITS


# ------------------------------------------------------------------------ per-pixel scores


def confidence(probs, prior=None):
    """Confidence ``max_c (q p)_c`` (float32) and prediction ``argmax_c (q p)_c`` (int32).

    ``probs`` has the class axis last; ``prior`` (e.g. (H, W, C)) broadcasts against it and
    is multiplied in float32 (CBST-SP). Ties go to the lowest class, as ``np.argmax``.
    """
    scores = _scores(probs, prior)
    return jnp.max(scores, axis=-1), jnp.argmax(scores, axis=-1).astype(jnp.int32)


def _scores(probs, prior):
    scores = jnp.asarray(probs, jnp.float32)
    if prior is not None:
        scores = jnp.asarray(prior, jnp.float32) * scores
    return scores


def _sort_key(conf):
    """float32 -> uint32 with the same order (sign fold; -0.0 counted as +0.0)."""
    conf = jnp.where(conf == 0, jnp.float32(0), conf)
    bits = jax.lax.bitcast_convert_type(conf, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _key_to_float(key) -> np.ndarray:
    """Inverse of :func:`_sort_key`, on the host."""
    key = np.asarray(key, np.uint32)
    bits = np.where(key >> 31 == 1, key & np.uint32(0x7FFFFFFF), ~key).astype(np.uint32)
    return bits.view(np.float32)


def subsample_mask(pred, num_classes: int, subsample: int = 1, valid=None):
    """Pixels kept in the reference's ``conf_c[0::subsample]`` lists.

    The reference builds, per image, the row-major list of each class's confidences and
    keeps every ``subsample``-th element. Images are the leading axis when ``pred`` has
    rank >= 3 ((B, H, W)); otherwise the whole array is one list. Pixels outside ``valid``
    are not in any list. Returns ``valid`` unchanged for ``subsample == 1``.
    """
    if subsample == 1:
        return valid
    if subsample < 1:
        raise ValueError(f"subsample must be >= 1, got {subsample}")
    lists = pred.reshape((pred.shape[0] if pred.ndim >= 3 else 1), -1)
    member = lists[..., None] == jnp.arange(num_classes, dtype=lists.dtype)
    if valid is not None:
        member &= jnp.asarray(valid, bool).reshape(lists.shape)[..., None]
    position = jnp.cumsum(member, axis=1, dtype=jnp.int32) - 1  # index inside its class list
    position = jnp.take_along_axis(position, jnp.clip(lists, 0, num_classes - 1)[..., None], -1)[..., 0]
    keep = member.any(-1) & (position % subsample == 0)
    return keep.reshape(pred.shape)


# ------------------------------------------------------------------------------ histograms


def _count(index_fn, pixels, size: int):
    """``bincount(index_fn(*pixels), length=size)`` in int32; indices >= size are dropped.

    ``pixels`` are per-pixel arrays of one shape (None allowed). On CPU the pixels are cut
    into a few slices, each computing its indices and scattering into its own histogram:
    XLA's CPU scatter is a serial loop, and independent slices run concurrently and keep
    the index temporaries small. Accelerators take one scatter.
    """
    flat = [None if x is None else jnp.asarray(x).reshape(-1) for x in pixels]
    n = next(x for x in flat if x is not None).size
    splits = 4 if jax.default_backend() == "cpu" and n >= (1 << 20) else 1
    bounds = np.linspace(0, n, splits + 1).astype(int)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        index = index_fn(*(None if x is None else x[a:b] for x in flat))
        parts.append(jnp.zeros(size, jnp.int32).at[index].add(1, mode="drop"))
    return functools.reduce(jnp.add, parts)


def _check_batch(n: int):
    if n > MAX_BATCH_PIXELS:
        raise ValueError(f"a batch holds {n} pixels; histograms need at most 2**30 per batch")


def coarse_histogram_from_confidence(conf, pred, num_classes: int, valid=None):
    """Pass 1: per-class counts of the high 16 key bits of ``conf``, (C, 65536) int32.

    ``pred`` gives each pixel's class; pixels outside ``valid`` (padding) are not counted.
    Row sums are the per-class predicted-pixel counts.
    """
    _check_batch(np.size(conf))
    size = num_classes * NUM_BINS

    def index(conf, pred, valid):
        key = _sort_key(conf.astype(jnp.float32))
        index = pred.astype(jnp.uint32) * NUM_BINS + (key >> KEY_HALF_BITS)
        return index if valid is None else jnp.where(valid, index, jnp.uint32(size))

    return _count(index, (conf, pred, valid), size).reshape(num_classes, NUM_BINS)


def fine_histogram_from_confidence(conf, pred, bins, valid=None):
    """Pass 2: per-class counts of the low 16 key bits among pixels whose high bits equal
    ``bins[class]`` (``RefinementTarget.bins``; -1 counts nothing), (C, 65536) int32."""
    _check_batch(np.size(conf))
    bins = jnp.asarray(bins, jnp.int32)
    num_classes = bins.shape[0]
    size = num_classes * NUM_BINS

    def index(conf, pred, valid):
        pred = pred.astype(jnp.int32)
        key = _sort_key(conf.astype(jnp.float32))
        hit = (key >> KEY_HALF_BITS).astype(jnp.int32) == bins[jnp.clip(pred, 0, num_classes - 1)]
        hit &= (pred >= 0) & (pred < num_classes)
        if valid is not None:
            hit &= valid.astype(bool)
        index = pred.astype(jnp.uint32) * NUM_BINS + (key & jnp.uint32(NUM_BINS - 1))
        return jnp.where(hit, index, jnp.uint32(size))

    return _count(index, (conf, pred, valid), size).reshape(num_classes, NUM_BINS)


def coarse_histogram(probs, prior=None, valid=None, subsample: int = 1):
    """Pass 1 from class probabilities (..., C): see :func:`coarse_histogram_from_confidence`.

    For ``policy="st"`` use the same counts; :func:`plan_refinement` pools the classes.
    """
    conf, pred = confidence(probs, prior)
    valid = subsample_mask(pred, probs.shape[-1], subsample, valid)
    return coarse_histogram_from_confidence(conf, pred, probs.shape[-1], valid)


def fine_histogram(probs, bins, prior=None, valid=None, subsample: int = 1):
    """Pass 2 from class probabilities (..., C); ``bins`` is ``RefinementTarget.bins``."""
    conf, pred = confidence(probs, prior)
    valid = subsample_mask(pred, probs.shape[-1], subsample, valid)
    return fine_histogram_from_confidence(conf, pred, bins, valid)


# ----------------------------------------------------------------------- host-side ranking


class RefinementTarget(NamedTuple):
    """Where each threshold lies after pass 1.

    bins: (C,) int32, the high-16-bit bin holding rank ``floor(N_c p)``; -1 where
      ``lambda_c = 1`` (no rank). Pass this array to the fine histogram.
    ranks: (C,) int64, the 1-based rank, from the top, inside that bin.
    pooled: ``policy="st"``: one rank over all classes (bins and ranks repeated per class).
    """

    bins: np.ndarray
    ranks: np.ndarray
    pooled: bool


def selection_rank(count: int, portion: float) -> int:
    """``floor(N p)`` exactly as the reference computes it (float64 product on the host)."""
    return int(np.floor(int(count) * float(portion)))


def class_pixel_counts(coarse_counts) -> np.ndarray:
    """Per-class predicted-pixel counts (int64), the row sums of pass 1 (rare-class mining)."""
    return np.asarray(coarse_counts, np.int64).sum(-1)


def _descending_select(rows: np.ndarray, ranks: np.ndarray):
    """Per row, the bin holding the ``rank``-th largest element (1-based) and the rank in it."""
    from_top = np.cumsum(rows[:, ::-1], axis=1)  # from_top[r, j] = #elements in the top j+1 bins
    j = np.array([np.searchsorted(row, k) for row, k in zip(from_top, ranks)])
    before = np.where(j > 0, from_top[np.arange(len(rows)), np.maximum(j - 1, 0)], 0)
    return rows.shape[1] - 1 - j, ranks - before


def plan_refinement(coarse_counts, portion: float, policy: str = "cbst") -> RefinementTarget:
    """Host step between the passes: the bin and in-bin rank of each class's threshold."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not 0.0 < portion <= 1.0:
        raise ValueError(f"portion must lie in (0, 1], got {portion}")
    counts = np.asarray(coarse_counts, np.int64)
    num_classes = counts.shape[0]
    rows = counts.sum(0, keepdims=True) if policy == "st" else counts
    ranks = np.array([selection_rank(n, portion) for n in rows.sum(1)], np.int64)
    active = ranks > 0
    bins, in_bin = _descending_select(rows, np.maximum(ranks, 1))
    bins = np.where(active, bins, -1).astype(np.int32)
    in_bin = np.where(active, in_bin, 0).astype(np.int64)
    if policy == "st":
        bins, in_bin = np.repeat(bins, num_classes), np.repeat(in_bin, num_classes)
    return RefinementTarget(bins, in_bin, policy == "st")


def finish_thresholds(fine_counts, target: RefinementTarget) -> np.ndarray:
    """Host step after pass 2: the exact thresholds ``lambda`` (C,) float32."""
    fine = np.asarray(fine_counts, np.int64)
    num_classes = fine.shape[0]
    rows, bins, ranks = fine, target.bins, target.ranks
    if target.pooled:
        rows, bins, ranks = fine.sum(0, keepdims=True), bins[:1], ranks[:1]
    active = bins >= 0
    lo, _ = _descending_select(rows, np.maximum(ranks, 1))
    key = (np.maximum(bins, 0).astype(np.uint32) << KEY_HALF_BITS) | lo.astype(np.uint32)
    lam = np.where(active, _key_to_float(key), np.float32(1.0)).astype(np.float32)
    return np.broadcast_to(lam, (num_classes,)).copy()


# ------------------------------------------------------------------------- exact, in memory

_coarse = jax.jit(coarse_histogram, static_argnames="subsample")
_fine = jax.jit(fine_histogram, static_argnames="subsample")
_coarse_conf = jax.jit(coarse_histogram_from_confidence, static_argnames="num_classes")
_fine_conf = jax.jit(fine_histogram_from_confidence)


def class_thresholds(probs, portion: float, policy: str = "cbst", prior=None, valid=None,
                     subsample: int = 1) -> np.ndarray:
    """Thresholds ``lambda`` (C,) float32 of CBST / ST / CBST-SP on an in-memory array.

    Two jitted histogram passes with a host step between them (the rank ``floor(N_c p)`` is
    taken in float64 there), so the function itself is not traced; it works on sharded
    arrays as well. Equals :func:`streaming_class_thresholds` over any batching.
    """
    target = plan_refinement(_coarse(probs, prior, valid, subsample=subsample), portion, policy)
    return finish_thresholds(_fine(probs, target.bins, prior, valid, subsample=subsample), target)


def thresholds_from_confidence(conf, pred, num_classes: int, portion: float,
                               policy: str = "cbst", valid=None, subsample: int = 1) -> np.ndarray:
    """:func:`class_thresholds` from precomputed confidence and prediction maps."""
    conf, pred = jnp.asarray(conf), jnp.asarray(pred)  # one host->device copy for both passes
    valid = subsample_mask(pred, num_classes, subsample, valid)
    coarse = _coarse_conf(conf, pred, num_classes, valid)
    target = plan_refinement(coarse, portion, policy)
    return finish_thresholds(_fine_conf(conf, pred, target.bins, valid), target)


# ---------------------------------------------------------------------------- exact ratios

_SIGN, _EXP_MASK, _MANT_MASK, _HIDDEN = (np.uint32(x) for x in (0x80000000, 0xFF, 0x7FFFFF, 0x800000))
_INF = np.uint32(0x7F800000)


def _unpack(bits):
    """|x| of float32 bit patterns as (24-bit significand S with its leading 1 at bit 23,
    biased exponent E) with |x| = S * 2**(E - 150); subnormals are normalised (E <= 0)."""
    exp = (bits >> 23) & _EXP_MASK
    mant = bits & _MANT_MASK
    shift = jnp.where(exp == 0, jax.lax.clz(mant) - 8, 0).astype(jnp.uint32)
    sig = jnp.where(exp == 0, mant << shift, mant | _HIDDEN)
    return sig, jnp.where(exp == 0, 1 - shift.astype(jnp.int32), exp.astype(jnp.int32))


def correctly_rounded_divide(a, b):
    """``a / b`` in float32, correctly rounded (ties to even) as IEEE division and numpy give,
    on any backend; jittable, broadcasting.

    XLA does not promise correctly rounded division: it rewrites a division by a broadcast
    divisor as a product with the reciprocal (two roundings; on CPU 19 % of random quotients
    differ from numpy's), and accelerators may use approximate division. Here the backend's
    quotient of the two significands (in [1, 2), so it cannot over- or underflow) only gives an
    estimate ``Q`` of the 24-bit integer quotient ``floor(A * 2**k / B)`` of the significands
    ``A``, ``B``; the exact remainder ``R = A * 2**k - Q * B`` is computed in wrapping uint32
    arithmetic (``|R|`` < 2**31, so the low 32 bits are all of it), a float estimate of
    ``R / B`` and one integer step each way move ``Q`` until ``0 <= R < B``, and ``2R`` against
    ``B`` rounds to nearest even. Only integer operations decide the result, so neither
    flush-to-zero, fused multiply-adds nor the division's accuracy (anything better than 2**-17
    relative) can change it. Subnormal operands and results are exact too (gradual underflow);
    zeros, infinities and NaNs follow IEEE (NaN results are the positive quiet NaN).
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    # per operand on its own shape (a per-class threshold is unpacked once per class)
    ua, ub = (jax.lax.bitcast_convert_type(x, jnp.uint32) for x in (a, b))
    (sa, ea), (sb, eb) = _unpack(ua), _unpack(ub)
    unit = lambda sig: jax.lax.bitcast_convert_type(np.uint32(127 << 23) | (sig & _MANT_MASK), jnp.float32)
    unit_b, sb_i = unit(sb), sb.astype(jnp.int32)
    inv_b = 1 / sb.astype(jnp.float32)
    sign = (ua ^ ub) & _SIGN
    small = sa < sb  # quotient of the significands in (1/2, 1): one more quotient bit
    k = jnp.where(small, 24, 23).astype(jnp.uint32)
    estimate = (unit(sa) / unit_b) * jnp.where(small, np.float32(2.0 ** 24), np.float32(2.0 ** 23))
    q = estimate.astype(jnp.int32)
    r = jax.lax.bitcast_convert_type((sa << k) - q.astype(jnp.uint32) * sb, jnp.int32)
    # |r| < 2**31; one float step brings q within 1 of floor(A * 2**k / B), one integer step each
    # way makes it exact (0 <= r < B)
    step = jnp.floor(r.astype(jnp.float32) * inv_b).astype(jnp.int32)
    q, r = q + step, r - step * sb_i
    low = r < 0
    q, r = jnp.where(low, q - 1, q), jnp.where(low, r + sb_i, r)
    high = r >= sb_i
    q, r = jnp.where(high, q + 1, q), jnp.where(high, r - sb_i, r)
    q = q.astype(jnp.uint32)
    e = ea - eb + jnp.where(small, 126, 127)  # biased exponent of q * 2**-23
    # normal result: round the 24-bit q; subnormal (e < 1): round q / 2**(1 - e) instead
    shift = jnp.clip(1 - e, 0, 31).astype(jnp.uint32)
    kept, dropped = q >> shift, q & ((jnp.uint32(1) << shift) - 1)
    half = jnp.where(shift > 0, jnp.uint32(1) << (shift - 1), 0)
    # the part beyond the kept bits against half a unit of them: dropped bits, then the remainder
    beyond = jnp.where(shift > 0, jnp.sign(dropped.astype(jnp.int32) - half.astype(jnp.int32)),
                       jnp.sign(2 * r - sb_i))
    sticky = (shift > 0) & (r > 0)
    up = (beyond > 0) | ((beyond == 0) & (sticky | ((kept & 1) == 1)))  # ties to even
    kept = kept + up.astype(jnp.uint32)
    normal = e >= 1
    carry = jnp.where(normal, kept >> 24, 0)  # rounded up to 2**24
    kept = jnp.where(carry == 1, _HIDDEN, kept)
    e = e + carry.astype(jnp.int32)
    bits = jnp.where(normal, (jnp.clip(e, 1, 255).astype(jnp.uint32) << 23) | (kept & _MANT_MASK), kept)
    out = jax.lax.bitcast_convert_type(sign | jnp.where(e >= 255, _INF, bits), jnp.float32)
    # IEEE special operands
    abs_a, abs_b = ua & ~_SIGN, ub & ~_SIGN
    a_zero, b_zero, a_inf, b_inf = abs_a == 0, abs_b == 0, abs_a == _INF, abs_b == _INF
    signed = lambda magnitude: jax.lax.bitcast_convert_type(sign | magnitude, jnp.float32)
    nan = (abs_a > _INF) | (abs_b > _INF) | (a_zero & b_zero) | (a_inf & b_inf)
    out = jnp.where(a_inf | b_zero, signed(_INF), out)
    out = jnp.where(a_zero | b_inf, signed(np.uint32(0)), out)
    return jnp.where(nan, jnp.float32(np.nan), out)


def _exact_labels(scores, lam):
    """(label, keep) from class-major scores (C, ...) and thresholds (C,): the argmax of the
    correctly rounded ratios (lowest class on ties) and ``score >= lambda`` of that class, both
    decided on order-preserving integer keys (no flush-to-zero can move them). The argmax is a
    running comparison over the classes, elementwise over pixels (measured on CPU: an argmax
    reduce over the class axis with the division fused into it ran ~10x slower)."""

    def keys(c):  # (ratio, score, threshold) of class c
        return _sort_key(correctly_rounded_divide(scores[c], lam[c])), _sort_key(scores[c]), _sort_key(lam[c])

    best, score, threshold = keys(0)
    label = jnp.zeros(best.shape, jnp.int32)
    for c in range(1, scores.shape[0]):
        ratio_c, score_c, threshold_c = keys(c)
        better = ratio_c > best  # strictly: ties keep the lower class
        best, label = jnp.where(better, ratio_c, best), jnp.where(better, c, label)
        score, threshold = jnp.where(better, score_c, score), jnp.where(better, threshold_c, threshold)
    return label, score >= threshold


_NEAR = np.float32(1 - 2.0 ** -20)  # approximate ratios closer than this share of the best: near-tie


def _top_two_labels(scores, lam):
    """The same (label, keep) at a fraction of the cost, and ``certain``: where it is proven
    equal to :func:`_exact_labels`.

    Approximate ratios ``s_c * RN(1/lambda_c)`` (two IEEE roundings: within 2**-22.9 of
    ``s_c / lambda_c`` while normal) rank the classes; only the best two get the correctly
    rounded division, and the exact comparison of those two (lowest class on ties) is the label.
    A kept pixel has ``s_c >= lambda_c`` for some c, so its best ratio is >= 1; if the third
    approximate ratio lies below ``_NEAR`` times the first (and that one is finite), no class
    outside the two can reach, or round to, the best ratio, so the label is exact there. With
    every ``lambda`` normal (checked by the caller), a score that is subnormal or whose
    approximate ratio underflows has a ratio below 1 - 2**-23, which never ties a kept pixel's
    best. Keep is ``any_c s_c >= lambda_c``, the exact rule for positive thresholds.
    """
    inv = correctly_rounded_divide(np.float32(1), lam)
    first = scores[0] * inv[0]
    minus_inf = jnp.full(first.shape, -jnp.inf, jnp.float32)
    v1, v2, v3 = first, minus_inf, minus_inf
    i1 = i2 = jnp.zeros(first.shape, jnp.int32)
    s1 = s2 = scores[0]
    t1 = t2 = jnp.broadcast_to(lam[0], first.shape)
    keep = scores[0] >= lam[0]
    for c in range(1, scores.shape[0]):
        q = scores[c] * inv[c]
        above1, above2, above3 = q > v1, q > v2, q > v3  # strictly: ties keep the lower class first
        v3 = jnp.where(above2, v2, jnp.where(above3, q, v3))
        v2, i2, s2, t2 = (jnp.where(above1, x1, jnp.where(above2, x, x2))
                          for x1, x, x2 in ((v1, q, v2), (i1, c, i2), (s1, scores[c], s2), (t1, lam[c], t2)))
        v1, i1, s1, t1 = (jnp.where(above1, x, x1) for x, x1 in ((q, v1), (c, i1), (scores[c], s1), (lam[c], t1)))
        keep = keep | (scores[c] >= lam[c])
    r1 = _sort_key(correctly_rounded_divide(s1, t1))
    r2 = _sort_key(correctly_rounded_divide(s2, t2))
    label = jnp.where((r2 > r1) | ((r2 == r1) & (i2 < i1)), i2, i1)
    certain = ~keep | (jnp.isfinite(v1) & (v3 < v1 * _NEAR))
    return label, keep, certain


@functools.partial(jax.jit, static_argnames="ignore_index")
def select_pseudo_labels(probs, thresholds, prior=None, ignore_index: int = IGNORE_INDEX):
    """Pseudo-labels (uint8, pixel shape), the minimiser of the self-training objective: the
    class ``c* = argmax_c (q p)_c / lambda_c`` where ``(q p)_c* >= lambda_c*``, else
    ``ignore_index``.

    Exact at the boundary, as the reference's numpy float32 code: the ratios are correctly
    rounded (:func:`correctly_rounded_divide`), the argmax takes the lowest class on ties (as
    ``np.argmax``), and keep/ignore compares the score with its threshold itself. For
    ``lambda > 0`` that is the reference's ``ratio >= 1`` (a correctly rounded ``s / lambda``
    reaches 1 exactly when ``s >= lambda``): a pixel scoring exactly ``lambda_c`` is kept, one
    ulp below is not. A fast path (:func:`_top_two_labels`, ~4x cheaper on CPU) decides every
    pixel it can prove; a batch with a pixel it cannot (a near-tie of three classes, thresholds
    outside [2**-126, 2**126]) is labelled by :func:`_exact_labels` instead.
    """
    scores = jnp.moveaxis(_scores(probs, prior), -1, 0)  # class-major: one pixel map per class
    lam = jnp.asarray(thresholds, jnp.float32)
    label, keep, certain = _top_two_labels(scores, lam)
    # one packed array, so that XLA computes the fast path once instead of once per consumer
    fast = jax.lax.optimization_barrier(
        jnp.where(keep, label, ignore_index).astype(jnp.int32) | (certain.astype(jnp.int32) << 8))
    normal = jnp.all((lam >= np.float32(2.0 ** -126)) & (lam <= np.float32(2.0 ** 126)))

    def exact():
        label, keep = _exact_labels(scores, lam)
        return jnp.where(keep, label, ignore_index).astype(jnp.int32)

    labels = jax.lax.cond(normal & jnp.all(fast >> 8 == 1), lambda: fast & 0xFF, exact)
    return labels.astype(jnp.uint8)


# ------------------------------------------------------------------------------- streaming


class ClassThresholds(NamedTuple):
    """The result of the two passes: ``thresholds`` λ (C,) float32 and ``class_counts`` (C,)
    int64, the pixels predicted as each class (pass 1's row sums; rare-class mining)."""

    thresholds: np.ndarray
    class_counts: np.ndarray


class HistogramAccumulator(NamedTuple):
    """Exact running counts ``hi * 2**30 + lo`` (int32 pair, (C, 65536) each) on device.

    Size ``2 * C * 65536 * 4`` bytes (9.5 MiB for 19 classes), whatever the pixel count.
    """

    hi: jax.Array
    lo: jax.Array

    @classmethod
    def zeros(cls, num_classes: int, sharding=None) -> "HistogramAccumulator":
        z = jnp.zeros((num_classes, NUM_BINS), jnp.int32, device=sharding)
        return cls(z, z.copy())

    @property
    def nbytes(self) -> int:
        return self.hi.nbytes + self.lo.nbytes

    def counts(self) -> np.ndarray:
        """Host int64 totals (fetched, one sync)."""
        hi, lo = (np.asarray(shd.to_host(x), np.int64) for x in (self.hi, self.lo))
        return (hi << _LO_BITS) + lo


def accumulate(acc: HistogramAccumulator, counts) -> HistogramAccumulator:
    """Adds one batch's int32 counts (< 2**30 each) with an exact carry; jittable."""
    lo = acc.lo + counts
    return HistogramAccumulator(acc.hi + (lo >> _LO_BITS), lo & ((1 << _LO_BITS) - 1))


def histogram_step(mesh: Mesh | None, refine: bool, subsample: int = 1):
    """The per-batch step of either pass, ``(acc, bins, probs, valid, prior) -> acc`` (traceable).

    ``bins`` is ``RefinementTarget.bins`` for the fine pass (``refine``) and ignored by the coarse
    one. With a mesh, each device counts its shard of the batch (images are the leading axis, so
    ``subsample`` keeps the per-image lists) and ``psum`` over ``'data'`` merges the counts;
    ``valid``/``prior`` may be None (an empty pytree matches any spec). The one implementation of
    the sharded histogram: :func:`streaming_class_thresholds` jits it on probability batches, and
    ``cbst_jax.predictor.Predictor`` composes it with the network.
    """

    def counts(bins, probs, valid, prior):
        if refine:
            return fine_histogram(probs, bins, prior, valid, subsample)
        return coarse_histogram(probs, prior, valid, subsample)

    if mesh is not None:
        local, data, rep = counts, P(shd.DATA_AXIS), P()
        counts = jax.shard_map(lambda *a: jax.lax.psum(local(*a), shd.DATA_AXIS),
                               mesh=mesh, in_specs=(rep, data, data, rep), out_specs=rep)

    def step(acc, bins, probs, valid, prior):
        _check_batch(int(np.prod(probs.shape[:-1])))
        return accumulate(acc, counts(bins, probs, valid, prior))

    return step


def histogram_pass(step: Callable, batches: Iterable[tuple], num_classes: int, bins=None,
                   sharding=None) -> np.ndarray:
    """Runs ``acc = step(acc, bins, *args)`` for every ``args`` in ``batches`` from a zero
    :class:`HistogramAccumulator` (placed with ``sharding``) and returns the int64 counts.
    ``bins`` None is the coarse pass (all -1 are passed)."""
    acc = HistogramAccumulator.zeros(num_classes, sharding)
    bins = np.full(num_classes, -1, np.int32) if bins is None else np.asarray(bins, np.int32)
    bins = jax.device_put(bins, sharding) if sharding is not None else jnp.asarray(bins)
    for args in batches:
        acc = step(acc, bins, *args)
    return acc.counts()


def two_pass_thresholds(run_pass: Callable, portion: float, policy: str = "cbst") -> ClassThresholds:
    """The exact thresholds from two streaming passes: ``run_pass(None)`` returns the coarse
    counts, ``run_pass(bins)`` the fine ones (int64 (C, 65536), e.g. :func:`histogram_pass`)."""
    coarse = run_pass(None)
    target = plan_refinement(coarse, portion, policy)
    return ClassThresholds(finish_thresholds(run_pass(target.bins), target), class_pixel_counts(coarse))


@functools.lru_cache(maxsize=None)
def _batch_pass(mesh: Mesh | None, refine: bool, subsample: int):
    """:func:`histogram_step` jitted (accumulator donated), one per (mesh, pass, subsample)."""
    return jax.jit(histogram_step(mesh, refine, subsample), donate_argnums=0)


def _put(x, mesh: Mesh | None, spec):
    if x is None:
        return None
    if mesh is None:
        return jnp.asarray(x)
    if isinstance(x, jax.Array):
        return jax.device_put(x, NamedSharding(mesh, spec))
    return shd.to_global(x, mesh) if spec == P(shd.DATA_AXIS) else jax.device_put(x, NamedSharding(mesh, spec))


def streaming_class_thresholds(make_batches: Callable[[], Iterable], num_classes: int,
                               portion: float, policy: str = "cbst", prior=None,
                               mesh: Mesh | None = None, subsample: int = 1,
                               return_counts: bool = False):
    """Exact thresholds ``lambda`` (C,) float32 over a whole target set, in two passes.

    ``make_batches()`` returns a fresh iterator of ``(probs, valid)`` batches: probs
    (..., C) as jax or numpy arrays (host-local numpy rows when ``mesh`` spans hosts),
    ``valid`` a boolean pixel mask or None. With ``mesh`` (a ``('data',)`` mesh) batches are
    sharded on their leading axis and counts are summed over devices. Device memory for the
    statistics is one :class:`HistogramAccumulator`, independent of the number of pixels.
    With ``return_counts``, returns a :class:`ClassThresholds` (λ and the per-class
    predicted-pixel counts).
    """
    rep = shd.replicated(mesh) if mesh is not None else None
    prior = _put(prior, mesh, P())
    data = P(shd.DATA_AXIS)

    def run_pass(bins):
        step = _batch_pass(mesh, bins is not None, subsample)
        batches = ((_put(p, mesh, data), _put(v, mesh, data), prior) for p, v in make_batches())
        return histogram_pass(step, batches, num_classes, bins, rep)

    result = two_pass_thresholds(run_pass, portion, policy)
    return result if return_counts else result.thresholds
