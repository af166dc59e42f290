"""DACS's strong augmentation of the mixed image: colour jitter then Gaussian blur, on device.

What the references do (lhoyer/DAFormer ``mmseg/models/utils/dacs_transforms.py`` and
``mmseg/models/uda/dacs.py``, from vikolss/DACS ``utils/transformsgpu.py``; values from
``configs/_base_/uda/dacs.py``):

* one uniform draw per training step decides for the whole batch: colour jitter when it
  exceeds ``color_jitter_probability = 0.2`` (so it is applied with probability 0.8), blur when
  a second draw exceeds 0.5 (``blur=True``);
* colour jitter is kornia 0.5.8's ``ColorJitter(brightness=s, contrast=s, saturation=s, hue=s)``
  with ``s = color_jitter_strength = 0.2`` on the image in [0, 1] (``denorm_`` ... ``renorm_``),
  drawn per image (DAFormer calls it once per image): factors
  ``b, c, t ~ U[max(0, 1 - s), 1 + s]`` (brightness clamped to [0, 2]), ``h ~ U[-s, s]``
  (clamped to [-0.5, 0.5]) and a random order of the four operations
  (kornia ``augmentation/augmentation.py`` ``ColorJitter.apply_transform``,
  ``random_generator.random_color_jitter_generator``; version from DAFormer's
  ``requirements.txt``). kornia 0.5.8 (``enhance/adjust.py``) is additive in brightness,
  ``clamp(x + (b - 1), 0, 1)``, multiplicative in contrast, ``clamp(c * x, 0, 1)``, and works in
  its own HSV (``color/hsv.py``: ``S = (max - min) / (max + 1e-6)``, hue in radians) for
  saturation, ``S' = clamp(t * S, 0, 1)``, and hue, ``H' = fmod(H + 2*pi*h, 2*pi)``;
* blur is ``kornia.filters.GaussianBlur2d`` with ``sigma ~ U(0.15, 1.15)`` drawn per image, a
  kernel of ``ceil(0.1 * size)`` taps rounded down to odd, per axis
  (``floor(ceil(0.1 n) - 0.5 + ceil(0.1 n) % 2)``), coefficients ``exp(-x^2 / (2 sigma^2))``
  normalised (``filters/kernels.py``), torch ``reflect`` padding (the edge pixel not repeated).

Image format. Our networks take RGB in 0..255 (uint8 or float) and normalise inside. The
augmented image stays float32 on the 0..255 scale and enters the network unrounded: the
references jitter and blur the float tensor the network sees, and rounding to uint8 would add
quantisation (up to 0.5/255) they do not have. Jitter works on ``image / 255`` and returns
``255 * result``; blur is linear and normalised, so blurring on 0..255 equals blurring the
normalised image up to float rounding (the reflect padding commutes with the per-channel affine
normalisation).

Randomness: the batch-level decisions come from ``key``; the per-image factors from
``fold_in(key, i)`` for global sample index ``i``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

COLOR_JITTER_STRENGTH = 0.2  # configs/_base_/uda/dacs.py color_jitter_strength
COLOR_JITTER_PROBABILITY = 0.2  # configs/_base_/uda/dacs.py: applied when U(0,1) > 0.2
BLUR_PROBABILITY = 0.5  # dacs_transforms.gaussian_blur: applied when U(0,1) > 0.5
BLUR_SIGMA = (0.15, 1.15)  # dacs_transforms.gaussian_blur: np.random.uniform(0.15, 1.15)
_HSV_EPS = 1e-6  # kornia 0.5.8 color/hsv.py rgb_to_hsv(eps=1e-6)
_TWO_PI = np.float32(2 * math.pi)


def blur_kernel_size(n: int) -> int:
    """Taps of DACS's blur along an axis of ``n`` pixels: ``ceil(0.1 n)``, minus one if even."""
    c = math.ceil(0.1 * n)
    return int(math.floor(c - 0.5 + c % 2))


# ----------------------------------------------------------------------------- colour jitter
def jitter_params(key, batch: int, strength: float = COLOR_JITTER_STRENGTH):
    """Per-image factors (kornia 0.5.8 ``ColorJitter(s, s, s, s)``): brightness, contrast,
    saturation (B,) in ``[max(0, 1-s), 1+s]``, hue (B,) in ``[-s, s]``, order (B, 4) int32
    (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    s = float(strength)
    lo = np.array([max(0.0, 1.0 - s)] * 3 + [max(-s, -0.5)], np.float32)
    hi = np.array([min(1.0 + s, 2.0), 1.0 + s, 1.0 + s, min(s, 0.5)], np.float32)

    def one(i):  # one draw of 8 uniforms: 4 factors, and 4 keys whose order is the permutation
        u = jax.random.uniform(jax.random.fold_in(key, i), (8,), jnp.float32)
        factors = lo + (hi - lo) * u[:4]
        return dict(brightness=factors[0], contrast=factors[1], saturation=factors[2], hue=factors[3],
                    order=jnp.argsort(u[4:]).astype(jnp.int32))

    return jax.vmap(one)(jnp.arange(batch))


def rgb_to_hsv(rgb):
    """kornia 0.5.8's HSV of (..., 3) RGB in [0, 1]: hue in radians [0, 2 pi), ``S = delta /
    (V + 1e-6)``; the hue formula follows the first channel holding the maximum."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = jnp.max(rgb, axis=-1)
    delta = v - jnp.min(rgb, axis=-1)
    s = delta / (v + np.float32(_HSV_EPS))
    safe = jnp.where(delta == 0, np.float32(1), delta)
    rc, gc, bc = v - r, v - g, v - b
    h = jnp.where(r == v, bc - gc, jnp.where(g == v, 2 * safe + rc - bc, 4 * safe + gc - rc))
    h = jnp.remainder(h / safe / 6, np.float32(1))
    return jnp.stack([_TWO_PI * h, s, v], axis=-1)


def hsv_to_rgb(hsv):
    """Inverse of :func:`rgb_to_hsv` (kornia 0.5.8 ``hsv_to_rgb``; hue taken modulo 2 pi)."""
    h, s, v = hsv[..., 0] / _TWO_PI, hsv[..., 1], hsv[..., 2]
    h6 = h * 6
    sector = jnp.remainder(jnp.floor(h6), np.float32(6))
    f = jnp.remainder(h6, np.float32(6)) - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = sector.astype(jnp.int32)
    pick = lambda *values: jnp.select([sector == i for i in range(5)], values[:5], values[5])
    return jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], axis=-1)


def _adjust(x, op, p):
    """kornia 0.5.8's adjustment number ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue)
    of an (H, W, 3) image in [0, 1]. Saturation and hue share one HSV round trip (the other
    HSV channel passes through unchanged), so the program holds one copy of it."""
    hsv = rgb_to_hsv(x)
    hue = jnp.where(op == 3, jnp.fmod(hsv[..., 0] + p["hue"] * _TWO_PI, _TWO_PI), hsv[..., 0])
    sat = jnp.where(op == 2, jnp.clip(hsv[..., 1] * p["saturation"], 0, 1), hsv[..., 1])
    colour = hsv_to_rgb(jnp.stack([hue, sat, hsv[..., 2]], axis=-1))
    brightness = jnp.clip(x + (p["brightness"] - 1), 0, 1)
    contrast = jnp.clip(x * p["contrast"], 0, 1)
    return jnp.where(op == 0, brightness, jnp.where(op == 1, contrast, colour))


def color_jitter(images01, params):
    """Applies :func:`jitter_params`' draws to (B, H, W, 3) float32 images in [0, 1]."""

    def one(x, p):  # one loop body: the four operations are compiled once, not per position
        return jax.lax.fori_loop(0, 4, lambda position, x: _adjust(x, p["order"][position], p), x)

    return jax.vmap(one)(images01.astype(jnp.float32), params)


# ------------------------------------------------------------------------------------- blur
def blur_sigmas(key, batch: int, sigma_range=BLUR_SIGMA):
    """Per-image standard deviations (B,) float32, uniform in ``sigma_range``."""
    lo, hi = sigma_range
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (), jnp.float32, lo, hi))(
        jnp.arange(batch))


def gaussian_taps(sigma, size: int):
    """(size,) normalised ``exp(-x^2 / (2 sigma^2))`` at ``x = -(size//2) .. size//2``."""
    x = jnp.arange(size, dtype=jnp.float32) - size // 2
    w = jnp.exp(-(x * x) / (2 * sigma * sigma))
    return w / jnp.sum(w)


def _filter_axis(x, taps, axis: int):
    """Correlates (H, W, C) ``x`` with ``taps`` along ``axis`` after reflect padding."""
    half = taps.shape[0] // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (half, half)
    xp = jnp.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    out = jnp.zeros_like(x)
    for j in range(taps.shape[0]):
        out = out + taps[j] * jax.lax.slice_in_dim(xp, j, j + n, axis=axis)
    return out


def gaussian_blur(images, sigmas):
    """DACS's blur of (B, H, W, C) float32 images, one sigma per image, separable."""
    height, width = images.shape[1:3]
    ky, kx = blur_kernel_size(height), blur_kernel_size(width)
    if ky >= height or kx >= width:
        raise ValueError(f"images of {height}x{width} are too small for reflect padding")

    def one(x, sigma):
        x = _filter_axis(x, gaussian_taps(sigma, ky), 0)
        return _filter_axis(x, gaussian_taps(sigma, kx), 1)

    return jax.vmap(one)(images.astype(jnp.float32), sigmas)


# ------------------------------------------------------------------------------ together
def strong_augment(key, images, *, strength: float = COLOR_JITTER_STRENGTH,
                   jitter_probability: float = COLOR_JITTER_PROBABILITY, blur: bool = True):
    """The mixed image after DACS's colour jitter and blur: (B, H, W, 3) 0..255 in (any dtype),
    float32 0..255 out. Returns ``(images, applied)`` with ``applied`` = (jitter, blur) bools."""
    k_jitter, k_blur, k_params, k_sigma = jax.random.split(key, 4)
    x = images.astype(jnp.float32)
    batch = x.shape[0]
    do_jitter = jax.random.uniform(k_jitter) > np.float32(jitter_probability)
    params = jitter_params(k_params, batch, strength)
    x = jax.lax.cond(do_jitter, lambda x: color_jitter(x / np.float32(255), params) * np.float32(255),
                     lambda x: x, x)
    do_blur = jnp.asarray(False)
    if blur:
        do_blur = jax.random.uniform(k_blur) > np.float32(BLUR_PROBABILITY)
        sigmas = blur_sigmas(k_sigma, batch)
        x = jax.lax.cond(do_blur, lambda x: gaussian_blur(x, sigmas), lambda x: x, x)
    return x, (do_jitter, do_blur)


__all__ = ["COLOR_JITTER_STRENGTH", "COLOR_JITTER_PROBABILITY", "BLUR_PROBABILITY", "BLUR_SIGMA",
           "blur_kernel_size", "jitter_params", "rgb_to_hsv", "hsv_to_rgb", "color_jitter", "blur_sigmas",
           "gaussian_taps", "gaussian_blur", "strong_augment"]
