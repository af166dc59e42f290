"""Converts PyTorch / MXNet checkpoints into weights files for ``cbst_jax.models`` (the library of
``cbst-convert-weights``, ``cbst_jax.cli.convert_weights``, whose help lists the kinds).

The result records the architecture, the class count (none when the head is freshly initialised:
a backbone-only init), the input normalisation the weights expect and, for 19/16/13 classes, the
class names and palette (``cbst_jax.models.read_metadata``). Heads absent from the checkpoint or
trained for another class count are initialised fresh (a seed); any other missing, unexpected or
mis-shaped key is an error (:class:`ConvertError`, one line). The torch kinds need PyTorch,
imported here only when used; checkpoints load with ``torch.load(..., weights_only=True)``, so a
pickle holding anything but tensors is refused; ``.safetensors`` files are read with the
``safetensors`` package (no pickle). The MiT kinds read the variant (B0..B5) off the checkpoint
when no model is named (:func:`mit_model_name`).
"""
import os
import pickle
import re
import struct
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cbst_jax import models
from cbst_jax.models import importers
from cbst_jax.models.mxnet_params import load_mxnet_params

KINDS = {
    # kind: (default model, normalization the weights expect)
    "torchvision-resnet101": ("deeplabv2_resnet101", "imagenet"),
    "deeplab-init": ("deeplabv2_resnet101", "caffe"),
    "torchvision-vgg16": ("fcn8s_vgg16", "imagenet"),
    "mxnet-resnet38": ("resnet38", "imagenet"),
    # None: the MiT variant is read off the checkpoint (mit_model_name)
    "mit": (None, "imagenet"),
    "hf-segformer": (None, "imagenet"),
    "mmseg-daformer": (None, "imagenet"),
}
# the decoder each MiT kind's default model has
MIT_DECODERS = {"mit": "daformer", "hf-segformer": "segformer", "mmseg-daformer": "daformer"}


class ConvertError(ValueError):
    """An input the converter cannot use; the message is one line naming the file."""


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
    """A torch checkpoint as {name: float32 array}, unwrapping {'state_dict': ...}."""
    try:
        import torch  # the converter is the only place that imports torch
    except ImportError:
        raise ConvertError(f"{path}: reading a PyTorch checkpoint needs torch, which is not installed: "
                           f"pip install torch, or install cbst_jax with its [convert] extra") from None
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise ConvertError(f"{path}: not a PyTorch checkpoint (neither the zip format of torch.save nor a pickle)")
    try:
        with warnings.catch_warnings():  # e.g. torch's pickle-protocol notice: the error says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise ConvertError(f"{path}: refused: torch.load(weights_only=True) will not unpickle it (it holds "
                               f"Python objects besides tensors); load it in a trusted session and re-save "
                               f"torch.save(model.state_dict(), path)") from None
        raise ConvertError(f"{path}: not a PyTorch checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # zip errors, EOFError on truncated files, ...
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint, damaged or truncated? "
                           f"({_first_line(exc)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: holds a {type(state).__name__}, expected a state dict {{name: tensor}}")
    arrays = {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
    if not arrays:
        raise ConvertError(f"{path}: the checkpoint holds no tensors")
    return arrays


def is_safetensors(path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= os.path.getsize(path)


def load_safetensors(path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as {name: float32 array} (the format holds no code: nothing unpickles)."""
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConvertError(f"{path}: reading a .safetensors file needs the safetensors package, which is not "
                           f"installed: pip install safetensors") from None
    try:
        arrays = load_file(path)
    except Exception as exc:  # truncated header or data, a dtype numpy lacks (bfloat16)
        raise ConvertError(f"{path}: not a readable .safetensors file, damaged or truncated? "
                           f"({_first_line(exc)})") from None
    if not arrays:
        raise ConvertError(f"{path}: the checkpoint holds no tensors")
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_checkpoint(kind: str, path) -> dict[str, np.ndarray]:
    """The arrays of checkpoint ``path`` for ``kind``; ConvertError if it cannot be read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found")
    if kind == "hf-segformer" and is_safetensors(path):
        return load_safetensors(path)
    if kind != "mxnet-resnet38":
        return load_torch_state_dict(path)
    try:
        return load_mxnet_params(path)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: not a readable MXNet .params file ({_first_line(exc)})") from None


def to_flat(kind: str, source: dict[str, np.ndarray], module, num_classes: int):
    """Dispatches to the numpy mapping of `kind`: (flat variables, dropped, unmapped)."""
    if kind == "torchvision-resnet101":
        return importers.torch_resnet_to_flat(source)
    if kind == "deeplab-init":
        prefix = "Scale." if any(k.startswith("Scale.") for k in source) else ""
        return importers.torch_resnet_to_flat(source, prefix)
    if kind == "torchvision-vgg16":
        return importers.torchvision_vgg_to_flat(source, module.depths)
    if kind == "mxnet-resnet38":
        return importers.mxnet_resnet38_to_flat(source, num_classes)
    if kind == "mit":
        return importers.mit_to_flat(source)
    if kind == "hf-segformer":
        return importers.hf_segformer_to_flat(source)
    if kind == "mmseg-daformer":
        return importers.mmseg_daformer_to_flat(source)
    raise KeyError(f"unknown kind {kind!r}; known: {sorted(KINDS)}")


def mit_model_name(kind: str, flat) -> str:
    """The registered MiT network of a MiT checkpoint's variant (widths of the patch embeddings,
    blocks per stage) with ``kind``'s decoder, e.g. ``daformer_mit_b5``."""
    from cbst_jax.models.mit import MIT_VARIANTS

    widths, depths = [], []
    for s in range(1, 5):
        kernel = flat.get(("params", "backbone", f"patch_embed{s}", "proj", "kernel"))
        widths.append(None if kernel is None else int(kernel.shape[-1]))
        depths.append(len({k[2] for k in flat if len(k) > 2 and k[1] == "backbone"
                           and re.fullmatch(rf"block{s}_\d+", k[2])}))
    for variant, spec in MIT_VARIANTS.items():
        if tuple(widths) == spec["widths"] and tuple(depths) == spec["depths"]:
            return f"{MIT_DECODERS[kind]}_mit_{variant}"
    raise ConvertError(f"not a MiT-B0..B5 checkpoint (widths {widths}, blocks per stage {depths}); "
                       f"pass --model for another layout")


def convert(kind: str, source: dict[str, np.ndarray], num_classes: int, model: str | None = None,
            seed: int = 0):
    """(variables, metadata) for `model` from a loaded checkpoint `source`; the metadata is
    ready for `models.save_variables` (num_classes None when a head was initialised fresh)."""
    normalization = KINDS[kind][1]
    if kind in MIT_DECODERS:  # the mappings do not depend on the module
        flat, dropped, unmapped = to_flat(kind, source, None, num_classes)
        model = model or mit_model_name(kind, flat)
        module = models.get_model(model, num_classes, normalization=normalization)
    else:
        model = model or KINDS[kind][0]
        module = models.get_model(model, num_classes, normalization=normalization)
        flat, dropped, unmapped = to_flat(kind, source, module, num_classes)
    probe = jnp.zeros((1, 32, 32, 3), jnp.uint8)
    template = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(seed), probe))
    fresh = None
    needed = [k for k, v in template.items()
              if k[1] in module.head_names and (k not in flat or flat[k].shape != v.shape)]
    if needed:  # any other problem is an error: raise it before initialising anything
        placeholder = {k: np.zeros(template[k].shape, np.float32) for k in needed}
        importers.restore(template, flat, module.head_names, placeholder, unmapped)
        # Only heads are taken from a fresh init: the program returns just those leaves, so XLA drops
        # the rest of the initialisation (the values are the full init's). rbg keys compile ~3x
        # faster than threefry on CPU.
        def head_init(key, x):
            variables = traverse_util.flatten_dict(module.init(key, x))
            return {"/".join(k): variables[k] for k in needed}

        fresh = jax.device_get(jax.jit(head_init)(jax.random.key(seed, impl="rbg"), probe))
        fresh = {tuple(k.split("/")): v for k, v in fresh.items()}
    restored = importers.restore(template, flat, module.head_names, fresh, unmapped)
    head_fresh = sorted({k[1] for k in restored if k[1] in module.head_names and
                         (k not in flat or flat[k].shape != restored[k].shape)})
    meta = models.make_metadata(model, None if head_fresh else num_classes, normalization, kind=kind,
                                fresh_heads=head_fresh, head_classes=num_classes, dropped=len(dropped),
                                seed=seed)
    return traverse_util.unflatten_dict(restored), meta
