"""Pseudo-labels and pixel weights of online self-training from the teacher's probabilities,
with two threshold policies. Pure functions, traceable inside the jitted step.

``fixed`` (DACS / DAFormer; lhoyer/DAFormer ``mmseg/models/uda/dacs.py`` ``forward_train``,
vikolss/DACS ``trainUDA.py`` ``pixel_weight == "threshold_uniform"``):
  the label is the teacher's argmax; one weight for every target pixel of the step, the share of
  the *batch's* pixels whose max probability is ``>= tau`` (``pseudo_prob.ge(0.968)``, summed
  over the whole batch and divided by its size), ``tau = 0.968``
  (``configs/_base_/uda/dacs.py`` ``pseudo_threshold``). DAFormer's final config
  (``configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py``) then sets
  the weight to 0 in the top 15 and bottom 120 rows of the crop
  (``pseudo_weight_ignore_top/bottom``; the share itself still counts those rows). The share is
  a Python float64 ``count / size`` stored into a float32 tensor: here the correctly rounded
  float32 quotient (both integers are exact in float32 below 2**24 pixels).

``class_balanced`` (the seed's rule, CBST, applied online):
  the class thresholds ``lambda_c`` are the value at rank ``floor(N_c p)`` of class ``c``'s
  teacher confidences ``max_c (q p)_c`` over a *window* of the last ``W`` target batches,
  computed exactly as :func:`cbst_jax.selection.thresholds_from_confidence` computes them offline
  (the same two histograms, the host step on device: :mod:`cbst_jax.device_thresholds`); the
  pseudo-label is the seed's closed form :func:`cbst_jax.selection.select_pseudo_labels`,
  ``argmax_c (q p)_c / lambda_c`` where ``(q p)_c* >= lambda_c*``, else ignored; the weight is 1
  on selected pixels and 0 elsewhere. ``q`` is the optional spatial prior (CBST-SP), cropped at
  each target crop's position (:func:`prior_windows`). The portion ``p`` follows the seed's
  self-paced schedule with a round of ``round_length`` iterations (:func:`portion_at_step`).

The window (:class:`Window`) is a fixed-shape ring buffer of the teacher's confidences and
classes, one slot per target batch, held in the train state. A step first writes its own batch
into the oldest slot and then computes ``lambda`` over the filled slots. Until ``W`` batches
have been seen, the window holds the ``t + 1`` batches seen so far (the current one included):
the thresholds are the exact offline thresholds of those batches, so the first step's are those
of its own batch, as an offline round's thresholds include the images it labels.

Sharding: the buffer is split over ``'data'`` along its batch axis, like the target batches
written into it. Each device keeps the confidences of the images it labelled: writing a batch
moves no data, and the memory per device is ``1/N`` of the buffer. The threshold histograms are
per-device counts summed with one ``psum`` of (C, 65536) int32 per pass (as offline,
``selection.histogram_step``), so the thresholds are the same on every mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cbst_jax import device_thresholds, selection
from cbst_jax.labels import IGNORE_INDEX
from cbst_jax.methods import portion_at
from cbst_jax.sharding import DATA_AXIS

POLICIES = ("fixed", "class_balanced")
TAU = 0.968  # configs/_base_/uda/dacs.py pseudo_threshold
IGNORE_TOP, IGNORE_BOTTOM = 15, 120  # DAFormer's final config: pseudo_weight_ignore_top / _bottom


# ------------------------------------------------------------------------------------ fixed
def fixed_pseudo_labels(probs, tau: float = TAU, ignore_top: int = 0, ignore_bottom: int = 0):
    """DAFormer's pseudo-labels of (B, H, W, C) probabilities: ``(label int32, weight float32,
    share)``, label the argmax (lowest class on ties), weight ``share`` on every pixel except the
    ``ignore_top`` first and ``ignore_bottom`` last rows (0 there)."""
    probs = jnp.asarray(probs, jnp.float32)
    conf = jnp.max(probs, axis=-1)
    label = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    above = jnp.sum(conf >= np.float32(tau), dtype=jnp.int32)
    share = selection.correctly_rounded_divide(above.astype(jnp.float32), np.float32(conf.size))
    rows = jnp.arange(conf.shape[1])
    kept_rows = (rows >= ignore_top) & (rows < conf.shape[1] - ignore_bottom)
    weight = jnp.where(kept_rows[None, :, None], share, np.float32(0)) * jnp.ones_like(conf)
    return label, weight, share


# --------------------------------------------------------------------------- class-balanced
def portion_at_step(schedule, step: int, round_length: int) -> float:
    """The seed's self-paced portion ``min(p0 + r*dp, p_max)`` with round ``r = step //
    round_length`` (iterations), evaluated on the host in float64 like the offline rounds'."""
    if round_length < 1:
        raise ValueError(f"round_length must be >= 1, got {round_length}")
    return portion_at(schedule, int(step) // int(round_length))


@struct.dataclass
class Window:
    """The last ``slots`` target batches' teacher confidences ``max_c (q p)_c`` (float32) and
    classes (uint8), (slots, B, H, W) each; ``filled`` (slots,) marks written slots and
    ``cursor`` is the slot the next batch goes to."""
    conf: jax.Array
    pred: jax.Array
    filled: jax.Array
    cursor: jax.Array

    @classmethod
    def empty(cls, slots: int, batch_shape, num_classes: int) -> "Window":
        if slots < 1:
            raise ValueError(f"the window needs at least one slot, got {slots}")
        if num_classes > 255:
            raise ValueError("the window stores classes as uint8 (at most 255 classes)")
        if slots * int(np.prod(batch_shape)) >= 1 << 31:
            raise ValueError(f"a window of {slots} batches of {tuple(batch_shape)} pixels exceeds 2**31 pixels")
        shape = (slots,) + tuple(batch_shape)
        return cls(conf=jnp.zeros(shape, jnp.float32), pred=jnp.zeros(shape, jnp.uint8),
                   filled=jnp.zeros((slots,), bool), cursor=jnp.zeros((), jnp.int32))


def window_shardings(mesh: Mesh) -> Window:
    """The window's layout: slots whole, the batch axis over ``'data'``; flags replicated."""
    data, rep = NamedSharding(mesh, P(None, DATA_AXIS)), NamedSharding(mesh, P())
    return Window(conf=data, pred=data, filled=rep, cursor=rep)


def insert(window: Window, conf, pred) -> Window:
    """The window with batch ``(conf, pred)`` (B, H, W) written into the oldest slot."""
    slot = window.cursor
    return window.replace(conf=window.conf.at[slot].set(conf.astype(jnp.float32)),
                          pred=window.pred.at[slot].set(pred.astype(jnp.uint8)),
                          filled=window.filled.at[slot].set(True),
                          cursor=(slot + 1) % window.filled.shape[0])


def window_thresholds(window: Window, num_classes: int, words, mesh: Mesh | None = None):
    """Exact thresholds ``lambda`` (C,) float32 over the filled slots at the portion whose
    :func:`device_thresholds.portion_words` are ``words``, and the per-class counts (C,) int32."""

    def coarse(conf, pred, filled):
        valid = jnp.broadcast_to(filled.reshape((-1,) + (1,) * (conf.ndim - 1)), conf.shape)
        return selection.coarse_histogram_from_confidence(conf, pred, num_classes, valid)

    def fine(conf, pred, filled, bins):
        valid = jnp.broadcast_to(filled.reshape((-1,) + (1,) * (conf.ndim - 1)), conf.shape)
        return selection.fine_histogram_from_confidence(conf, pred, bins, valid)

    if mesh is not None:
        data, rep = P(None, DATA_AXIS), P()
        coarse = jax.shard_map(lambda *a, f=coarse: jax.lax.psum(f(*a), DATA_AXIS), mesh=mesh,
                               in_specs=(data, data, rep), out_specs=rep)
        fine = jax.shard_map(lambda *a, f=fine: jax.lax.psum(f(*a), DATA_AXIS), mesh=mesh,
                             in_specs=(data, data, rep, rep), out_specs=rep)
    args = (window.conf, window.pred, window.filled)
    return device_thresholds.thresholds(lambda: coarse(*args), lambda bins: fine(*args, bins), words)


def prior_windows(prior, origins, size):
    """The spatial prior (Hp, Wp, C) under each target crop: (B, H, W, C) slices at ``origins``
    (B, 2) int32 (row, column of each crop's top-left corner in the prior's coordinates)."""
    h, w = size
    cut = lambda o: jax.lax.dynamic_slice(prior, (o[0], o[1], 0), (h, w, prior.shape[-1]))
    return jax.vmap(cut)(jnp.asarray(origins, jnp.int32))


def class_balanced_pseudo_labels(probs, thresholds, prior=None, ignore_label: int = IGNORE_INDEX):
    """The seed's closed form on (B, H, W, C) probabilities: ``(label int32, weight float32)``,
    ``ignore_label`` and weight 0 where no class reaches its threshold, weight 1 elsewhere."""
    label = selection.select_pseudo_labels(probs, thresholds, prior, ignore_index=ignore_label).astype(jnp.int32)
    return label, (label != ignore_label).astype(jnp.float32)


__all__ = ["POLICIES", "TAU", "IGNORE_TOP", "IGNORE_BOTTOM", "fixed_pseudo_labels", "portion_at_step",
           "Window", "window_shardings", "insert", "window_thresholds", "prior_windows",
           "class_balanced_pseudo_labels"]
