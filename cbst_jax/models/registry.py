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
# What ``dtype="auto"`` and ``atrous="auto"`` become per platform (``jax.default_backend()``): on an
# accelerator bfloat16 compute and the dilated stages as undilated convolutions on phase grids (the
# fastest step measured on an H200, docs/performance.md); on a CPU float32 and dilated convolutions
# (XLA's CPU backend computes bf16 convolutions in float32 and pays for the phase grids' padding).
# Parameters, logits, loss, softmax and threshold statistics are float32 on every path.
AUTO = "auto"
PLATFORM_COMPUTE = {"cpu": ("float32", "dilated"), "gpu": ("bfloat16", "space_to_batch"),
                    "tpu": ("bfloat16", "space_to_batch")}
PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def resolve_compute(name: str, dtype: str = AUTO, atrous: str = AUTO, platform: str | None = None) -> tuple[str, str]:
    """The (dtype, atrous) network ``name`` is built with: explicit values as given, ``"auto"`` as
    ``PLATFORM_COMPUTE`` of ``platform`` (default: this process's ``jax.default_backend()``; a
    platform not listed gets the CPU's, the references' numerics). Families without the atrous
    option always get "dilated"."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    platform = PLATFORM_ALIASES.get(str(platform).lower(), str(platform).lower())
    auto_dtype, auto_atrous = PLATFORM_COMPUTE.get(platform, PLATFORM_COMPUTE["cpu"])
    if name not in ATROUS_FAMILIES:
        auto_atrous = "dilated"
    return (auto_dtype if dtype == AUTO else dtype), (auto_atrous if atrous == AUTO else atrous)


def get_model(name: str, num_classes: int, **options) -> nn.Module:
    """Builds the registered network `name` (see MODELS) with `num_classes` outputs; ``dtype`` /
    ``atrous`` "auto" are this platform's (:func:`resolve_compute`)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if AUTO in (options.get("dtype"), options.get("atrous")):
        dtype, atrous = resolve_compute(name, options.get("dtype", "float32"), options.get("atrous", "dilated"))
        options.update(dtype=dtype, atrous=atrous)
    if isinstance(options.get("dtype"), str):
        options["dtype"] = DTYPES[options["dtype"]]
    if name not in ATROUS_FAMILIES and "atrous" in options:  # their convolutions have no such option
        if check_atrous(options.pop("atrous")) != "dilated":
            raise ValueError(f"atrous='space_to_batch' is not available for {name!r}; "
                             f"it is for {sorted(ATROUS_FAMILIES)}")
    return MODELS[name](num_classes, **options)
