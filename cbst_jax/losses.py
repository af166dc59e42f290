"""Loss terms of CBST / CRST retraining: pooled cross-entropy, soft-label cross-entropy and the
CRST model regularisers (MRENT, MRKLD, MRL2), plus the two ways of matching logits to labels.

Every function is pure, works on a whole (global) batch with the class axis last and computes in
float32 whatever the logits' dtype. Reductions come back as ``(sum, count)`` pairs so that sharded
or accumulated callers combine them before dividing (the references divide once, by the number of
valid pixels of the whole batch).

Logit/label resolution (``resolution=``):

* ``"stride"`` (CBST, MXNet ``data.py``): the loss lives on the logits' grid. Labels are sampled by
  nearest neighbour at the centres of the ``stride × stride`` cells, ``label[s//2::s, s//2::s]``
  (``[4::8, 4::8]`` for stride 8: 63×63 for a 504 crop). DeepLab's ceil-mode pooling gives
  ``H/8 + 1`` logits for ``H`` divisible by 8 (65 for 512); the sampled grid is then padded with
  the ignore label, so the extra logit row/column never enters the loss (the same as cropping the
  logits to the label grid). A sampled grid larger than the logits is cropped.
* ``"upsample"`` (CRST, PyTorch): logits are resized bilinearly with ``align_corners=True`` to the
  label size, so logit ``i`` sits on pixel ``i·(H−1)/(h−1)``, and the loss is taken at full
  resolution.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cbst_jax.labels import IGNORE_INDEX
REGULARIZERS = ("none", "mrent", "mrkld", "mrl2")
RESOLUTIONS = ("stride", "upsample")


def cross_entropy(logits, labels, *, ignore_label: int = IGNORE_INDEX, where=None):
    """Hard-label CE: ``(Σ_valid −log p_y, #valid)``; valid means ``label != ignore_label``
    (and ``where``, when given)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = labels.astype(jnp.int32)
    valid = labels != ignore_label
    if where is not None:
        valid = valid & where
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def weighted_cross_entropy(logits, labels, weights, *, ignore_label: int = IGNORE_INDEX):
    """Pixel-weighted hard-label CE of online self-training: ``Σ_valid w · (−log p_y)``
    (float32), valid meaning ``label != ignore_label``. The references divide this sum by all
    pixels of the batch, ignored ones included (vikolss/DACS ``utils/loss.py``:
    ``torch.mean(loss * pixelWiseWeight)``; lhoyer/DAFormer ``mmseg/models/losses/utils.py``:
    ``weight_reduce_loss`` with ``reduction='mean'``), so the caller divides by ``labels.size``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = labels.astype(jnp.int32)
    valid = labels != ignore_label
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll * weights.astype(jnp.float32), 0.0))


def soft_cross_entropy(logits, soft_labels, *, where=None):
    """Soft-label CE of CRST's LR* modes: ``(Σ_valid Σ_k −ŷ_k log p_k, #valid)``. A pixel whose
    soft label is all zeros (the ŷ = 0 "ignore" option) is not valid."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    soft_labels = soft_labels.astype(jnp.float32)
    valid = jnp.sum(soft_labels, axis=-1) > 0
    if where is not None:
        valid = valid & where
    # 0 · log p must stay 0 even where p underflows to 0 (log p = −inf).
    nll = -jnp.sum(jnp.where(soft_labels > 0, soft_labels * logp, 0.0), axis=-1)
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def model_regularizer(logits, kind: str):
    """Per-pixel CRST model regulariser r(p) (class axis reduced), to be minimised:
    MRENT ``Σ_k p_k log p_k`` (negative entropy), MRKLD ``−Σ_k (1/K) log p_k`` (KL(uniform‖p)
    up to a constant), MRL2 ``Σ_k p_k²``. All three push the prediction towards uniform."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if kind == "mrent":
        return jnp.sum(jnp.exp(logp) * logp, axis=-1)
    if kind == "mrkld":
        return -jnp.mean(logp, axis=-1)
    if kind == "mrl2":
        return jnp.sum(jnp.exp(2.0 * logp), axis=-1)
    raise ValueError(f"unknown model regulariser {kind!r}; expected one of {REGULARIZERS[1:]}")


def regularizer_sum(logits, kind: str, where):
    """``(Σ_where r(p), #where)`` for the MR term; ``where`` marks pseudo-labelled target pixels."""
    r = model_regularizer(logits, kind)
    return jnp.sum(jnp.where(where, r, 0.0)), jnp.sum(where, dtype=jnp.int32)


def subsample_labels(labels, stride: int, out_hw, *, fill=IGNORE_INDEX):
    """Nearest-neighbour labels at the cell centres of a stride-``stride`` grid (CBST's
    ``label[4::8, 4::8]``), cropped or padded with ``fill`` to ``out_hw``. Works on (B,H,W) hard
    labels and on (B,H,W,C) soft labels (pad those with ``fill=0``)."""
    off = stride // 2
    sub = labels[:, off::stride, off::stride]
    h, w = out_hw
    sub = sub[:, :h, :w]
    pad = [(0, 0), (0, h - sub.shape[1]), (0, w - sub.shape[2])] + [(0, 0)] * (sub.ndim - 3)
    if any(p[1] for p in pad):
        sub = jnp.pad(sub, pad, constant_values=jnp.asarray(fill, sub.dtype))
    return sub


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights with ``align_corners=True``."""
    if n_out == 1:
        src = np.zeros((1,), np.float64)
    else:
        src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))
    i0 = np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m.astype(np.float32)


def resize_bilinear_align_corners(x, out_hw):
    """Bilinear resize of (B,h,w,C) to (B,H,W,C) with PyTorch's ``align_corners=True``
    (``jax.image.resize`` has no such option). Separable: two small interpolation matrices
    applied with float32 (HIGHEST) matmuls, so TF32/bf16 never creeps in on accelerators."""
    x = x.astype(jnp.float32)
    h, w = x.shape[1:3]
    H, W = out_hw
    hi = jax.lax.Precision.HIGHEST
    if (H, W) == (h, w):
        return x
    x = jnp.einsum("oh,bhwc->bowc", _align_corners_matrix(h, H), x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", _align_corners_matrix(w, W), x, precision=hi)


def align_logits_and_labels(logits, labels, soft_labels=None, *, resolution: str, stride: int = 8,
                            ignore_label: int = IGNORE_INDEX):
    """Brings (B,h,w,C) logits and (B,H,W) labels (and optional (B,H,W,C) soft labels) to one
    grid: the logits' grid (``"stride"``, CBST) or the labels' grid (``"upsample"``, CRST)."""
    if resolution == "stride":
        hw = logits.shape[1:3]
        labels = subsample_labels(labels, stride, hw, fill=ignore_label)
        if soft_labels is not None:
            soft_labels = subsample_labels(soft_labels, stride, hw, fill=0)
        return logits.astype(jnp.float32), labels, soft_labels
    if resolution == "upsample":
        return resize_bilinear_align_corners(logits, labels.shape[1:3]), labels, soft_labels
    raise ValueError(f"unknown loss resolution {resolution!r}; expected one of {RESOLUTIONS}")


def segmentation_loss(logits, labels, is_target, soft_labels=None, *, resolution: str = "upsample",
                      stride: int = 8, regularizer: str = "none", reg_weight: float = 0.0,
                      ignore_label: int = IGNORE_INDEX):
    """The retraining loss of CBST / CRST on a mixed source+target batch.

    ``loss = Σ_valid CE / #valid + reg_weight · Σ_{valid target} r(p) / #valid_target``

    * CE pools source and pseudo-labelled target pixels with equal weight (no source/target λ), as
      both references. With ``soft_labels`` (LR* modes) target pixels use the soft CE and are valid
      where Σŷ > 0; source pixels keep their hard labels (the references' one-hot).
    * The MR term only covers valid target pixels. ``reg_weight`` is the *effective* weight: the
      CRST code multiplies by ``--mr-weight-kld`` twice (once inside the sum, once outside), so its
      ``mrkld.sh`` setting 0.1 corresponds to ``reg_weight = 0.1**2 = 0.01`` here.
    * Empty sets contribute 0 (counts are clamped at 1).

    Returns ``(loss, aux)`` with aux ``ce, reg, ce_sum, reg_sum, n_valid, n_valid_target``.
    """
    logits, labels, soft_labels = align_logits_and_labels(
        logits, labels, soft_labels, resolution=resolution, stride=stride, ignore_label=ignore_label)
    target = jnp.broadcast_to(is_target.astype(bool)[:, None, None], labels.shape)
    if soft_labels is None:
        ce_sum, n_valid = cross_entropy(logits, labels, ignore_label=ignore_label)
        valid_target = target & (labels.astype(jnp.int32) != ignore_label)
    else:
        src_sum, n_src = cross_entropy(logits, labels, ignore_label=ignore_label, where=~target)
        tgt_sum, n_tgt = soft_cross_entropy(logits, soft_labels, where=target)
        ce_sum, n_valid = src_sum + tgt_sum, n_src + n_tgt
        valid_target = target & (jnp.sum(soft_labels, axis=-1) > 0)
    ce = ce_sum / jnp.maximum(n_valid, 1)
    if regularizer == "none":
        reg_sum = jnp.zeros((), jnp.float32)
        n_target = jnp.sum(valid_target, dtype=jnp.int32)
    else:
        reg_sum, n_target = regularizer_sum(logits, regularizer, valid_target)
    reg = reg_sum / jnp.maximum(n_target, 1)
    loss = ce + reg_weight * reg
    aux = dict(ce=ce, reg=reg, ce_sum=ce_sum, reg_sum=reg_sum, n_valid=n_valid, n_valid_target=n_target)
    return loss, aux


__all__ = [
    "REGULARIZERS", "RESOLUTIONS", "cross_entropy", "weighted_cross_entropy", "soft_cross_entropy",
    "model_regularizer", "regularizer_sum", "subsample_labels", "resize_bilinear_align_corners",
    "align_logits_and_labels", "segmentation_loss",
]
