"""FCN-8s on a VGG backbone (fc6/fc7 as convolutions, skips from pool3 and pool4).

`reference_padding=True` reproduces the Caffe/pytorch-fcn FCN-8s exactly: conv1_1 pads
100, pools use ceil mode, fc6 is a valid 7x7 conv, the transposed convs have no padding
and the fused maps are cropped at offsets 5 (pool4), 9 (pool3) and 31 (output), so the
logits have the full input resolution H x W for any input size.
`reference_padding=False` (small variants) pads every conv 'same', pools with ceil mode
and upsamples with padded transposed convs (k=2s, torch padding s/2) cropped at offset 0;
the logits are again H x W (exactly aligned when H, W are multiples of 32).
Names follow pytorch-fcn (`conv3_2`, `fc6`, `score_pool4`, `upscore8`).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cbst_jax.models.layers import ConvTranspose, conv, max_pool, normalize_images


def bilinear_upsampling_init(key, shape, dtype=jnp.float32):
    """Per-class bilinear kernel for a (k, k, out, in) transposed-conv kernel (FCN init)."""
    k, _, c_out, c_in = shape
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = np.arange(k)
    filt = (1 - abs(og - center) / factor)
    kernel = np.zeros(shape, np.float32)
    for c in range(min(c_out, c_in)):
        kernel[:, :, c, c] = filt[:, None] * filt[None, :]
    return jnp.asarray(kernel, dtype)


class FCN8s(nn.Module):
    """FCN-8s; logits NHWC at the input resolution (output stride 1).

    Attributes:
      num_classes: output channels.
      widths: channels of the five VGG stages.
      depths: convs per stage ((2, 2, 3, 3, 3) for VGG16).
      fc_width: channels of fc6/fc7.
      fc_kernel: kernel of fc6 (7 for VGG16).
      reference_padding: see the module docstring.
      dropout: rate after fc6 and fc7 (train only; needs rngs={'dropout': key}).
      normalization: 'imagenet' for torchvision weights.
      dtype: activation dtype; logits are returned in float32.
    """
    num_classes: int
    widths: Sequence[int] = (64, 128, 256, 512, 512)
    depths: Sequence[int] = (2, 2, 3, 3, 3)
    fc_width: int = 4096
    fc_kernel: int = 7
    reference_padding: bool = True
    dropout: float = 0.5
    train_bn: bool = False  # accepted for a uniform registry; VGG has no BatchNorm
    normalization: str = "imagenet"
    dtype: Any = jnp.float32

    head_names = ("score_fr", "score_pool4", "score_pool3", "upscore2", "upscore_pool4", "upscore8")
    output_stride = 1

    @nn.compact
    def __call__(self, images, train: bool = False):
        dt, ref, c = self.dtype, self.reference_padding, self.num_classes
        h, w = images.shape[1:3]
        x = normalize_images(images, self.normalization, dt)
        skips = []
        for s, (width, depth) in enumerate(zip(self.widths, self.depths)):
            for i in range(depth):
                pad = 100 if ref and s == 0 and i == 0 else 1
                x = nn.relu(conv(width, 3, f"conv{s + 1}_{i + 1}", padding=pad, use_bias=True, dtype=dt)(x))
            x = max_pool(x, 2, 2, ceil_mode=True)
            skips.append(x)
        fc_pad = 0 if ref else self.fc_kernel // 2
        for name, k, p in (("fc6", self.fc_kernel, fc_pad), ("fc7", 1, 0)):
            x = nn.relu(conv(self.fc_width, k, name, padding=p, use_bias=True, dtype=dt)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)

        def score(y, name, init=nn.initializers.zeros):
            return conv(c, 1, name, use_bias=True, dtype=dt, kernel_init=init)(y)

        def upsample(y, factor, name):
            return ConvTranspose(c, 2 * factor, factor, padding=0 if ref else factor // 2,
                                 kernel_init=bilinear_upsampling_init, dtype=dt, name=name)(y)

        def crop(y, like_hw, offset):
            return y[:, offset:offset + like_hw[0], offset:offset + like_hw[1]]

        pool3, pool4 = skips[2], skips[3]
        x = upsample(score(x, "score_fr", nn.initializers.lecun_normal()), 2, "upscore2")
        x = crop(x, pool4.shape[1:3], 0)  # no-op with reference padding
        x = x + crop(score(pool4, "score_pool4"), x.shape[1:3], 5 if ref else 0)
        x = upsample(x, 2, "upscore_pool4")
        x = crop(x, pool3.shape[1:3], 0)
        x = x + crop(score(pool3, "score_pool3"), x.shape[1:3], 9 if ref else 0)
        x = upsample(x, 8, "upscore8")
        return crop(x, (h, w), 31 if ref else 0).astype(jnp.float32)


def fcn8s_vgg16(num_classes: int, **options) -> FCN8s:
    return FCN8s(num_classes, **options)


def fcn8s_vgg16_small(num_classes: int, **options) -> FCN8s:
    """Same code at 1/4-1/5 width, one conv per stage, 3x3 fc6, 'same' padding (0.40 M
    params with 19 classes): the embedded demo's full-resolution model for 2 CPU cores."""
    options.setdefault("normalization", "unit")
    return FCN8s(num_classes, widths=(16, 32, 64, 96, 96), depths=(1, 1, 1, 1, 1), fc_width=128,
                 fc_kernel=3, reference_padding=False, dropout=0.1, **options)
