"""Converts PyTorch / MXNet checkpoints into `.npz` variables for `cbst_jax.models`.

  python -m cbst_jax.convert_weights KIND IN OUT [--num-classes 19] [--model NAME] [--seed 0]

KINDs (default target model in brackets):
  torchvision-resnet101  torchvision ImageNet ResNet-101 state dict   [deeplabv2_resnet101]
  deeplab-init           Caffe-converted DeepLab-v2 init (`Scale.` keys) [deeplabv2_resnet101]
  torchvision-vgg16      torchvision ImageNet VGG16 state dict       [fcn8s_vgg16]
  mxnet-resnet38         CBST MXNet ResNet-38 `.params` (ImageNet or source model) [resnet38]

Heads absent from the checkpoint or trained for another class count are initialised fresh
(seed `--seed`); any other missing, unexpected or mis-shaped key is an error. torch is
imported here only, and loads with `weights_only=True`.
"""
import argparse
import sys

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
}


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
    """A torch checkpoint as {name: float32 array}, unwrapping {'state_dict': ...}."""
    import torch  # the converter is the only place that imports torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


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
    raise KeyError(f"unknown kind {kind!r}; known: {sorted(KINDS)}")


def convert(kind: str, source: dict[str, np.ndarray], num_classes: int, model: str | None = None,
            seed: int = 0):
    """(variables, metadata) for `model` from a loaded checkpoint `source`."""
    model = model or KINDS[kind][0]
    normalization = KINDS[kind][1]
    module = models.get_model(model, num_classes, normalization=normalization)
    flat, dropped, unmapped = to_flat(kind, source, module, num_classes)
    probe = jnp.zeros((1, 32, 32, 3), jnp.uint8)
    template = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(seed), probe))
    fresh = None
    if any(k not in flat or flat[k].shape != v.shape for k, v in template.items()):
        # rbg keys compile ~3x faster than threefry on CPU; only heads are taken from here.
        fresh = jax.jit(module.init)(jax.random.key(seed, impl="rbg"), probe)
        fresh = traverse_util.flatten_dict(jax.device_get(fresh))
    restored = importers.restore(template, flat, module.head_names, fresh, unmapped)
    head_fresh = sorted({k[1] for k in restored if k[1] in module.head_names and
                         (k not in flat or flat[k].shape != restored[k].shape)})
    meta = dict(kind=kind, model=model, num_classes=num_classes, normalization=normalization,
                fresh_heads=",".join(head_fresh), dropped=len(dropped))
    return traverse_util.unflatten_dict(restored), meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--model", default=None, help="target model (default: the kind's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of freshly initialised heads")
    args = parser.parse_args(argv)
    if args.kind == "mxnet-resnet38":
        source = load_mxnet_params(args.input)
    else:
        source = load_torch_state_dict(args.input)
    variables, meta = convert(args.kind, source, args.num_classes, args.model, args.seed)
    models.save_variables(args.output, variables, meta)
    n = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
    print(f"{args.output}: {meta['model']} with {n:,} params, normalization={meta['normalization']!r}, "
          f"fresh heads: {meta['fresh_heads'] or 'none'}, dropped {meta['dropped']} checkpoint entries",
          file=sys.stderr)


if __name__ == "__main__":
    main()
