"""SegFormer's Mix Transformer (MiT) encoder (Xie et al., NeurIPS 2021), B0 to B5.

Four stages at output strides 4/8/16/32. Each stage: an overlapping patch embedding (a strided
convolution with padding kernel//2, then LayerNorm: 7x7/4 for stage 1, 3x3/2 after), ``depth``
transformer blocks, a final LayerNorm. A block is pre-norm: ``x + drop_path(attn(norm1(x)))``,
then ``x + drop_path(mlp(norm2(x)))``, where

* ``attn`` is efficient self-attention: queries from every token, keys and values from the map
  reduced by a ``sr x sr`` stride-``sr`` convolution + LayerNorm (ratios 8/4/2/1), one fused
  ``kv`` projection;
* ``mlp`` is the Mix-FFN: linear -> 3x3 depthwise convolution -> GELU (exact) -> linear, which
  replaces position embeddings (MiT has none);
* ``drop_path`` is stochastic depth, its rate rising linearly from 0 to ``drop_path_rate`` over
  all blocks of all stages; it drops whole residual branches per sample and needs
  ``rngs={'dropout': key}`` when ``train=True``.

Module and parameter names follow the published MiT state dict (NVlabs/SegFormer and mmseg's
``mix_transformer.py``: ``patch_embed1.proj``, ``block3.17.attn.kv``, ``norm4``, ...), so a
checkpoint maps by renaming (``cbst_jax.models.importers``). LayerNorm epsilons as published:
1e-6 in the blocks and the stage norms (``layer_norm_epsilon``), torch's default 1e-5 in the
patch embeddings and the key/value reduction.

Features are NHWC; the token sequence of a stage is its H x W map, so no reshapes between
tokens and maps are needed.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cbst_jax.models.layers import conv

# Depths and widths per variant (SegFormer paper Tab. 6; mmseg mix_transformer.py mit_b0..mit_b5).
MIT_VARIANTS = {
    "b0": dict(widths=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(widths=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "b2": dict(widths=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "b3": dict(widths=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "b4": dict(widths=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "b5": dict(widths=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
PATCH_NORM_EPSILON = 1e-5  # nn.LayerNorm's default, used by the patch embeddings and the kv reduction

dense_init = nn.initializers.truncated_normal(0.02)  # the published _init_weights: Linear trunc_normal(.02)


def conv_init(kernel: int, features: int, groups: int = 1):
    """The published _init_weights for convolutions: N(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups."""
    return nn.initializers.normal(float(np.sqrt(2.0 / (kernel * kernel * features // groups))))


def dense(features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=dense_init, name=name)


def layer_norm(epsilon: float, name: str, dtype) -> nn.LayerNorm:
    # two-pass variance, as torch: E[x^2] - E[x]^2 loses digits on large-mean activations
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


class DropPath(nn.Module):
    """Stochastic depth: the residual branch of a sample is dropped with probability ``rate``
    and the kept ones scaled by 1 / (1 - rate); identity when deterministic."""
    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class EfficientSelfAttention(nn.Module):
    """Multi-head attention of every token to the ``sr_ratio``-reduced map (keys, values)."""
    width: int
    num_heads: int
    sr_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        head_dim = self.width // self.num_heads
        q = dense(self.width, "q", self.dtype)(x).reshape(b, h * w, self.num_heads, head_dim)
        if self.sr_ratio > 1:
            r = self.sr_ratio
            if h < r or w < r:  # the reduction would leave no keys (torch refuses such a kernel too)
                raise ValueError(f"a {h}x{w} map is smaller than its {r}x{r} key/value reduction: MiT needs "
                                 f"inputs of at least 29x29 pixels")
            x = conv(self.width, r, "sr", stride=r, padding=0, use_bias=True, dtype=self.dtype,
                     kernel_init=conv_init(r, self.width))(x)
            x = layer_norm(PATCH_NORM_EPSILON, "norm", self.dtype)(x)
        kv = dense(2 * self.width, "kv", self.dtype)(x)
        kv = kv.reshape(b, -1, 2, self.num_heads, head_dim)
        out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1])  # softmax in float32
        return dense(self.width, "proj", self.dtype)(out.reshape(b, h, w, self.width))


class MixFFN(nn.Module):
    """linear -> 3x3 depthwise convolution -> GELU -> linear."""
    width: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.hidden, "fc1", self.dtype)(x)
        x = conv(self.hidden, 3, "dwconv", use_bias=True, dtype=self.dtype, feature_group_count=self.hidden,
                 kernel_init=conv_init(3, self.hidden, self.hidden))(x)
        x = nn.gelu(x, approximate=False)  # torch nn.GELU(): the exact erf form
        return dense(self.width, "fc2", self.dtype)(x)


class MiTBlock(nn.Module):
    width: int
    num_heads: int
    sr_ratio: int
    drop_path: float
    layer_norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        drop = DropPath(self.drop_path)
        y = layer_norm(self.layer_norm_epsilon, "norm1", self.dtype)(x)
        x = x + drop(EfficientSelfAttention(self.width, self.num_heads, self.sr_ratio, self.dtype, name="attn")(y),
                     not train)
        y = layer_norm(self.layer_norm_epsilon, "norm2", self.dtype)(x)
        return x + drop(MixFFN(self.width, self.width * MLP_RATIO, self.dtype, name="mlp")(y), not train)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: ``kernel`` x ``kernel`` convolution, stride ``stride``,
    padding kernel // 2, then LayerNorm."""
    width: int
    kernel: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = conv(self.width, self.kernel, "proj", stride=self.stride, padding=self.kernel // 2, use_bias=True,
                 dtype=self.dtype, kernel_init=conv_init(self.kernel, self.width))(x)
        return layer_norm(PATCH_NORM_EPSILON, "norm", self.dtype)(x)


def drop_path_rates(depths: Sequence[int], rate: float) -> list[float]:
    """The per-block stochastic-depth rates: linearly from 0 to ``rate`` over all blocks."""
    n = sum(depths)
    return [rate * i / max(n - 1, 1) for i in range(n)]


class MixTransformer(nn.Module):
    """The MiT encoder: NHWC normalised images -> four NHWC feature maps at strides 4/8/16/32
    (ceil(H/4) x ceil(W/4), then ceil of half each stage)."""
    widths: Sequence[int] = MIT_VARIANTS["b0"]["widths"]
    depths: Sequence[int] = MIT_VARIANTS["b0"]["depths"]
    num_heads: Sequence[int] = NUM_HEADS
    sr_ratios: Sequence[int] = SR_RATIOS
    drop_path_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        rates = iter(drop_path_rates(self.depths, self.drop_path_rate))
        features = []
        for s, (width, depth) in enumerate(zip(self.widths, self.depths)):
            kernel, stride = (7, 4) if s == 0 else (3, 2)
            x = PatchEmbed(width, kernel, stride, self.dtype, name=f"patch_embed{s + 1}")(x)
            for i in range(depth):
                x = MiTBlock(width, self.num_heads[s], self.sr_ratios[s], next(rates), self.layer_norm_epsilon,
                             self.dtype, name=f"block{s + 1}_{i}")(x, train)
            x = layer_norm(self.layer_norm_epsilon, f"norm{s + 1}", self.dtype)(x)
            features.append(x)
        return features
