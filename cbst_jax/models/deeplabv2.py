"""DeepLab-v2 with a Caffe-style ResNet backbone (`Res_Deeplab` of AdaptSegNet/ADVENT/CRST).

Differences from torchvision's ResNet: the stride sits on the first 1x1 conv of a block,
the stem max-pool uses ceil mode, layer3/layer4 are dilated 2/4 with stride 1 (output
stride 8), and the head (ASPP-v2, `layer5`) sums four biased 3x3 convs with dilations
6/12/18/24. Submodule names follow the torch state dict (`layer3_5/conv2` <->
`layer3.5.conv2.weight`) so porting weights is a rename.

``atrous="space_to_batch"`` computes the same function with the same variables without any
dilated convolution: layer3 runs on the 2x2 and layer4 on the 4x4 space-to-batch phase grid of
its input (one rearrangement in, one out per stage; ``layers.PhaseGrid``), each ASPP conv on the
phase grid of its own rate.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cbst_jax.models.layers import (BatchNorm, PhaseGrid, atrous_conv, check_atrous, conv, max_pool,
                                    normalize_images)


class Bottleneck(nn.Module):
    """1x1 (stride) -> 3x3 (dilation) -> 1x1 x4 bottleneck with a projection shortcut."""
    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    use_batch_stats: bool = False
    fold_bn: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, grid: PhaseGrid | None = None):
        """``grid``: the phase grid ``x`` is held on (``dilation`` is then per phase), or None."""
        valid = grid.valid if grid is not None else None

        def conv_bn(y, features, kernel, name, bn_name, **kw):
            layer = conv(features, kernel, name, dtype=self.dtype, **kw)
            return BatchNorm(dtype=self.dtype, name=bn_name)(y, self.use_batch_stats, valid, conv=layer,
                                                            fold=self.fold_bn)

        y = nn.relu(conv_bn(x, self.planes, 1, "conv1", "bn1", stride=self.stride))
        if grid is not None:
            y = grid.zero_padding(y)
        y = nn.relu(conv_bn(y, self.planes, 3, "conv2", "bn2", dilation=self.dilation))
        y = conv_bn(y, self.planes * 4, 1, "conv3", "bn3")
        if self.downsample:
            x = conv_bn(x, self.planes * 4, 1, "downsample_0", "downsample_1", stride=self.stride)
        return nn.relu(x + y)


class ASPPv2(nn.Module):
    """DeepLab-v2 classifier: sum of parallel dilated 3x3 convs (`layer5.conv2d_list.*`)."""
    num_classes: int
    rates: Sequence[int] = (6, 12, 18, 24)
    atrous: str = "dilated"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.01)  # as Res_Deeplab's Classifier_Module
        outs = []
        for i, r in enumerate(self.rates):
            on_phases = self.atrous == "space_to_batch" and r > 1
            layer = conv(self.num_classes, 3, f"conv2d_list_{i}", dilation=1 if on_phases else r,
                         use_bias=True, dtype=self.dtype, kernel_init=init)
            outs.append(atrous_conv(layer, x, r) if on_phases else layer(x))
        return sum(outs[1:], outs[0])


class DeepLabV2(nn.Module):
    """DeepLab-v2 ResNet; logits NHWC at output stride 8 (H/8+1 for H divisible by 8).

    Attributes:
      num_classes: output channels.
      layers: bottleneck blocks per stage ((3, 4, 23, 3) for ResNet-101).
      width: planes of layer1 (64 for ResNet-101; stage s has width * 2**s).
      train_bn: False = frozen BN (running statistics, affine not trained) as the references.
      normalization: see `normalize_images` ('caffe' for the DeepLab init, 'imagenet' for
        torchvision weights).
      dtype: activation dtype (params stay float32); logits are returned in float32.
      atrous: "dilated" (dilated convolutions) or "space_to_batch" (the same convolutions,
        undilated, on phase grids; see the module docstring). Same variables, same function.
      fold_bn: BatchNorm with running statistics (frozen, or at inference) folded into the
        convolution before it (``layers.BatchNorm(conv=)``). Same variables, same function.
    """
    num_classes: int
    layers: Sequence[int] = (3, 4, 23, 3)
    width: int = 64
    rates: Sequence[int] = (6, 12, 18, 24)
    train_bn: bool = False
    normalization: str = "caffe"
    dtype: Any = jnp.float32
    atrous: str = "dilated"
    fold_bn: bool = True

    head_names = ("layer5",)
    output_stride = 8

    @nn.compact
    def __call__(self, images, train: bool = False):
        bs = self.train_bn and train
        on_phases = check_atrous(self.atrous) == "space_to_batch"
        x = normalize_images(images, self.normalization, self.dtype)
        stem = conv(self.width, 7, "conv1", stride=2, dtype=self.dtype)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, bs, conv=stem, fold=self.fold_bn))
        x = max_pool(x, 3, 2, padding=1, ceil_mode=True)
        stages = ((1, 1), (2, 1), (1, 2), (1, 4))  # (stride, dilation) of layer1..layer4
        for s, (n_blocks, (stride, dilation)) in enumerate(zip(self.layers, stages)):
            grid = PhaseGrid.of(x, dilation) if on_phases and dilation > 1 else None  # stride is 1 there
            if grid is not None:
                x = grid.to_phases(x)
            for i in range(n_blocks):
                x = Bottleneck(self.width * 2**s, stride=stride if i == 0 else 1,
                               dilation=1 if grid is not None else dilation, downsample=i == 0,
                               use_batch_stats=bs, fold_bn=self.fold_bn, dtype=self.dtype,
                               name=f"layer{s + 1}_{i}")(x, grid)
            if grid is not None:
                x = grid.from_phases(x)
        x = ASPPv2(self.num_classes, self.rates, self.atrous, dtype=self.dtype, name="layer5")(x)
        return x.astype(jnp.float32)


def deeplabv2_resnet101(num_classes: int, **options) -> DeepLabV2:
    return DeepLabV2(num_classes, layers=(3, 4, 23, 3), width=64, **options)


def deeplabv2_resnet_small(num_classes: int, **options) -> DeepLabV2:
    """Same code, one block per stage and width 8 (CPU tests)."""
    options.setdefault("normalization", "unit")
    return DeepLabV2(num_classes, layers=(1, 1, 1, 1), width=8, **options)
