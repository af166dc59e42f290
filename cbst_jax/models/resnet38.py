"""Wider ResNet-38 (model A1 of "Wider or Deeper", CBST's MXNet `fcrna_model_a1`).

Pre-activation (BN -> ReLU -> conv) residual blocks; output stride 8 by dilating levels
5-7 instead of striding. Level 1 is a single 3x3 conv (`conv1a`); levels 2-4 start with a
stride-2 block; level 5 starts with a non-strided block whose second conv is dilated 2;
levels 6/7 are 1-3-1 bottlenecks dilated 4 with dropout (0.3/0.5) before their last conv.
The first block of a level projects the shortcut from the *pre-activated* input. The FCN
head is conv3x3 (dilation 12, bias) -> ReLU -> conv3x3 (dilation 12, bias) to the classes.
Parameter names are the MXNet ones (`res4b3_branch2b1`, `bn4b3_branch2b1`, `bn7`,
`conv6a`, `linear{C}`), so porting a `.params` file is a rename; BN eps is 1.001e-5.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cbst_jax.models.layers import BatchNorm, GridDropout, PhaseGrid, check_atrous, conv, normalize_images

MXNET_BN_EPS = 1.001e-5


class ResNet38(nn.Module):
    """FCRNA model A1; logits NHWC at output stride 8 (ceil(H/8) for any H).

    Attributes:
      num_classes: output channels (head conv `linear{num_classes}`).
      widths: channels of conv1a, levels 2-4 and the (per-conv) widths of levels 5-7.
      blocks: residual blocks of levels 2-5 (levels 6 and 7 have one each).
      head_width: channels of `conv6a`.
      head_dilation: dilation of both head convs (12).
      dropout: rates before the last conv of levels 6 and 7.
      train_bn, normalization, dtype, atrous: as for DeepLabV2 (weights expect 'imagenet');
        ``atrous="space_to_batch"`` runs level 5 (from after 5a's first conv) on the 2x2, levels
        6-7 on the 4x4 and the head on the 12x12 space-to-batch phase grid, undilated.
      fold_bn: as for DeepLabV2; here the BatchNorm after each inner conv of a block (the
        pre-activations of the residual stream have no conv of their own to fold into).
    """
    num_classes: int
    widths: Sequence[Any] = (64, 128, 256, 512, (512, 1024), (512, 1024, 2048), (1024, 2048, 4096))
    blocks: Sequence[int] = (3, 3, 6, 3)
    head_width: int = 512
    head_dilation: int = 12
    dropout: Sequence[float] = (0.3, 0.5)
    train_bn: bool = False
    normalization: str = "imagenet"
    dtype: Any = jnp.float32
    atrous: str = "dilated"
    fold_bn: bool = True

    head_names = ("conv6a", "linear")
    output_stride = 8

    @nn.compact
    def __call__(self, images, train: bool = False):
        bs = self.train_bn and train
        dt = self.dtype
        on_phases = check_atrous(self.atrous) == "space_to_batch"
        dropouts = iter(range(2))

        def bn_relu(x, name, grid=None):
            valid = grid.valid if grid is not None else None
            return nn.relu(BatchNorm(epsilon=MXNET_BN_EPS, dtype=dt, name=name)(x, bs, valid))

        def conv_on(grid, features, kernel, name, x, dilation=1, bn=None, **kw):
            """The conv of the map ``x`` is held on: on a phase grid its dilation is per phase
            and the padding must read zero. ``bn``: the name of the frozen BatchNorm of its
            output, folded into it."""
            if grid is not None and kernel > 1:
                x, dilation = grid.zero_padding(x), dilation // grid.rate
            layer = conv(features, kernel, name, dilation=dilation, dtype=dt, **kw)
            if bn is None:
                return layer(x)
            return BatchNorm(epsilon=MXNET_BN_EPS, dtype=dt, name=bn)(x, conv=layer, fold=True)

        def dropout(y, rate, grid):
            name = f"Dropout_{next(dropouts)}"  # nn.Dropout's own names: the same keys either way
            if grid is None:
                return nn.Dropout(rate, deterministic=not train, name=name)(y)
            return GridDropout(rate, name=name)(y, grid, not train)

        def block(x, name, filters, kernels, stride=1, dilation=1, first_dilation=None,
                  project=False, dropout_rate=0.0, grid=None, enter=None):
            """`res_block` of resnet_v2.py: BN-ReLU-conv stages, optional projection. ``x`` is
            held on ``grid``; ``enter``: a grid the block moves onto after its first conv. The
            BatchNorm after each inner conv is folded into it when frozen (``fold_bn``); the
            pre-activation of the block's input is not (the residual sum lies between)."""
            pre = bn_relu(x, f"bn{name}_branch2a", grid)
            names = [f"res{name}_branch2a"] + [f"res{name}_branch2b{i}" for i in range(1, len(filters))]
            y = pre
            for i, (features, kernel, conv_name) in enumerate(zip(filters, kernels, names)):
                bn_name = f"bn{name}_branch2b{i + 1}" if i + 1 < len(filters) else None
                folded = bn_name is not None and self.fold_bn and not bs
                d = dilation if i > 0 or first_dilation is None else first_dilation
                y = conv_on(grid, features, kernel, conv_name, y, dilation=d, stride=stride if i == 0 else 1,
                            bn=bn_name if folded else None)
                if i == 0 and project:
                    x = conv_on(grid, filters[-1], 1, f"res{name}_branch1", pre, stride=stride)
                if i == 0 and enter is not None:
                    x, y, grid = enter.to_phases(x), enter.to_phases(y), enter
                if bn_name is not None:
                    y = nn.relu(y) if folded else bn_relu(y, bn_name, grid)
                    if dropout_rate and i + 1 == len(filters) - 1:
                        y = dropout(y, dropout_rate, grid)
            return x + y

        w = self.widths
        x = normalize_images(images, self.normalization, dt)
        x = conv(w[0], 3, "conv1a", dtype=dt)(x)
        for level, n_blocks in zip((2, 3, 4), self.blocks[:3]):
            filters = (w[level - 1],) * 2
            x = block(x, f"{level}a", filters, (3, 3), stride=2, project=True)
            for i in range(1, n_blocks):
                x = block(x, f"{level}b{i}", filters, (3, 3))
        # level 5 (dilation 2) on the 2x2 phase grid from after 5a's undilated first conv;
        # levels 6-7 (dilation 4) on the 4x4 grid; the head (dilation 12) on the 12x12 grid
        grid5 = PhaseGrid.of(x, 2) if on_phases else None
        x = block(x, "5a", w[4], (3, 3), dilation=2, first_dilation=1, project=True, enter=grid5)
        for i in range(1, self.blocks[3]):
            x = block(x, f"5b{i}", w[4], (3, 3), dilation=2, grid=grid5)
        if grid5 is not None:
            x = grid5.from_phases(x)
        grid67 = PhaseGrid.of(x, 4) if on_phases else None
        if grid67 is not None:
            x = grid67.to_phases(x)
        x = block(x, "6a", w[5], (1, 3, 1), dilation=4, project=True, dropout_rate=self.dropout[0], grid=grid67)
        x = block(x, "7a", w[6], (1, 3, 1), dilation=4, project=True, dropout_rate=self.dropout[1], grid=grid67)
        x = bn_relu(x, "bn7", grid67)
        if grid67 is not None:
            x = grid67.from_phases(x)
        d = self.head_dilation
        head = PhaseGrid.of(x, d) if on_phases and d > 1 else None
        if head is not None:
            x = head.to_phases(x)
        x = nn.relu(conv_on(head, self.head_width, 3, "conv6a", x, dilation=d, use_bias=True))
        x = conv_on(head, self.num_classes, 3, "linear", x, dilation=d, use_bias=True,
                    kernel_init=nn.initializers.normal(0.01))
        if head is not None:
            x = head.from_phases(x)
        return x.astype(jnp.float32)


def resnet38(num_classes: int, **options) -> ResNet38:
    return ResNet38(num_classes, **options)


def resnet38_small(num_classes: int, **options) -> ResNet38:
    """Same code, widths / 8 and one block per level (CPU tests)."""
    options.setdefault("normalization", "unit")
    return ResNet38(num_classes, widths=(8, 16, 32, 64, (64, 128), (64, 128, 256), (128, 256, 512)),
                    blocks=(1, 1, 1, 1), head_width=64, **options)
