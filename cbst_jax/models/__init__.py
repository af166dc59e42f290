"""Segmentation networks: registry, optimiser parameter groups and weight files.

`get_model(name, num_classes, **options)` returns a Flax linen module;
`module.apply(variables, images, train=..., rngs=...)` maps NHWC RGB images with values in
0..255 (uint8 or float) to NHWC logits at the network's output stride
(`module.output_stride`); the caller upsamples. Variables are {'params', 'batch_stats'}.

Options shared by all families:
  train_bn: False (default, as the references) freezes BatchNorm: running statistics are
    used in training too and `param_groups` labels BN scale/bias "frozen". True uses batch
    statistics when `train=True`; pass `mutable=['batch_stats']` to get the update.
  dtype: activation dtype, 'float32' (default) or 'bfloat16'; params stay float32 and
    logits are returned in float32.
  normalization: 'imagenet' (torchvision / CBST MXNet weights), 'caffe' (DeepLab-v2 init:
    BGR minus mean pixel) or 'unit' (x / 255, small variants trained from scratch).
Dropout (ResNet-38, FCN-8s, the transformer decoders) and stochastic depth (the MiT encoder)
need `rngs={'dropout': key}` when `train=True`.

The transformer networks (`segformer_mit_b0..b5`, `daformer_mit_b0..b5`: the MiT encoder of
`models/mit.py` with a decoder of `models/decode_heads.py`, `models/segformer.py`) predict at
stride 4.

Weights files (`save_variables`, `load_variables`, `read_metadata`; `models/weight_files.py`)
carry the architecture, class count and normalisation the weights need;
`resolve_normalization` turns a configured normalisation ('auto' or explicit) and a file's
metadata into the one to build the model with.
"""
import flax.linen as nn
from flax import traverse_util

from cbst_jax.models.deeplabv2 import DeepLabV2
from cbst_jax.models.fcn import FCN8s
from cbst_jax.models.importers import WeightMismatchError
from cbst_jax.models.registry import DTYPES, MODELS, get_model
from cbst_jax.models.resnet38 import ResNet38
from cbst_jax.models.segformer import SegFormer
from cbst_jax.models.weight_files import (WeightFileError, load_variables, make_metadata, read_metadata,
                                          resolve_normalization, save_variables)

__all__ = ["MODELS", "DTYPES", "DeepLabV2", "ResNet38", "FCN8s", "SegFormer", "WeightMismatchError",
           "WeightFileError", "get_model", "param_groups", "load_variables", "save_variables", "read_metadata",
           "make_metadata", "resolve_normalization"]


def param_groups(name_or_module: str | nn.Module, params, train_bn: bool = False):
    """Labels every leaf of `params`: 'head' (the decoder / classifier, 10x LR), 'frozen'
    (backbone BN scale/bias when BN is frozen), 'backbone_no_decay' (backbone leaves under a module
    whose name contains one of the network's ``no_decay_names``: the MiT encoder's norms, trained
    without weight decay as SegFormer / DAFormer) or 'backbone'. The head label comes first, as in
    mmcv's paramwise_cfg (whose first matching key, sorted, is 'head'). Same nested-dict structure
    as `params`."""
    module = get_model(name_or_module, 1) if isinstance(name_or_module, str) else name_or_module
    flat = traverse_util.flatten_dict(params)
    # networks whose backbone normalises with LayerNorm only (MiT) have no BN to freeze
    has_bn = getattr(module, "backbone_has_batch_norm", True)
    bn_modules = {path[:-1] for path in flat if path[-1] == "scale"} if has_bn else set()
    no_decay = getattr(module, "no_decay_names", ())

    def label(path):
        if path[0] in module.head_names:
            return "head"
        if path[:-1] in bn_modules and not train_bn:
            return "frozen"
        if any(n in part for part in path[:-1] for n in no_decay):
            return "backbone_no_decay"
        return "backbone"

    return traverse_util.unflatten_dict({path: label(path) for path in flat})
