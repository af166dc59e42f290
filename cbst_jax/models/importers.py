"""Pure-numpy mappings from PyTorch / MXNet checkpoints to this package's variables.

Each `*_to_flat` function maps a {name: np.ndarray} checkpoint to
{('params' | 'batch_stats', module, ..., leaf): array} and returns the names it dropped
on purpose (ImageNet classifiers, `num_batches_tracked`). `restore` then checks the result
against the model's variable shapes and fills the (class-count dependent) head from a
fresh initialisation when the checkpoint has none or a different class count.
"""
import re

import numpy as np

FlatVariables = dict[tuple[str, ...], np.ndarray]


class WeightMismatchError(ValueError):
    """Checkpoint and model disagree. The message is one line (at most SHOWN keys per kind);
    the attributes hold every offending key."""

    SHOWN = 8

    def __init__(self, missing=(), unexpected=(), shape_mismatches=()):
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatches", shape_mismatches)):
            if items:
                items = list(items)
                shown = ", ".join(items[:self.SHOWN])
                more = f" and {len(items) - self.SHOWN} more" if len(items) > self.SHOWN else ""
                parts.append(f"{title} ({len(items)}): {shown}{more}")
        super().__init__("checkpoint does not match the model: " + "; ".join(parts))
        self.missing, self.unexpected, self.shape_mismatches = list(missing), list(unexpected), list(shape_mismatches)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch/MXNet OIHW conv (or IOHW transposed-conv) weight -> Flax HW-IO (HW-OI)."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _torch_leaf(tokens: list[str], w: np.ndarray):
    """Maps a torch leaf name + array to (collection, leaf, array): a 4-D weight is a
    convolution (OIHW -> HWIO), a 2-D one a Linear ((out, in) -> Dense kernel (in, out)), a 1-D
    one a BatchNorm / LayerNorm scale."""
    leaf = tokens[-1]
    if leaf == "running_mean":
        return "batch_stats", "mean", w
    if leaf == "running_var":
        return "batch_stats", "var", w
    if leaf == "weight":
        if w.ndim == 4:
            return "params", "kernel", _conv_kernel(w)
        if w.ndim == 2:
            return "params", "kernel", np.ascontiguousarray(w.T)
        return "params", "scale", w
    if leaf == "bias":
        return "params", "bias", w
    raise KeyError(leaf)


def _tokens(key: str) -> list[str]:
    """`layer3.5.conv2.weight` -> ['layer3_5', 'conv2', 'weight']: integer tokens join the previous one."""
    tokens = []
    for t in key.split("."):
        if t.isdigit() and tokens:
            tokens[-1] += f"_{t}"
        else:
            tokens.append(t)
    return tokens


def torch_to_flat(state: dict[str, np.ndarray], prefix: str = "",
                  skip: str = r"(^|\.)num_batches_tracked$") -> tuple[FlatVariables, list[str], list[str]]:
    """Generic torch -> Flax rename: `layer3.5.downsample.1.running_var` ->
    ('batch_stats', 'layer3_5', 'downsample_1', 'var'); integer tokens join the previous one.

    Returns (flat variables, dropped names, names that could not be mapped)."""
    renamed, dropped = {}, []
    for name, w in state.items():
        key = name[len(prefix):] if prefix and name.startswith(prefix) else name
        if re.search(skip, key):
            dropped.append(name)
        else:
            renamed[key] = (name, w)
    flat, bad = _renamed_to_flat(renamed)
    return flat, dropped, bad


def torch_resnet_to_flat(state, prefix: str = ""):
    """torchvision `resnet101` or Caffe DeepLab-v2 (`Scale.`-prefixed) state dict -> DeepLabV2."""
    return torch_to_flat(state, prefix, skip=r"(^|\.)num_batches_tracked$|^fc\.")


def torchvision_vgg_to_flat(state, depths=(2, 2, 3, 3, 3)):
    """torchvision `vgg16` state dict -> FCN8s backbone: features.N -> convS_I, classifier
    0/3 -> fc6/fc7 as convolutions (fc6 (out, C*k*k) -> (k, k, C, out)); classifier.6 dropped."""
    conv_names, index = {}, 0
    for s, depth in enumerate(depths):
        for i in range(depth):
            conv_names[index] = f"conv{s + 1}_{i + 1}"
            index += 2  # conv, relu
        index += 1  # max-pool
    last_width = None
    flat, dropped, bad = {}, [], []
    for name, w in state.items():
        w = np.asarray(w)
        m = re.fullmatch(r"features\.(\d+)\.(weight|bias)", name)
        if m and int(m[1]) in conv_names:
            module = conv_names[int(m[1])]
            flat[("params", module, "kernel" if m[2] == "weight" else "bias")] = (
                _conv_kernel(w) if m[2] == "weight" else w)
            if m[2] == "weight":
                last_width = w.shape[0]
            continue
        m = re.fullmatch(r"classifier\.(\d)\.(weight|bias)", name)
        if m and m[1] in ("0", "3"):
            module = "fc6" if m[1] == "0" else "fc7"
            if m[2] == "bias":
                flat[("params", module, "bias")] = w
            else:
                flat[("params", module, "kernel")] = w  # reshaped below, once widths are known
            continue
        if m and m[1] == "6":
            dropped.append(name)
            continue
        bad.append(name)
    for module, c_in in (("fc6", last_width), ("fc7", None)):
        key = ("params", module, "kernel")
        if key in flat:
            w = flat[key]
            c = c_in if c_in is not None else w.shape[1]
            k = int(round(np.sqrt(w.shape[1] // c)))
            if c * k * k != w.shape[1]:
                bad.append(f"classifier weight {module} {w.shape} does not fold into {c} channels")
                del flat[key]
                continue
            flat[key] = _conv_kernel(w.reshape(w.shape[0], c, k, k))
    return flat, dropped, bad


_MXNET_LEAVES = {"weight": ("params", "kernel"), "bias": ("params", "bias"),
                 "gamma": ("params", "scale"), "beta": ("params", "bias"),
                 "moving_mean": ("batch_stats", "mean"), "moving_var": ("batch_stats", "var")}


def mxnet_resnet38_to_flat(arrays: dict[str, np.ndarray], num_classes: int):
    """CBST MXNet ResNet-38 (`arg:res4b3_branch2b1_weight`, `aux:bn7_moving_var`, ...) -> ResNet38.

    `linear1000` (ImageNet classifier) and `linear{C}` heads for another class count are
    dropped; `linear{num_classes}` maps to the module `linear`."""
    flat, dropped, bad = {}, [], []
    for name, w in arrays.items():
        key = name.split(":", 1)[1] if name[:4] in ("arg:", "aux:") else name
        m = re.fullmatch(r"(.+?)_(weight|bias|gamma|beta|moving_mean|moving_var)", key)
        if not m:
            bad.append(name)
            continue
        module, (collection, leaf) = m[1], _MXNET_LEAVES[m[2]]
        head = re.fullmatch(r"linear(\d+)", module)
        if head:
            if int(head[1]) != num_classes:
                dropped.append(name)
                continue
            module = "linear"
        w = np.asarray(w, np.float32)
        if leaf == "kernel" and w.ndim != 4:
            bad.append(f"{name} {w.shape} (expected a 4-D convolution weight)")
            continue
        flat[(collection, module, leaf)] = _conv_kernel(w) if leaf == "kernel" else w
    return flat, dropped, bad


def _renamed_to_flat(renamed: dict[str, tuple[str, np.ndarray]]):
    """{torch-style name in the model's layout: (name in the checkpoint, array)} -> (flat
    variables, checkpoint names that could not be mapped)."""
    flat, bad = {}, []
    for key, (name, w) in renamed.items():
        tokens = _tokens(key)
        try:
            collection, leaf, value = _torch_leaf(tokens, np.asarray(w))
        except KeyError:
            bad.append(name)
            continue
        flat[(collection, *tokens[:-1], leaf)] = value
    return flat, bad


def _mit_key(key: str) -> str:
    """A MiT encoder name of the published layout (``block1.0.mlp.dwconv.dwconv.weight``) in
    ``SegFormer``'s: under ``backbone``, the depthwise conv of the Mix-FFN one level up."""
    return "backbone." + key.replace(".mlp.dwconv.dwconv.", ".mlp.dwconv.")


_DROPPED = r"(^|\.)num_batches_tracked$"


def mit_to_flat(state: dict[str, np.ndarray]):
    """A published MiT ImageNet encoder (NVlabs/SegFormer and mmseg ``mit_b0.pth`` ..
    ``mit_b5.pth``: ``patch_embed1.proj.weight``, ``block3.17.attn.kv.weight``, ``norm4.bias``)
    -> ``SegFormer``'s ``backbone``; ``head.*`` (the ImageNet classifier) is dropped."""
    renamed, dropped = {}, []
    for name, w in state.items():
        if name.startswith("head.") or re.search(_DROPPED, name):
            dropped.append(name)
        else:
            renamed[_mit_key(name)] = (name, w)
    flat, bad = _renamed_to_flat(renamed)
    return flat, dropped, bad


def _index_plus_one(prefix: str):
    return lambda m: f"{prefix}{int(m[1]) + 1}."


# transformers' SegFormer names -> the published MiT / SegFormer-head names. Both layouts: the
# checkpoints' (transformers < 5 and the Hub files: ``encoder.block.2.17.attention.self.key``) and
# transformers 5's module names (``stages.2.blocks.17.attention.k_proj``, what its state_dict()
# returns). Keys and values are separate linears there; they are fused into ``attn.kv`` below.
_HF_RENAMES = [
    (r"^segformer\.", ""),
    (r"^encoder\.patch_embeddings\.(\d+)\.", _index_plus_one("patch_embed")),
    (r"^stages\.(\d+)\.patch_embeddings\.", _index_plus_one("patch_embed")),
    (r"^encoder\.block\.(\d+)\.", _index_plus_one("block")),
    (r"^stages\.(\d+)\.blocks\.", _index_plus_one("block")),
    (r"^encoder\.layer_norm\.(\d+)\.", _index_plus_one("norm")),
    (r"^stages\.(\d+)\.layer_norm\.", _index_plus_one("norm")),
    (r"^(patch_embed\d+)\.layer_norm\.", r"\1.norm."),
    (r"\.(layer_norm_1|layernorm_before)\.", ".norm1."),
    (r"\.(layer_norm_2|layernorm_after)\.", ".norm2."),
    (r"\.attention\.(self\.query|q_proj)\.", ".attn.q."),
    (r"\.attention\.(self\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(self\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(self\.sr|sequence_reduction\.sequence_reduction)\.", ".attn.sr."),
    (r"\.attention\.(self\.layer_norm|sequence_reduction\.layer_norm)\.", ".attn.norm."),
    (r"\.attention\.(output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
]


def hf_segformer_to_flat(state: dict[str, np.ndarray]):
    """A transformers SegFormer state dict (``SegformerForSemanticSegmentation``,
    ``SegformerModel`` or ``SegformerForImageClassification``, e.g. the ``nvidia/segformer-b*``
    and ``nvidia/mit-b*`` files) -> ``SegFormer`` (encoder, and the all-MLP head where present);
    an image classifier (``classifier.*`` without ``decode_head``) is dropped."""
    renamed, dropped, kv = {}, [], {}
    for name, w in state.items():
        key = name
        for pattern, repl in _HF_RENAMES:
            key = re.sub(pattern, repl, key)
        if re.search(_DROPPED, key) or key.startswith("classifier."):
            dropped.append(name)
        elif re.match(r"(patch_embed|block|norm)\d", key):
            m = re.fullmatch(r"(.+\.attn\.)([kv])\.(weight|bias)", key)
            if m:
                kv.setdefault((m[1] + "kv." + m[3]), {})[m[2]] = (name, w)
            else:
                renamed[_mit_key(key)] = (name, w)
        else:
            renamed[key] = (name, w)
    for key, parts in kv.items():
        if set(parts) == {"k", "v"}:  # the fused projection: keys' outputs first, then values'
            renamed[_mit_key(key)] = (parts["k"][0], np.concatenate([parts["k"][1], parts["v"][1]], axis=0))
        else:
            renamed.update({_mit_key(key).replace(".kv.", f".{p}."): item for p, item in parts.items()})
    flat, bad = _renamed_to_flat(renamed)
    return flat, dropped, bad


def mmseg_daformer_to_flat(state: dict[str, np.ndarray]):
    """An mmseg EncoderDecoder with DAFormer's head (lhoyer/DAFormer: ``backbone.*`` = the MiT
    encoder, ``decode_head.embed_layers.0.proj``, ``decode_head.fuse_layer.aspp_modules.1.
    depthwise_conv.conv``, ``decode_head.conv_seg``) -> ``SegFormer(decoder="daformer")``.
    DAFormer's UDA checkpoints hold the trained network under ``model.``; the EMA teacher
    (``ema_model.*``) and the frozen ImageNet encoder of the feature distance (``imnet_model.*``)
    are dropped."""
    renamed, dropped = {}, []
    for name, w in state.items():
        key = name[len("model."):] if name.startswith("model.") else name
        if name.startswith(("ema_model.", "imnet_model.")) or re.search(_DROPPED, key):
            dropped.append(name)
        elif key.startswith("backbone."):
            renamed[_mit_key(key[len("backbone."):])] = (name, w)
        else:
            renamed[key] = (name, w)
    flat, bad = _renamed_to_flat(renamed)
    return flat, dropped, bad


def restore(template: FlatVariables, flat: FlatVariables, head_names=(), fresh: FlatVariables | None = None,
            unmapped=()) -> FlatVariables:
    """Checks `flat` against `template` ({key: shape-bearing leaf}) and completes it.

    Head modules (top-level names in `head_names`) may be missing or have a different
    shape (other class count): they come from `fresh`. Anything else missing, unexpected
    or mis-shaped raises WeightMismatchError listing all problems."""
    is_head = lambda key: key[1] in head_names
    out, missing, unexpected, mismatched = {}, [], list(unmapped), []
    for key, value in flat.items():
        name = "/".join(key)
        if key not in template:
            unexpected.append(name)
        elif tuple(value.shape) != tuple(template[key].shape):
            if not is_head(key):
                mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(template[key].shape)}")
        else:
            out[key] = np.asarray(value, np.float32)
    for key in template:
        if key in out:
            continue
        if is_head(key) and fresh is not None:
            out[key] = np.asarray(fresh[key], np.float32)
        elif not any(m.startswith("/".join(key) + ":") for m in mismatched):
            missing.append("/".join(key))
    if missing or unexpected or mismatched:
        raise WeightMismatchError(missing, unexpected, mismatched)
    return out
