"""ClassMix (Olsson et al., WACV 2021) as DACS mixes domains: paste half of a source image's
classes onto a target image.

Per source image ``i`` (vikolss/DACS ``trainUDA.py``, ``mix_mask == "class"``):

* the classes are the distinct values of its label map, ``torch.unique(labels[i])``. The ignore
  label counts as one of them (the line filtering it out is commented out in DACS), so a chosen
  "ignore class" pastes the source's unlabelled pixels, which stay ignored in the mixed label;
* ``ceil(n / 2)`` of those ``n`` values are drawn without replacement,
  ``np.random.choice(n, int((n + n % 2) / 2), replace=False)``;
* the mask ``M`` is 1 where the source label is one of them
  (``utils/transformmasks.py``'s ``generate_class_mask``), and
  ``mixed = M * source + (1 - M) * target`` for the image, the label (source label vs
  pseudo-label) and the pixel weight (1 on source pixels vs the pseudo-label weight;
  ``utils/transformsgpu.py``'s ``oneMix``).

DAFormer (lhoyer/DAFormer ``mmseg/models/utils/dacs_transforms.py``, ``get_class_masks``) calls
``torch.unique(labels)`` on the whole source batch instead of the image's label, so its chosen
classes may be absent from the image; we follow DACS's per-image count, which is what ClassMix
describes.

Fixed shapes: labels hold classes ``0..C-1`` or the ignore label; every value ``>= C`` is the
one extra "ignore" class (index ``C``). A uniform ``k``-subset of the present classes is the
first ``k`` of them in the order of i.i.d. uniform keys. Randomness is per sample:
``fold_in(key, i)`` for global sample index ``i``, so the masks do not depend on how the batch
is sharded.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def present_classes(label, num_classes: int):
    """(C+1,) bool: which classes occur in one (H, W) label map; index C is the ignore value."""
    index = jnp.minimum(label.astype(jnp.int32), num_classes).reshape(-1)
    return jnp.zeros(num_classes + 1, bool).at[index].set(True)


def choose_classes(key, present):
    """(C+1,) bool: a uniformly random ``ceil(n/2)``-subset of the ``n`` present classes."""
    n = jnp.sum(present, dtype=jnp.int32)
    keep = (n + n % 2) // 2
    score = jnp.where(present, jax.random.uniform(key, present.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(score, stable=True), stable=True)
    return present & (rank < keep)


def class_masks(key, labels, num_classes: int):
    """Source-pixel masks (B, H, W) bool and the chosen classes (B, C+1) bool of a source label
    batch (B, H, W); sample ``i`` draws with ``fold_in(key, i)``."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(labels.shape[0]))

    def one(k, label):
        chosen = choose_classes(k, present_classes(label, num_classes))
        return chosen[jnp.minimum(label.astype(jnp.int32), num_classes)], chosen

    return jax.vmap(one)(keys, labels)


def mix(mask, source, target):
    """``mask * source + (1 - mask) * target`` with a (B, H, W) mask; trailing axes (image
    channels) broadcast. Exact for any dtype (a select, not arithmetic)."""
    mask = mask.reshape(mask.shape + (1,) * (source.ndim - mask.ndim))
    return jnp.where(mask, source, target)


def mix_batch(mask, source_image, target_image, source_label, pseudo_label, pseudo_weight):
    """The mixed image, label and pixel weight (source pixels weigh 1)."""
    weight = mix(mask, jnp.ones_like(pseudo_weight), pseudo_weight)
    return (mix(mask, source_image, target_image),
            mix(mask, source_label.astype(pseudo_label.dtype), pseudo_label), weight)


__all__ = ["present_classes", "choose_classes", "class_masks", "mix", "mix_batch"]
