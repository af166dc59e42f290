"""The decoders that turn the MiT encoder's four feature maps into stride-4 logits.

* :class:`SegFormerHead`, SegFormer's all-MLP head (Xie et al. 2021; NVlabs ``SegFormerHead``,
  transformers' ``SegformerDecodeHead``): each stage linearly embedded to ``embed_dim``,
  bilinearly resized to stage 1's size, concatenated deepest first (c4, c3, c2, c1), fused by a
  1x1 convolution + BN + ReLU, dropout, a 1x1 classifier.
* :class:`DAFormerHead`, DAFormer's context-aware fusion (Hoyer et al., CVPR 2022;
  ``daformer_sepaspp_mitb5``): each stage linearly embedded to 256, resized to stage 1's size,
  concatenated in stage order (c1..c4), then an ASPP over the fused map: a 1x1 branch and
  depthwise-separable 3x3 branches with dilations 6/12/18 (depthwise conv + BN + ReLU,
  pointwise conv + BN + ReLU), each to 256 channels, concatenated and fused by a 3x3 conv + BN
  + ReLU (the "bottleneck"), dropout, a 1x1 classifier.

Resizes are bilinear with half-pixel centres (torch ``align_corners=False``, as both heads).
Dropout drops whole channels (mmseg's ``BaseDecodeHead``: ``nn.Dropout2d``). Submodule names
follow the checkpoints' state-dict names (transformers ``decode_head.linear_c.0.proj``,
``linear_fuse``, ``batch_norm``, ``classifier``; mmseg ``decode_head.embed_layers.0.proj``,
``fuse_layer.aspp_modules.1.depthwise_conv.conv``, ``conv_seg``), so importing is a rename.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbst_jax.models.layers import BatchNorm, conv

# mmcv ConvModule: kaiming normal, fan_out, ReLU gain; torch nn.Linear: U(+-1/sqrt(fan_in));
# mmseg BaseDecodeHead: the classifier N(0, 0.01)
conv_module_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
classifier_init = nn.initializers.normal(0.01)


def resize_like(x, size):
    """Bilinear resize of NHWC ``x`` to ``size`` (H, W) with half-pixel centres (torch
    ``interpolate(mode='bilinear', align_corners=False)`` for upsampling)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method="linear", antialias=False)


class LinearEmbed(nn.Module):
    """A per-pixel linear map (the heads' ``MLP``: ``proj``)."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=linear_init,
                        name="proj")(x)


class ConvModule(nn.Module):
    """mmcv's ConvModule with BN and ReLU: convolution without bias (``conv``), ``bn``, ReLU."""
    features: int
    kernel: int
    dilation: int = 1
    groups: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, use_batch_stats: bool = False):
        x = conv(self.features, self.kernel, "conv", dilation=self.dilation, dtype=self.dtype,
                 feature_group_count=self.groups, kernel_init=conv_module_init)(x)
        return nn.relu(BatchNorm(dtype=self.dtype, name="bn")(x, use_batch_stats))


class SeparableConvModule(nn.Module):
    """mmcv's DepthwiseSeparableConvModule: a depthwise ``depthwise_conv`` (BN, ReLU), then a
    1x1 ``pointwise_conv`` (BN, ReLU)."""
    features: int
    dilation: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, use_batch_stats: bool = False):
        c = x.shape[-1]
        x = ConvModule(c, 3, self.dilation, groups=c, dtype=self.dtype, name="depthwise_conv")(x, use_batch_stats)
        return ConvModule(self.features, 1, dtype=self.dtype, name="pointwise_conv")(x, use_batch_stats)


class SeparableASPP(nn.Module):
    """DAFormer's fusion (``ASPPWrapper`` with ``sep=True``, no image pooling): parallel
    ``aspp_modules_i`` (1x1 ConvModule for dilation 1, SeparableConvModule otherwise), their
    concatenation fused by a 3x3 ConvModule (``bottleneck``)."""
    channels: int
    dilations: Sequence[int] = (1, 6, 12, 18)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, use_batch_stats: bool = False):
        outs = []
        for i, d in enumerate(self.dilations):
            name = f"aspp_modules_{i}"
            if d == 1:
                outs.append(ConvModule(self.channels, 1, dtype=self.dtype, name=name)(x, use_batch_stats))
            else:
                outs.append(SeparableConvModule(self.channels, d, self.dtype, name=name)(x, use_batch_stats))
        return ConvModule(self.channels, 3, dtype=self.dtype, name="bottleneck")(
            jnp.concatenate(outs, axis=-1), use_batch_stats)


class SegFormerHead(nn.Module):
    num_classes: int
    embed_dim: int = 256
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False, use_batch_stats: bool = False):
        size = features[0].shape[1:3]
        embedded = [resize_like(LinearEmbed(self.embed_dim, self.dtype, name=f"linear_c_{i}")(f), size)
                    for i, f in enumerate(features)]
        x = jnp.concatenate(embedded[::-1], axis=-1)  # deepest first, as SegFormer
        x = conv(self.embed_dim, 1, "linear_fuse", dtype=self.dtype, kernel_init=conv_module_init)(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="batch_norm")(x, use_batch_stats))
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
        return conv(self.num_classes, 1, "classifier", use_bias=True, dtype=self.dtype,
                    kernel_init=classifier_init)(x)


class DAFormerHead(nn.Module):
    num_classes: int
    embed_dim: int = 256
    channels: int = 256
    dilations: Sequence[int] = (1, 6, 12, 18)
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False, use_batch_stats: bool = False):
        size = features[0].shape[1:3]
        embedded = [resize_like(LinearEmbed(self.embed_dim, self.dtype, name=f"embed_layers_{i}")(f), size)
                    for i, f in enumerate(features)]
        x = SeparableASPP(self.channels, self.dilations, self.dtype, name="fuse_layer")(
            jnp.concatenate(embedded, axis=-1), use_batch_stats)
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
        return conv(self.num_classes, 1, "conv_seg", use_bias=True, dtype=self.dtype,
                    kernel_init=classifier_init)(x)
