"""The model zoo: every registered network by name, and ``get_model`` to build one."""
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from cbst_jax.models.deeplabv2 import deeplabv2_resnet101, deeplabv2_resnet_small
from cbst_jax.models.demo_net import demo_segnet
from cbst_jax.models.fcn import fcn8s_vgg16, fcn8s_vgg16_small
from cbst_jax.models.layers import check_atrous
from cbst_jax.models.resnet38 import resnet38, resnet38_small
from cbst_jax.models.segformer import SEGFORMER_MODELS

MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv2_resnet101": deeplabv2_resnet101,
    "deeplabv2_resnet_small": deeplabv2_resnet_small,
    "resnet38": resnet38,
    "resnet38_small": resnet38_small,
    "fcn8s_vgg16": fcn8s_vgg16,
    "fcn8s_vgg16_small": fcn8s_vgg16_small,
    "demo_segnet": demo_segnet,
    **SEGFORMER_MODELS,  # segformer_mit_b0..b5, daformer_mit_b0..b5
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# the families with the ``atrous`` option (dilated convolutions as space-to-batch phase grids)
ATROUS_FAMILIES = ("deeplabv2_resnet101", "deeplabv2_resnet_small", "resnet38", "resnet38_small")


def get_model(name: str, num_classes: int, **options) -> nn.Module:
    """Builds the registered network `name` (see MODELS) with `num_classes` outputs."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if isinstance(options.get("dtype"), str):
        options["dtype"] = DTYPES[options["dtype"]]
    if name not in ATROUS_FAMILIES and "atrous" in options:  # their convolutions have no such option
        if check_atrous(options.pop("atrous")) != "dilated":
            raise ValueError(f"atrous='space_to_batch' is not available for {name!r}; "
                             f"it is for {sorted(ATROUS_FAMILIES)}")
    return MODELS[name](num_classes, **options)
