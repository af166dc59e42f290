"""Transformer segmentation networks: the MiT encoder (``models/mit.py``) with SegFormer's
all-MLP head or DAFormer's context-aware fusion head (``models/decode_heads.py``).

``segformer_mit_b0`` .. ``segformer_mit_b5``: SegFormer as published (decoder width 256 for B0
and B1, 768 for B2-B5: NVlabs ``local_configs/segformer/B*/``, transformers' ``nvidia/segformer-b*``
configs). ``daformer_mit_b0`` .. ``daformer_mit_b5``: DAFormer's decoder (256 channels, dilations
1/6/12/18) on the same encoders; ``daformer_mit_b5`` is DAFormer's network.

Logits are at output stride 4: ceil(H/4) x ceil(W/4), stage 1's map.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cbst_jax.models.decode_heads import DAFormerHead, SegFormerHead
from cbst_jax.models.layers import normalize_images
from cbst_jax.models.mit import MIT_VARIANTS, MixTransformer

DECODERS = ("segformer", "daformer")
SEGFORMER_EMBED_DIM = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}
DAFORMER_EMBED_DIM = 256  # daformer_conv1_mitb5.py: embed_dims=256, channels=256


class SegFormer(nn.Module):
    """MiT encoder (``backbone``) + decoder (``decode_head``); NHWC uint8/float RGB in 0..255 ->
    float32 logits at stride 4.

    Attributes:
      num_classes: output channels.
      widths, depths: the MiT stages (``mit.MIT_VARIANTS``).
      decoder: "segformer" (all-MLP) or "daformer" (context-aware fusion).
      embed_dim: the decoder's width.
      drop_path_rate: stochastic depth of the last block (0.1 as published).
      dropout: the decoder's channel dropout before the classifier (0.1 as published).
      layer_norm_epsilon: of the blocks' and stages' LayerNorms (1e-6 as NVlabs/mmseg; the
        transformers port uses 1e-5 everywhere).
      train_bn: the decoder's BatchNorms use batch statistics when ``train`` (the encoder has
        none); False: running statistics, as the other families' frozen BN.
      normalization: see ``normalize_images`` ('imagenet': the published weights').
      dtype: activation dtype (params stay float32); logits are returned in float32.
    """
    num_classes: int
    widths: Sequence[int] = MIT_VARIANTS["b0"]["widths"]
    depths: Sequence[int] = MIT_VARIANTS["b0"]["depths"]
    decoder: str = "segformer"
    embed_dim: int = 256
    drop_path_rate: float = 0.1
    dropout: float = 0.1
    layer_norm_epsilon: float = 1e-6
    train_bn: bool = False
    normalization: str = "imagenet"
    dtype: Any = jnp.float32

    head_names = ("decode_head",)
    output_stride = 4
    # the encoder's parameters without weight decay (mmseg paramwise_cfg custom_keys 'norm': decay_mult 0;
    # its 'pos_block' matches no MiT parameter: MiT has no position embeddings)
    no_decay_names = ("norm",)
    # the encoder has LayerNorms, no BatchNorm: nothing of it is frozen with train_bn=False
    backbone_has_batch_norm = False

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        x = normalize_images(images, self.normalization, self.dtype)
        encoder = MixTransformer(self.widths, self.depths, drop_path_rate=self.drop_path_rate,
                                 layer_norm_epsilon=self.layer_norm_epsilon, dtype=self.dtype, name="backbone")
        features = encoder(x, train)
        head = SegFormerHead if self.decoder == "segformer" else DAFormerHead
        logits = head(self.num_classes, self.embed_dim, dropout=self.dropout, dtype=self.dtype, name="decode_head")(
            features, train, self.train_bn and train)
        return logits.astype(jnp.float32)


def _factory(decoder: str, variant: str):
    embed_dim = SEGFORMER_EMBED_DIM[variant] if decoder == "segformer" else DAFORMER_EMBED_DIM

    def build(num_classes: int, **options) -> SegFormer:  # options override the variant's fields too
        fields = {"decoder": decoder, "embed_dim": embed_dim, **MIT_VARIANTS[variant], **options}
        return SegFormer(num_classes, **fields)

    build.__name__ = f"{decoder}_mit_{variant}"
    build.__doc__ = f"MiT-{variant.upper()} with {decoder}'s decoder (width {embed_dim})."
    return build


SEGFORMER_MODELS = {f"{d}_mit_{v}": _factory(d, v) for d in DECODERS for v in MIT_VARIANTS}
