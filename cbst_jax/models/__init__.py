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
Dropout (ResNet-38, FCN-8s) needs `rngs={'dropout': key}` when `train=True`.
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cbst_jax.models.deeplabv2 import DeepLabV2, deeplabv2_resnet101, deeplabv2_resnet_small
from cbst_jax.models.demo_net import DemoSegNet, demo_segnet
from cbst_jax.models.fcn import FCN8s, fcn8s_vgg16, fcn8s_vgg16_small
from cbst_jax.models.importers import WeightMismatchError
from cbst_jax.models.resnet38 import ResNet38, resnet38, resnet38_small

MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv2_resnet101": deeplabv2_resnet101,
    "deeplabv2_resnet_small": deeplabv2_resnet_small,
    "resnet38": resnet38,
    "resnet38_small": resnet38_small,
    "fcn8s_vgg16": fcn8s_vgg16,
    "fcn8s_vgg16_small": fcn8s_vgg16_small,
    "demo_segnet": demo_segnet,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = ["MODELS", "DeepLabV2", "ResNet38", "FCN8s", "WeightMismatchError", "get_model",
           "param_groups", "load_variables", "save_variables", "load_metadata"]


def get_model(name: str, num_classes: int, **options) -> nn.Module:
    """Builds the registered network `name` (see MODELS) with `num_classes` outputs."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if isinstance(options.get("dtype"), str):
        options["dtype"] = DTYPES[options["dtype"]]
    return MODELS[name](num_classes, **options)


def param_groups(name_or_module: str | nn.Module, params, train_bn: bool = False):
    """Labels every leaf of `params`: 'head' (classifier, 10x LR), 'frozen' (BN scale/bias
    when BN is frozen) or 'backbone'. Same nested-dict structure as `params`."""
    module = get_model(name_or_module, 1) if isinstance(name_or_module, str) else name_or_module
    flat = traverse_util.flatten_dict(params)
    bn_modules = {path[:-1] for path in flat if path[-1] == "scale"}

    def label(path):
        if path[0] in module.head_names:
            return "head"
        if path[:-1] in bn_modules and not train_bn:
            return "frozen"
        return "backbone"

    return traverse_util.unflatten_dict({path: label(path) for path in flat})


def save_variables(path, variables, metadata: dict[str, Any] | None = None):
    """Writes variables as an .npz of 'params/a/b/kernel'-style keys (+ 'meta/*' strings)."""
    arrays = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(variables)).items()}
    arrays.update({f"meta/{k}": np.array(str(v)) for k, v in (metadata or {}).items()})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_variables(path) -> dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} (nested dicts of numpy arrays) from an .npz
    written by `save_variables` / `python -m cbst_jax.convert_weights`."""
    with np.load(path, allow_pickle=False) as z:
        flat = {tuple(k.split("/")): z[k] for k in z.files if not k.startswith("meta/")}
    variables = traverse_util.unflatten_dict(flat)
    variables.setdefault("batch_stats", {})
    return variables


def load_metadata(path) -> dict[str, str]:
    """The 'meta/*' strings of a converted file (kind, model, normalization, num_classes)."""
    with np.load(path, allow_pickle=False) as z:
        return {k[5:]: str(z[k]) for k in z.files if k.startswith("meta/")}
