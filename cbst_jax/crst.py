"""CRST label-regularised (LR*) soft pseudo-labels, in closed form.

For one target pixel with class probabilities ``p`` (K,) and class-balanced thresholds
``λ = exp(−k)`` (K,) (CBST's ``cls_thresh``; 1.0 for classes that were never selected), write
``a_k = log(p_k / λ_k)``. CRST's pseudo-label step solves

    min_{ŷ ∈ Δ^{K−1} ∪ {0}}  f(ŷ) = −Σ_k ŷ_k a_k + α r(ŷ),

where ŷ = 0 is the "ignore this pixel" option with f(0) = 0 (every regulariser is taken as
r(0) = 0). So a pixel is kept exactly when the best simplex point has a negative objective. With
α → 0 the simplex minimiser is the one-hot at ``argmax_k a_k`` with f = −max_k a_k, i.e. CBST's
hard label, kept iff ``max_k p_k/λ_k > 1``.

With ``keep="cbst"`` the kept pixels are instead exactly CBST's and the regulariser only shapes
the label (see :func:`soft_pseudo_labels` for why LRL2 and LRKLD need this). Every minimiser
keeps the order of ``a``, so the argmax of ŷ is CBST's hard label either way.

The minimisers (proofs in each function's docstring) are computed per pixel on any leading
shape (class axis last), in float32, and are jittable: LRENT is a tempered softmax, LRL2 a
sort-based Euclidean projection onto the simplex, LRKLD a one-dimensional root (bisection).
Ignored pixels come back as all-zero rows; :func:`hard_labels` turns soft labels into the
uint8/255 maps the CE and the class statistics use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cbst_jax import selection
from cbst_jax.labels import IGNORE_INDEX

KINDS = ("lrent", "lrl2", "lrkld")
KEEP_RULES = ("objective", "cbst")


def log_ratio(probs, thresholds):
    """``a = log(p/λ)`` in float32; probabilities are clipped at the smallest normal float so a
    zero probability gives a very negative but finite score."""
    p = probs.astype(jnp.float32)
    lam = jnp.asarray(thresholds, jnp.float32)
    return jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny)) - jnp.log(lam)


def objective(soft, probs, thresholds, alpha, kind: str):
    """``f(ŷ) = −Σ ŷ_k a_k + α r(ŷ)`` per pixel, with ``f(0) = 0`` for all-zero rows."""
    a = log_ratio(probs, thresholds)
    y = soft.astype(jnp.float32)
    lin = -jnp.sum(y * a, axis=-1)
    if kind == "lrent":
        r = jnp.sum(jnp.where(y > 0, y * jnp.log(jnp.where(y > 0, y, 1.0)), 0.0), axis=-1)
    elif kind == "lrl2":
        r = jnp.sum(y * y, axis=-1)
    elif kind == "lrkld":
        r = -jnp.mean(jnp.log(y), axis=-1)
    else:
        raise ValueError(f"unknown label regulariser {kind!r}; expected one of {KINDS}")
    empty = jnp.sum(y, axis=-1) == 0
    return jnp.where(empty, 0.0, lin + alpha * r)


def lrent_soft_labels(probs, thresholds, alpha, *, keep_all: bool = False):
    """LRENT, r(ŷ) = Σ_k ŷ_k log ŷ_k (the only LR mode in the CRST code).

    Stationarity of ``−Σ ŷ_k a_k + α Σ ŷ_k log ŷ_k + μ(Σ ŷ_k − 1)`` gives
    ``ŷ_k ∝ exp(a_k/α) = (p_k/λ_k)^{1/α}`` (interior, the entropy keeps ŷ > 0), with optimal
    value ``−α log Σ_k exp(a_k/α)``. As the code (``label_selection``) does, the pixel is ignored
    where ``Σ_k ŷ_k (−a_k + α log ŷ_k) ≥ 0``. Computed in log space, so small α is stable.
    """
    a = log_ratio(probs, thresholds)
    log_y = jax.nn.log_softmax(a / alpha, axis=-1)
    y = jnp.exp(log_y)
    score = jnp.sum(y * (alpha * log_y - a), axis=-1)
    return y if keep_all else jnp.where((score < 0)[..., None], y, 0.0)


def project_to_simplex(v):
    """Euclidean projection of each row of ``v`` (…,K) onto the probability simplex (sort-based,
    Held et al. 1974 / Duchi et al. 2008): ``max(v − θ, 0)`` with θ from the largest ρ such
    that ``u_ρ > (Σ_{j≤ρ} u_j − 1)/ρ`` for ``u`` sorted in decreasing order."""
    v = v.astype(jnp.float32)
    k = v.shape[-1]
    u = -jnp.sort(-v, axis=-1)
    css = jnp.cumsum(u, axis=-1) - 1.0
    j = jnp.arange(1, k + 1, dtype=jnp.float32)
    support = u * j > css
    rho = jnp.sum(support, axis=-1, keepdims=True)  # ≥ 1: u_1 > u_1 − 1 always
    theta = jnp.take_along_axis(css, rho.astype(jnp.int32) - 1, axis=-1) / rho
    return jnp.maximum(v - theta, 0.0)


def lrl2_soft_labels(probs, thresholds, alpha, *, keep_all: bool = False):
    """LRL2, r(ŷ) = Σ_k ŷ_k².

    ``−Σ ŷ_k a_k + α Σ ŷ_k² = α ‖ŷ − a/(2α)‖² − ‖a‖²/(4α)``, so the simplex minimiser is the
    Euclidean projection ``Π_Δ(a / 2α)`` (sparse: classes below the water level θ get 0). The
    pixel is ignored where that minimum is ≥ 0 = f(0).
    """
    a = log_ratio(probs, thresholds)
    y = project_to_simplex(a / (2.0 * alpha))
    value = jnp.sum(y * (alpha * y - a), axis=-1)
    return y if keep_all else jnp.where((value < 0)[..., None], y, 0.0)


def lrkld_soft_labels(probs, thresholds, alpha, *, iterations: int = 48, keep_all: bool = False):
    """LRKLD, r(ŷ) = −Σ_k (1/K) log ŷ_k (KL(uniform‖ŷ) up to a constant).

    The log barrier keeps the minimiser interior; stationarity of
    ``−Σ ŷ_k a_k − (α/K) Σ log ŷ_k + μ(Σ ŷ_k − 1)`` gives ``ŷ_k = (α/K) / (μ − a_k)`` with
    ``μ > max_k a_k``. ``S(μ) = Σ_k ŷ_k(μ)`` falls strictly from +∞ to 0 on (max a, ∞), so
    ``S(μ) = 1`` has one root, and it lies in ``[max a + α/K, max a + α]`` (there the largest
    term alone is 1, resp. every term is ≤ 1/K). The convex objective makes this the global
    simplex minimiser; μ is found by ``iterations`` bisection steps on that bracket (halving
    width α each time, far below float32 resolution at 48) and ŷ is renormalised. The pixel is
    ignored where ``f(ŷ) ≥ 0`` (r(0) := 0 for the ignore option).
    """
    a = log_ratio(probs, thresholds)
    c = alpha / a.shape[-1]
    d = jnp.max(a, axis=-1, keepdims=True) - a  # ≥ 0; μ = max a + t, t ∈ [α/K, α]

    def excess(t):
        return jnp.sum(c / (t + d), axis=-1, keepdims=True) - 1.0

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = excess(mid) > 0  # root lies right of mid
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo = jnp.full(d.shape[:-1] + (1,), c, jnp.float32)
    hi = jnp.full_like(lo, alpha)
    lo, hi = jax.lax.fori_loop(0, iterations, bisect, (lo, hi))
    y = c / (0.5 * (lo + hi) + d)
    y = y / jnp.sum(y, axis=-1, keepdims=True)
    value = -jnp.sum(y * a, axis=-1) - c * jnp.sum(jnp.log(y), axis=-1)
    return y if keep_all else jnp.where((value < 0)[..., None], y, 0.0)


def cbst_kept(probs, thresholds):
    """CBST's selection, ``max_k p_k/λ_k ≥ 1``: the pixels ``select_pseudo_labels`` labels."""
    return selection.select_pseudo_labels(probs, thresholds) != IGNORE_INDEX


def soft_pseudo_labels(probs, thresholds, *, kind: str, alpha, keep: str = "objective"):
    """CRST LR* soft pseudo-labels (…,K) from probabilities and class thresholds; zero rows are
    ignored pixels. ``kind`` ∈ {"lrent", "lrl2", "lrkld"}, ``alpha`` the LR weight (CRST's
    ``--lr-weight-ent`` 0.25 for LRENT).

    ``keep`` decides which pixels get a label. "objective": where the regularised objective at
    the soft minimiser is below f(0) = 0 (the rule above; CRST's code for LRENT). "cbst": exactly
    CBST's pixels (``max p/λ ≥ 1``), the regulariser only shaping the label. The second exists
    because LRL2's and LRKLD's regularisers are positive on the simplex (≥ 1/K, ≥ log K): under
    "objective" a pixel then needs ``log(p/λ) ≳ α·r``, which a confident model's kept pixels
    (p ≤ 1, so log(p/λ) ≤ −log λ, often < 0.01) almost never reach - on the embedded pair, LRL2
    at α = 0.01 keeps 0.8 % of the pixels CBST's 20 % portion asks for (docs/results.md).
    """
    fns = dict(lrent=lrent_soft_labels, lrl2=lrl2_soft_labels, lrkld=lrkld_soft_labels)
    if kind not in fns:
        raise ValueError(f"unknown label regulariser {kind!r}; expected one of {KINDS}")
    if keep not in KEEP_RULES:
        raise ValueError(f"unknown keep rule {keep!r}; expected one of {KEEP_RULES}")
    if keep == "objective":
        return fns[kind](probs, thresholds, alpha)
    shaped = fns[kind](probs, thresholds, alpha, keep_all=True)
    return jnp.where(cbst_kept(probs, thresholds)[..., None], shaped, 0.0)


def hard_labels(soft, ignore_label: int = IGNORE_INDEX):
    """uint8 argmax of soft labels, ``ignore_label`` where the row is all zero (ignored)."""
    label = jnp.argmax(soft, axis=-1).astype(jnp.uint8)
    return jnp.where(jnp.sum(soft, axis=-1) > 0, label, jnp.uint8(ignore_label))


__all__ = [
    "KINDS", "KEEP_RULES", "cbst_kept", "log_ratio", "objective", "lrent_soft_labels", "project_to_simplex", "lrl2_soft_labels",
    "lrkld_soft_labels", "soft_pseudo_labels", "hard_labels",
]
