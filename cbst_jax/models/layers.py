"""Building blocks shared by the model families: input normalisation, convolutions that a frozen
BatchNorm folds into, BatchNorm with running statistics, torch-compatible padding and ceil-mode
max-pooling, and the phase grids that run dilated convolutions as undilated ones (``PhaseGrid``)."""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# Mean pixel of the Caffe DeepLab-v2 init, in BGR order (AdaptSegNet/ADVENT IMG_MEAN).
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
NORMALIZATIONS = ("imagenet", "caffe", "unit")
# How dilated convolutions are computed: as dilated convolutions, or as undilated ones on the
# space-to-batch phase sub-grids of their rate (``PhaseGrid``); same function, same variables.
ATROUS_MODES = ("dilated", "space_to_batch")


def check_atrous(atrous: str) -> str:
    if atrous not in ATROUS_MODES:
        raise ValueError(f"atrous must be one of {ATROUS_MODES}, got {atrous!r}")
    return atrous


def normalize_images(images, normalization: str, dtype=jnp.float32):
    """Maps RGB pixel values in 0..255 (uint8 or float) to the input the weights expect.

    imagenet: /255 then torchvision mean/std (torchvision and CBST MXNet weights);
    caffe: RGB->BGR minus the Caffe mean pixel, no scaling (DeepLab-v2 init);
    unit: /255 only (networks trained from scratch).
    """
    x = images.astype(jnp.float32)
    if normalization == "imagenet":
        x = (x / 255.0 - jnp.asarray(IMAGENET_MEAN_RGB)) / jnp.asarray(IMAGENET_STD_RGB)
    elif normalization == "caffe":
        x = x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR)
    elif normalization == "unit":
        x = x / 255.0
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return x.astype(dtype)


class Conv(nn.Module):
    """``nn.Conv`` on NHWC maps with an HWIO kernel: the same parameters (names, shapes,
    initialisers, random draws) and the same convolution, plus an optional per-output-channel
    affine map folded in. ``Conv(...)(x, scale=m, shift=a)`` is ``nn.Conv(...)(x) * m + a``
    computed as one convolution with kernel ``kernel * m`` and bias ``bias * m + a`` (folded in
    float32, then cast to ``dtype``): a frozen BatchNorm costs no pass of its own
    (``BatchNorm(..., conv=)``)."""
    features: int
    kernel_size: tuple
    strides: tuple = (1, 1)
    padding: Any = "SAME"
    kernel_dilation: tuple = (1, 1)
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    feature_group_count: int = 1  # > 1: grouped (depthwise when equal to the input channels)

    @nn.compact
    def __call__(self, x, scale=None, shift=None):
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1] // self.feature_group_count, self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        if scale is not None:
            kernel = kernel * scale
            bias = shift if bias is None else bias * scale + shift
        y = lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding,
                                     rhs_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if bias is None else y + bias.astype(self.dtype)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with torch semantics and frozen-statistics fast path.

    With `use_batch_stats=False` it is a per-channel affine map (running statistics); given the
    :class:`Conv` whose output it normalises (``conv``, called on ``x``) and ``fold``, that map
    is folded into the convolution (scale into the kernel, shift as a bias: exact to rounding,
    no multiply-add of its own forward or backward). With batch statistics it updates the
    running averages like torch (momentum 0.1, unbiased variance) when 'batch_stats' is
    mutable.
    """
    epsilon: float = 1e-5
    momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, use_batch_stats: bool = False, valid=None, conv: Conv | None = None, fold: bool = False):
        """``valid``: optional 0/1 array broadcastable to the normalised map (a ``PhaseGrid.valid``
        mask): batch statistics are taken over the positions it marks only (padding left out).
        ``conv``: normalise ``conv(x)`` instead of ``x`` (folded into it when ``fold`` and the
        statistics are the running ones)."""
        c = x.shape[-1] if conv is None else conv.features
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if not use_batch_stats and conv is not None and fold:
            mul = scale * lax.rsqrt(ra_var.value + self.epsilon)
            return conv(x, scale=mul, shift=bias - ra_mean.value * mul)
        if conv is not None:
            x = conv(x)
        if use_batch_stats:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            if valid is None:
                n = x.size // c
                mean = xf.mean(axes)
                mean_sq = (xf * xf).mean(axes)
            else:
                weight = jnp.broadcast_to(valid, x.shape[:-1] + (1,)).astype(jnp.float32)
                n = weight.sum()
                mean = (xf * weight).sum(axes) / n
                mean_sq = (xf * xf * weight).sum(axes) / n
            var = jnp.maximum(mean_sq - mean * mean, 0.0)
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * n / jnp.maximum(n - 1, 1)
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale * lax.rsqrt(var + self.epsilon)
        add = bias - mean * mul
        return x * mul.astype(self.dtype) + add.astype(self.dtype)


def conv(features: int, kernel: int, name: str, *, stride: int = 1, dilation: int = 1,
         padding: int | None = None, use_bias: bool = False, dtype=jnp.float32, **kw) -> Conv:
    """A :class:`Conv` with torch-style symmetric padding (default: 'same' for odd kernels). A 1x1
    kernel has no taps to spread, so its dilation is dropped (no dilated 1x1 conv in the HLO)."""
    dilation = 1 if kernel == 1 else dilation
    pad = dilation * (kernel - 1) // 2 if padding is None else padding
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                kernel_dilation=(dilation, dilation), use_bias=use_bias, dtype=dtype, name=name, **kw)


def _pool_out(n: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    span = n + 2 * p - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:  # torch: last window must start inside input or left pad
        out -= 1
    return out


def max_pool(x, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False):
    """torch.nn.MaxPool2d on NHWC (pads with -inf; ceil_mode adds the extra right pad)."""
    pads = []
    for n in x.shape[1:3]:
        out = _pool_out(n, kernel, stride, padding, ceil_mode)
        pads.append((padding, (out - 1) * stride + kernel - n - padding))
    if kernel == stride and padding == 0 and min(hi for _, hi in pads) >= 0:
        # Non-overlapping windows as reshape + max: same values, and its gradient avoids
        # select-and-scatter, which is several times slower on CPU.
        (_, ph), (_, pw) = pads
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=-jnp.inf)
        n, h, w, c = x.shape
        return x.reshape(n, h // kernel, kernel, w // kernel, kernel, c).max(axis=(2, 4))
    return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pads)


class ConvTranspose(nn.Module):
    """torch.nn.ConvTranspose2d (no bias) computed as a stride-1 conv plus pixel shuffle.

    XLA lowers a transposed conv to a conv over the zero-dilated input, which costs
    stride**2 times the useful work (FCN-8s' x8 upsampling dominated a small model). Here
    each of the stride**2 output phases is a ceil(k/s)-tap conv of the input, stacked on the
    channel axis and interleaved. The kernel is stored like flax's
    `ConvTranspose(transpose_kernel=True)`: (k, k, out, in) = torch (in, out, k, k)
    transposed (2, 3, 1, 0).
    """
    features: int
    kernel_size: int
    stride: int
    padding: int = 0
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, s, p, c_out = self.kernel_size, self.stride, self.padding, self.features
        n, h, w, c_in = x.shape
        kernel = self.param("kernel", self.kernel_init, (k, k, c_out, c_in), jnp.float32)
        taps = -(-k // s)
        kp = jnp.pad(kernel, ((0, taps * s - k), (0, taps * s - k), (0, 0), (0, 0)))
        kp = kp.reshape(taps, s, taps, s, c_out, c_in)[::-1, :, ::-1]  # tap r + s*m, m reversed
        kp = kp.transpose(0, 2, 5, 1, 3, 4).reshape(taps * taps * c_in, s * s * c_out)
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (taps - 1, taps - 1), (taps - 1, taps - 1), (0, 0)))
        hq, wq = h + taps - 1, w + taps - 1
        cols = [xp[:, i:i + hq, j:j + wq] for i in range(taps) for j in range(taps)]
        y = jnp.concatenate(cols, axis=-1) @ kp.astype(self.dtype)  # im2col: matmuls backprop fast on CPU
        hq, wq = y.shape[1:3]
        y = y.reshape(n, hq, wq, s, s, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(n, hq * s, wq * s, c_out)
        out_h, out_w = (h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k
        return y[:, p:p + out_h, p:p + out_w]


@dataclasses.dataclass(frozen=True)
class PhaseGrid:
    """The ``rate`` x ``rate`` space-to-batch phase grid of an NHWC map of ``batch`` x
    ``height`` x ``width`` (TF's ``space_to_batch`` / ``atrous_conv2d``).

    ``to_phases`` zero-pads H and W up to multiples of ``rate`` and moves the phase
    ``(p, q)`` (rows ``rate*m + p``, columns ``rate*n + q``) onto the batch axis (index
    ``(p*rate + q)*batch + i``). A 'same'-padded k x k convolution with dilation ``rate*d``
    (padding ``rate*d*(k-1)/2``) of the map is then exactly an undilated-by-``rate`` one
    (dilation ``d``, padding ``d*(k-1)/2``) of every phase: its taps ``i + rate*d*a`` stay in
    phase ``i mod rate`` at ``i//rate + d*a``, and a tap beyond the map lands in the padding
    (or the conv's own zero padding), which must read zero. Pointwise layers (1x1 convs, BN,
    ReLU, residual sums) commute with the rearrangement. So a whole dilated stage runs on the
    phases between one ``to_phases`` and one ``from_phases`` (which crops the padding), provided
    every k > 1 conv inside reads zeros at the padded positions: multiply its input by ``valid``
    (``None`` when H and W are multiples of ``rate``: no padding), and take batch statistics over
    ``valid`` only (``BatchNorm(..., valid=)``).
    """
    rate: int
    batch: int
    height: int
    width: int

    @classmethod
    def of(cls, x, rate: int) -> "PhaseGrid":
        n, h, w, _ = x.shape
        return cls(rate, n, h, w)

    @property
    def padded(self) -> tuple[int, int]:
        r = self.rate
        return -(-self.height // r) * r, -(-self.width // r) * r

    def to_phases(self, x):
        r, (hp, wp) = self.rate, self.padded
        n, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        x = x.reshape(n, hp // r, r, wp // r, r, c).transpose(2, 4, 0, 1, 3, 5)
        return x.reshape(r * r * n, hp // r, wp // r, c)

    def from_phases(self, x):
        r, n, (hp, wp) = self.rate, self.batch, self.padded
        c = x.shape[-1]
        x = x.reshape(r, r, n, hp // r, wp // r, c).transpose(2, 3, 0, 4, 1, 5)
        return x.reshape(n, hp, wp, c)[:, :self.height, :self.width]

    @property
    def valid(self):
        """(rate*rate*batch, H/rate, W/rate, 1) float32 mask, 1 on the map, 0 on the padding;
        ``None`` without padding. A constant of the shapes (folded by XLA)."""
        if self.padded == (self.height, self.width):
            return None
        return self.to_phases(jnp.ones((self.batch, self.height, self.width, 1), jnp.float32))

    def zero_padding(self, x):
        """``x`` (on the phases) with the padded positions set to zero."""
        valid = self.valid
        return x if valid is None else x * valid.astype(x.dtype)


class GridDropout(nn.Module):
    """``nn.Dropout`` of a map held on a ``PhaseGrid``: the keep mask is drawn in the map's own
    layout and moved to the phases, so it equals the mask ``nn.Dropout`` draws for the map
    itself with the same key (give this module the name that ``nn.Dropout`` had)."""
    rate: float

    @nn.compact
    def __call__(self, x, grid: PhaseGrid, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = (grid.batch, grid.height, grid.width, x.shape[-1])
        keep = grid.to_phases(jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob, shape=shape))
        return lax.select(keep, x / keep_prob, jnp.zeros_like(x))


def atrous_conv(module: nn.Module, x, rate: int):
    """``module`` (an undilated, 'same'-padded conv) applied as the rate-``rate`` dilated conv
    of ``x`` through its phase grid (one conv: no masking needed, the padding is zero)."""
    grid = PhaseGrid.of(x, rate)
    return grid.from_phases(module(grid.to_phases(x)))
