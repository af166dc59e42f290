"""The transformer networks (MiT encoder, SegFormer and DAFormer heads) against the published
implementations: transformers' SegFormer as the oracle (random init, B0 and a reduced B5-like
configuration), a PyTorch re-statement of the published MiT (NVlabs / mmseg key layout, the
``mit_b*.pth`` files) and of DAFormer's head (lhoyer/DAFormer ``daformer_head.py`` with mmcv's
``ConvModule`` / ``DepthwiseSeparableConvModule``), written here; the weight converters, the
parameter groups and a converted checkpoint through ``cbst-infer`` at 1024x2048."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from cbst_jax import models
from cbst_jax.cli import convert_weights
from cbst_jax.models import importers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
nn = torch.nn
F = torch.nn.functional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_models import PARAM_COUNTS_19  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
B0 = dict(widths=(32, 64, 160, 256), depths=(2, 2, 2, 2), embed_dim=256)
# B5's structure (heads 1/2/5/8, reductions 8/4/2/1, a deep third stage, a wide decoder) at a
# quarter of its widths and fewer blocks; stage 3's 11 blocks give two-digit block names
B5_LIKE = dict(widths=(16, 32, 80, 128), depths=(2, 3, 11, 2), embed_dim=192)
HW = (72, 100)  # stage maps 18x25, 9x13, 5x7, 3x4: ceil sizes and non-integer resize ratios


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def images(n=2, hw=HW, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, *hw, 3)).astype(np.uint8)


def torch_input(img):
    return torch.from_numpy(((img / 255.0 - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2))


def nchw_to_nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def randomize(module, seed):
    """Noise on every parameter (transformers initialises norms to 1/0 and biases to 0, which would
    leave their mapping untested) and random BN statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 0.02))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module.eval()


def numpy_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def hf_config(widths, depths, embed_dim, num_labels=19):
    return transformers.SegformerConfig(hidden_sizes=list(widths), depths=list(depths),
                                        decoder_hidden_size=embed_dim, num_labels=num_labels)


def variables_for(module, flat, hw=HW):
    template = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0),
                                                         jax.ShapeDtypeStruct((1, *hw, 3), jnp.uint8)))
    return traverse_util.unflatten_dict(importers.restore(template, flat, module.head_names))


def random_variables(module, hw, seed=0):
    """Variables of ``module`` with random values, without compiling its (slow) initialiser."""
    rng = np.random.default_rng(seed)
    template = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0),
                                                         jax.ShapeDtypeStruct((1, *hw, 3), jnp.uint8)))
    return traverse_util.unflatten_dict({
        k: (1 + 0.1 * np.abs(rng.normal(size=v.shape)) if k[-1] in ("scale", "var") else
            0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in template.items()})


def logits_and_features(module, variables, img):
    """One jitted apply: the logits and the encoder's four feature maps."""
    fn = jax.jit(lambda v, x: module.apply(v, x, capture_intermediates=lambda m, _: m.name == "backbone"))
    logits, inter = fn(variables, img)
    return np.asarray(logits), [np.asarray(f) for f in inter["intermediates"]["backbone"]["__call__"][0]]


# ----------------------------------------------------------------------------- PyTorch re-statements
class TorchMiT(nn.Module):
    """The published MiT (NVlabs/SegFormer ``mix_transformer.py``, as in mmseg and lhoyer/DAFormer)
    with its state-dict names: ``patch_embed{s}.proj/norm``, ``block{s}.{i}.norm1/attn.q/attn.kv/
    attn.sr/attn.norm/attn.proj/norm2/mlp.fc1/mlp.dwconv.dwconv/mlp.fc2``, ``norm{s}``. Block and
    stage norms use ``eps`` (1e-6 published), the patch and reduction norms torch's 1e-5."""

    def __init__(self, widths, depths, eps=1e-6, heads=(1, 2, 5, 8), srs=(8, 4, 2, 1)):
        super().__init__()
        self.depths, self.heads, self.srs = depths, heads, srs
        cin = 3
        for s, (w, d) in enumerate(zip(widths, depths), 1):
            k, stride = (7, 4) if s == 1 else (3, 2)
            pe = nn.Module()
            pe.proj, pe.norm = nn.Conv2d(cin, w, k, stride, k // 2), nn.LayerNorm(w)
            setattr(self, f"patch_embed{s}", pe)
            blocks = nn.ModuleList()
            for _ in range(d):
                b = nn.Module()
                b.norm1, b.norm2 = nn.LayerNorm(w, eps=eps), nn.LayerNorm(w, eps=eps)
                b.attn = nn.Module()
                b.attn.q, b.attn.kv, b.attn.proj = nn.Linear(w, w), nn.Linear(w, 2 * w), nn.Linear(w, w)
                if srs[s - 1] > 1:
                    b.attn.sr, b.attn.norm = nn.Conv2d(w, w, srs[s - 1], srs[s - 1]), nn.LayerNorm(w)
                b.mlp = nn.Module()
                b.mlp.fc1, b.mlp.fc2 = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)
                b.mlp.dwconv = nn.Module()
                b.mlp.dwconv.dwconv = nn.Conv2d(4 * w, 4 * w, 3, 1, 1, groups=4 * w)
                blocks.append(b)
            setattr(self, f"block{s}", blocks)
            setattr(self, f"norm{s}", nn.LayerNorm(w, eps=eps))
            cin = w

    @staticmethod
    def attention(a, x, h, w, heads, sr):
        n, t, c = x.shape
        q = a.q(x).reshape(n, t, heads, c // heads).permute(0, 2, 1, 3)
        if sr > 1:
            x = a.norm(a.sr(x.permute(0, 2, 1).reshape(n, c, h, w)).reshape(n, c, -1).permute(0, 2, 1))
        kv = a.kv(x).reshape(n, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ kv[0].transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
        return a.proj((attn @ kv[1]).transpose(1, 2).reshape(n, t, c))

    @staticmethod
    def mix_ffn(m, x, h, w):
        x = m.fc1(x)
        n, t, c = x.shape
        x = m.dwconv.dwconv(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
        return m.fc2(F.gelu(x))

    def forward(self, x):
        outs = []
        for s in range(1, 5):
            pe = getattr(self, f"patch_embed{s}")
            x = pe.proj(x)
            n, _, h, w = x.shape
            x = pe.norm(x.flatten(2).transpose(1, 2))
            for b in getattr(self, f"block{s}"):
                x = x + self.attention(b.attn, b.norm1(x), h, w, self.heads[s - 1], self.srs[s - 1])
                x = x + self.mix_ffn(b.mlp, b.norm2(x), h, w)
            x = getattr(self, f"norm{s}")(x).reshape(n, h, w, -1).permute(0, 3, 1, 2)
            outs.append(x)
        return outs


def conv_module(cin, cout, k, dilation=1, groups=1):
    """mmcv ConvModule(norm_cfg=BN, act_cfg=ReLU): ``conv`` (no bias: a norm follows), ``bn``."""
    m = nn.Module()
    m.conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, groups=groups, bias=False)
    m.bn = nn.BatchNorm2d(cout)
    m.forward = lambda x: F.relu(m.bn(m.conv(x)))
    return m


class TorchDAFormerHead(nn.Module):
    """DAFormer's head as lhoyer/DAFormer builds it for ``daformer_sepaspp_mitb5``: ``embed_layers``
    ('mlp': a Linear ``proj`` per stage, no norm or activation), resized to stage 1 (bilinear,
    align_corners=False) and concatenated in stage order; ``fuse_layer`` = ASPPWrapper(sep=True,
    dilations (1, 6, 12, 18), pool=False): ``aspp_modules`` (a 1x1 ConvModule for dilation 1,
    DepthwiseSeparableConvModule = ``depthwise_conv`` ConvModule(groups=C) + ``pointwise_conv``
    1x1 ConvModule otherwise), concatenated, ``bottleneck`` 3x3 ConvModule; Dropout2d(0.1);
    ``conv_seg``."""

    def __init__(self, widths, num_classes, embed=256, channels=256, dilations=(1, 6, 12, 18)):
        super().__init__()
        self.embed_layers = nn.ModuleDict()
        for i, w in enumerate(widths):
            layer = nn.Module()
            layer.proj = nn.Linear(w, embed)
            self.embed_layers[str(i)] = layer
        cin = embed * len(widths)
        self.fuse_layer = nn.Module()
        self.fuse_layer.aspp_modules = nn.ModuleList()
        for d in dilations:
            if d == 1:
                self.fuse_layer.aspp_modules.append(conv_module(cin, channels, 1))
            else:
                sep = nn.Module()
                sep.depthwise_conv = conv_module(cin, cin, 3, dilation=d, groups=cin)
                sep.pointwise_conv = conv_module(cin, channels, 1)
                self.fuse_layer.aspp_modules.append(sep)
        self.fuse_layer.bottleneck = conv_module(len(dilations) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        embedded = []
        for i, f in enumerate(feats):
            n, _, h, w = f.shape
            e = self.embed_layers[str(i)].proj(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)
            embedded.append(F.interpolate(e, size=size, mode="bilinear", align_corners=False) if (h, w) != size else e)
        x = torch.cat(embedded, 1)
        outs = []
        for m in self.fuse_layer.aspp_modules:
            outs.append(m.pointwise_conv(m.depthwise_conv(x)) if hasattr(m, "pointwise_conv") else m(x))
        return self.conv_seg(self.dropout(self.fuse_layer.bottleneck(torch.cat(outs, 1))))


def hub_to_published(hub: dict) -> dict:
    """transformers' checkpoint names (what ``save_pretrained`` writes) -> the published MiT names,
    keys and values fused into ``kv``: the test's own rename, to load the oracle's weights into
    the re-statement."""
    import re
    out, kv = {}, {}
    for name, w in hub.items():
        m = re.match(r"segformer\.encoder\.(patch_embeddings|block|layer_norm)\.(\d+)\.(.*)", name)
        if not m:
            continue
        s, rest = int(m[2]) + 1, m[3]
        if m[1] == "patch_embeddings":
            out[f"patch_embed{s}.{rest.replace('layer_norm', 'norm')}"] = w
        elif m[1] == "layer_norm":
            out[f"norm{s}.{rest}"] = w
        else:
            i, rest = rest.split(".", 1)
            for a, b in (("layer_norm_1", "norm1"), ("layer_norm_2", "norm2"), ("attention.self.query", "attn.q"),
                         ("attention.self.sr", "attn.sr"), ("attention.self.layer_norm", "attn.norm"),
                         ("attention.output.dense", "attn.proj"), ("mlp.dense1", "mlp.fc1"),
                         ("mlp.dense2", "mlp.fc2")):
                rest = rest.replace(a, b)
            key = f"block{s}.{i}.{rest}"
            if ".attention.self.key." in key or ".attention.self.value." in key:
                part, leaf = ("k" if ".key." in key else "v"), key.rsplit(".", 1)[1]
                kv.setdefault(f"block{s}.{i}.attn.kv.{leaf}", {})[part] = w
            else:
                out[key] = w
    for key, parts in kv.items():
        out[key] = np.concatenate([parts["k"], parts["v"]], axis=0)
    return out


# ----------------------------------------------------------------------------- references, one per kind
@pytest.fixture(scope="module")
def hf_b0(tmp_path_factory):
    """transformers' SegFormer-B0, random weights and BN statistics, 19 classes; its checkpoint as
    ``save_pretrained`` writes it (the Hub layout, safetensors)."""
    torch.manual_seed(0)
    ref = randomize(transformers.SegformerForSemanticSegmentation(hf_config(**B0)), 1)
    folder = tmp_path_factory.mktemp("hf_b0")
    ref.save_pretrained(folder)
    return ref, folder / "model.safetensors"


@pytest.fixture(scope="module")
def published_b0(hf_b0):
    """The published MiT-B0 layout holding the oracle's encoder weights, and DAFormer's head."""
    torch.manual_seed(2)
    mit = TorchMiT(B0["widths"], B0["depths"]).eval()
    mit.load_state_dict({k: torch.from_numpy(v) for k, v in
                         hub_to_published(safetensors_numpy.load_file(hf_b0[1])).items()})
    head = randomize(TorchDAFormerHead(B0["widths"], 19), 3)
    return mit, head


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("config", ["b0", "b5_like"])
def test_segformer_matches_transformers(config, hf_b0):
    """Encoder features at every stage and the all-MLP head's logits, eval mode; the weights come
    from transformers' own state_dict() (its module names, transformers >= 5) through the
    ``hf-segformer`` mapping. LayerNorm eps as transformers (1e-5 throughout)."""
    if config == "b0":
        ref, spec = hf_b0[0], B0
    else:
        torch.manual_seed(4)
        spec = B5_LIKE
        ref = randomize(transformers.SegformerForSemanticSegmentation(hf_config(**spec, num_labels=7)), 5)
    img = images()
    with torch.no_grad():
        out = ref(torch_input(img), output_hidden_states=True)
    flat, dropped, bad = importers.hf_segformer_to_flat(numpy_state(ref))
    assert not bad and dropped == ["decode_head.batch_norm.num_batches_tracked"]
    module = models.get_model("segformer_mit_b0", ref.config.num_labels, layer_norm_epsilon=1e-5, **spec)
    logits, features = logits_and_features(module, variables_for(module, flat), img)
    errors = [rel(f, nchw_to_nhwc(h)) for f, h in zip(features, out.hidden_states)]
    errors.append(rel(logits, nchw_to_nhwc(out.logits)))
    assert logits.shape == (2, 18, 25, ref.config.num_labels)
    print(f"\nparity {config} vs transformers, relative L2 error: stages 1-4 "
          f"{', '.join(f'{e:.1e}' for e in errors[:4])}, logits {errors[4]:.1e}")
    assert max(errors) <= 1e-4, errors
    if config == "b0":  # as registered (the published eps 1e-6), which is how infer runs these weights
        published, _ = logits_and_features(module.clone(layer_norm_epsilon=1e-6), variables_for(module, flat), img)
        print(f"parity b0 at the published LayerNorm eps 1e-6, logits: {rel(published, nchw_to_nhwc(out.logits)):.1e}")
        assert rel(published, nchw_to_nhwc(out.logits)) <= 1e-4


def test_hub_checkpoint_layout_maps_like_the_module_layout(hf_b0):
    """The Hub files' names (``segformer.encoder.block.0.1.attention.self.key``, what
    ``save_pretrained`` writes) give exactly the variables of the module names."""
    ref, path = hf_b0
    hub, _, bad_hub = importers.hf_segformer_to_flat(safetensors_numpy.load_file(path))
    mod, _, bad_mod = importers.hf_segformer_to_flat(numpy_state(ref))
    assert not bad_hub and not bad_mod and set(hub) == set(mod)
    for k in hub:
        np.testing.assert_array_equal(hub[k], mod[k])


def test_published_mit_restatement_matches_transformers(hf_b0, published_b0):
    """The re-statement with the published names computes transformers' encoder (its weights
    loaded through ``hub_to_published``), at transformers' LayerNorm eps."""
    ref, mit = hf_b0[0], TorchMiT(B0["widths"], B0["depths"], eps=1e-5).eval()
    mit.load_state_dict(published_b0[0].state_dict())
    x = torch_input(images())
    with torch.no_grad():
        want = ref.segformer(x, output_hidden_states=True).hidden_states
        got = mit(x)
    errors = [rel(g.numpy(), w.numpy()) for g, w in zip(got, want)]
    print(f"\nre-statement (published names) vs transformers, relative L2 error: {max(errors):.1e}")
    assert max(errors) < 1e-5


def test_daformer_checkpoint_parity(published_b0, tmp_path):
    """A DAFormer UDA checkpoint in mmseg's layout (``model.backbone.*`` = the published MiT,
    ``model.decode_head.*`` = DAFormer's head; teacher and ImageNet copies dropped) through
    ``convert_weights mmseg-daformer``: the variant is read off the checkpoint, and the logits
    equal the re-statement's (published eps 1e-6) to <= 1e-4."""
    mit, head = published_b0
    state = {f"model.backbone.{k}": v for k, v in mit.state_dict().items()}
    state.update({f"model.decode_head.{k}": v for k, v in head.state_dict().items()})
    state.update({f"ema_model.backbone.{k}": v for k, v in mit.state_dict().items()})
    state["imnet_model.backbone.norm1.weight"] = torch.ones(32)
    torch.save({"state_dict": state}, tmp_path / "daformer.pth")
    assert convert_weights.main(["mmseg-daformer", str(tmp_path / "daformer.pth"), str(tmp_path / "d.npz")]) == 0
    meta = models.read_metadata(tmp_path / "d.npz")
    assert (meta["architecture"], meta["num_classes"], meta["normalization"]) == ("daformer_mit_b0", 19, "imagenet")
    counters = sum(k.endswith("num_batches_tracked") for k in head.state_dict())
    assert meta["fresh_heads"] == [] and meta["dropped"] == len(mit.state_dict()) + 1 + counters
    img = images(seed=1)
    with torch.no_grad():
        want = nchw_to_nhwc(head(mit(torch_input(img))))
    module = models.get_model("daformer_mit_b0", 19)
    got, _ = logits_and_features(module, models.load_variables(tmp_path / "d.npz"), img)
    print(f"\nparity DAFormer (mmseg-daformer kind) vs the re-statement, logits relative L2 error: "
          f"{rel(got, want):.1e}")
    assert rel(got, want) <= 1e-4, rel(got, want)


def test_mit_imagenet_file_converts_to_a_backbone_only_init(published_b0, tmp_path):
    """``mit_b0.pth`` as published (encoder + the ImageNet classifier ``head.*``): the variant is
    read off it, the classifier dropped, DAFormer's head fresh, the features the re-statement's."""
    mit = published_b0[0]
    state = dict(mit.state_dict(), **{"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "mit_b0.pth")
    assert convert_weights.main(["mit", str(tmp_path / "mit_b0.pth"), str(tmp_path / "mit_b0.npz")]) == 0
    meta = models.read_metadata(tmp_path / "mit_b0.npz")
    assert (meta["architecture"], meta["num_classes"], meta["fresh_heads"]) == ("daformer_mit_b0", None,
                                                                                 ["decode_head"])
    variables = models.load_variables(tmp_path / "mit_b0.npz")
    x = images(seed=2)
    with torch.no_grad():
        want = [nchw_to_nhwc(f) for f in mit(torch_input(x))]
    from cbst_jax.models.mit import MixTransformer
    got = jax.jit(MixTransformer(B0["widths"], B0["depths"]).apply)(
        {"params": variables["params"]["backbone"]}, (x / 255.0 - MEAN) / STD)
    errors = [rel(g, w) for g, w in zip(got, want)]
    print(f"\nparity mit kind vs the re-statement, relative L2 error: stages 1-4 "
          f"{', '.join(f'{e:.1e}' for e in errors)}")
    assert max(errors) <= 1e-4


def test_conversion_errors_are_one_line(published_b0, tmp_path, capsys):
    """A checkpoint of another variant, one of no MiT variant, a truncated .safetensors: one line, exit 2."""
    torch.save(published_b0[0].state_dict(), tmp_path / "mit_b0.pth")
    assert convert_weights.main(["mit", str(tmp_path / "mit_b0.pth"), str(tmp_path / "x.npz"),
                                 "--model", "daformer_mit_b1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint does not match the model: ") and \
        "shape mismatches" in err[0]
    torch.save({"patch_embed1.proj.weight": torch.zeros(8, 3, 7, 7)}, tmp_path / "odd.pth")
    assert convert_weights.main(["mit", str(tmp_path / "odd.pth"), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "odd.pth: not a MiT-B0..B5 checkpoint (widths [8, None, None, None]" in err[0]
    safetensors_numpy.save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])  # header intact, tensor data cut
    assert convert_weights.main(["hf-segformer", str(tmp_path / "cut.safetensors"), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.safetensors: not a readable .safetensors file" in err[0]
    assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------- sizes, groups, options
def test_param_counts_equal_the_references():
    """Every registered MiT network has the parameters of its PyTorch reference (built on the
    meta device): transformers' SegFormer, and its encoder + the DAFormer re-statement."""
    specs = {"b0": B0, "b1": dict(widths=(64, 128, 320, 512), depths=(2, 2, 2, 2), embed_dim=256)}
    specs.update({v: dict(widths=(64, 128, 320, 512), depths=d, embed_dim=768)
                  for v, d in (("b2", (3, 4, 6, 3)), ("b3", (3, 4, 18, 3)), ("b4", (3, 8, 27, 3)),
                               ("b5", (3, 6, 40, 3)))})
    count = lambda m: sum(p.numel() for p in m.parameters())
    for v, spec in specs.items():
        with torch.device("meta"):
            seg = transformers.SegformerForSemanticSegmentation(hf_config(**spec))
            daformer_head = TorchDAFormerHead(spec["widths"], 19)
        assert PARAM_COUNTS_19[f"segformer_mit_{v}"] == count(seg)
        assert PARAM_COUNTS_19[f"daformer_mit_{v}"] == count(seg.segformer) + count(daformer_head)


def test_output_size_and_smallest_input():
    module = models.get_model("daformer_mit_b0", 3)
    shape = lambda hw: jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *hw, 3), jnp.uint8))
    out = jax.eval_shape(lambda v, x: module.apply(v, x), shape((64, 64)), jax.ShapeDtypeStruct((2, 61, 130, 3),
                                                                                              jnp.uint8))
    assert out.shape == (2, 16, 33, 3) and module.output_stride == 4
    shape((29, 29))
    with pytest.raises(ValueError, match="at least 29x29"):
        shape((28, 64))


def test_param_groups_of_the_transformers():
    """Head (10x LR) = the decoder, BN included; the encoder's LayerNorms train (never 'frozen')
    without weight decay; everything else of the encoder is 'backbone'."""
    module = models.get_model("daformer_mit_b0", 19)
    params = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8))["params"]
    for train_bn in (False, True):
        groups = traverse_util.flatten_dict(models.param_groups(module, params, train_bn=train_bn))
        assert {k for k, g in groups.items() if g == "head"} == {k for k in groups if k[0] == "decode_head"}
        no_decay = {k for k, g in groups.items() if g == "backbone_no_decay"}
        assert no_decay and all(any("norm" in p for p in k[:-1]) and k[-1] in ("scale", "bias") for k in no_decay)
        assert ("backbone", "block1_0", "attn", "norm", "scale") in no_decay  # the key/value reduction's LayerNorm
        assert ("backbone", "norm4", "bias") in no_decay and ("backbone", "patch_embed1", "norm", "scale") in no_decay
        assert groups[("backbone", "block3_1", "attn", "kv", "kernel")] == "backbone"
        assert groups[("backbone", "block3_1", "mlp", "dwconv", "bias")] == "backbone"
        assert groups[("decode_head", "fuse_layer", "bottleneck", "bn", "scale")] == "head"
        assert set(groups.values()) == {"head", "backbone", "backbone_no_decay"}


def test_stochastic_depth_and_dropout_only_in_training():
    from cbst_jax.models.mit import DropPath, drop_path_rates

    assert drop_path_rates((2, 2, 2, 2), 0.1) == pytest.approx(list(np.linspace(0, 0.1, 8)))
    x = jnp.ones((4000, 3, 2, 1))
    y = np.asarray(DropPath(0.25).apply({}, x, False, rngs={"dropout": jax.random.key(1)}))
    kept = y[:, 0, 0, 0] != 0
    assert np.all(y[kept] == np.float32(1 / 0.75)) and np.all(y[~kept] == 0)  # whole samples
    assert abs(kept.mean() - 0.75) < 0.03
    np.testing.assert_array_equal(DropPath(0.25).apply({}, x, True), x)

    module = models.get_model("segformer_mit_b0", 4, widths=(8, 16, 40, 64), depths=(1, 1, 1, 1), embed_dim=16,
                              drop_path_rate=0.5)
    img = images(2, (32, 32))
    variables = random_variables(module, (32, 32))
    apply = jax.jit(lambda v, x, k: module.apply(v, x, train=True, rngs={"dropout": k}))
    a, b = apply(variables, img, jax.random.key(1)), apply(variables, img, jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, apply(variables, img, jax.random.key(1)))
    evaluation = jax.jit(lambda v, x: module.apply(v, x, train=False))
    np.testing.assert_array_equal(evaluation(variables, img), evaluation(variables, img))


def test_bfloat16_activations_keep_float32_params_and_logits():
    f32 = models.get_model("daformer_mit_b0", 5, widths=(8, 16, 40, 64), embed_dim=32)
    bf16 = f32.clone(dtype=jnp.bfloat16)
    img = images(1, (32, 48))
    variables = random_variables(f32, (32, 48))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(jax.eval_shape(bf16.init, jax.random.key(0), img)))
    out32 = jax.jit(f32.apply)(variables, img)
    lowered = jax.jit(bf16.apply).lower(variables, img)
    out16 = lowered.compile()(variables, img)
    assert out16.dtype == jnp.float32 and rel(out16, out32) < 0.05
    # every matmul and convolution reads bf16; only the attention logits are accumulated in float32
    # (jax.nn.dot_product_attention, for the softmax), one per block
    types = [line.rsplit(":", 1)[1].split("->") for line in lowered.as_text().splitlines()
             if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
    assert len(types) > 50 and not any("f32" in operands for operands, _ in types)
    assert sum("f32" in result for _, result in types) == sum(f32.depths)


def test_sharded_multi_scale_flip_inference():
    """The predictor's MST + flip on 8 devices with a DAFormer: scales whose inputs are not
    multiples of 4 run, the probabilities are distributions, and flip averaging makes the result
    flip-equivariant (a property of the averaging, whatever the network)."""
    from cbst_jax import sharding
    from cbst_jax.predictor import Predictor

    module = models.get_model("daformer_mit_b0", 5, widths=(8, 16, 40, 64), depths=(1, 1, 1, 1), embed_dim=16)
    variables = random_variables(module, (64, 96), seed=3)
    mesh = sharding.make_mesh()
    pred = Predictor(module, 5, mesh, (64, 96), scales=(0.75, 1.3), flip=True)
    img = images(8, (64, 96), seed=4)
    probs = jax.jit(pred.probs)
    got = np.asarray(probs(variables, sharding.to_global(img, mesh)))
    mirrored = np.asarray(probs(variables, sharding.to_global(np.ascontiguousarray(img[:, :, ::-1]), mesh)))
    assert got.shape == (8, 64, 96, 5) and np.allclose(got.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(mirrored[:, :, ::-1], got, atol=1e-5)
    assert np.ptp(got[..., 1]) > 1e-2  # not a constant map


# ----------------------------------------------------------------------------- a real-size image through infer
def test_converted_hf_checkpoint_segments_a_full_size_image(hf_b0, tmp_path):
    """``convert_weights hf-segformer model.safetensors`` -> ``python -m cbst_jax.cli.infer`` on a
    1024x2048 image (one device): the label map is the argmax of transformers' logits upsampled
    to the canvas (align_corners=True, as the project's predictor)."""
    ref, path = hf_b0
    out = tmp_path / "segformer_b0.npz"
    assert convert_weights.main(["hf-segformer", str(path), str(out)]) == 0
    meta = models.read_metadata(out)
    assert (meta["architecture"], meta["num_classes"], meta["normalization"]) == ("segformer_mit_b0", 19, "imagenet")
    img = images(1, (1024, 2048), seed=5)
    img = (img // 64 * 64 + 20).astype(np.uint8)  # coarse colour blocks: stable argmax regions
    Image.fromarray(img[0]).save(tmp_path / "frame.png")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    res = subprocess.run([sys.executable, "-m", "cbst_jax.cli.infer", "--weights", str(out),
                          "--out", str(tmp_path / "seg"),
                          "--canvas", "1024,2048", str(tmp_path / "frame.png")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "seg" / "infer_summary.json").read_text())
    assert summary["segmented"] == 1 and summary["weights"][0]["architecture"] == "segformer_mit_b0"
    got = np.asarray(Image.open(tmp_path / "seg" / "frame_trainid.png"))
    with torch.no_grad():
        logits = ref(torch_input(img)).logits
        want = F.interpolate(logits, size=(1024, 2048), mode="bilinear", align_corners=True).argmax(1)[0].numpy()
    assert got.shape == want.shape == (1024, 2048)
    assert (got == want).mean() > 0.995 and len(np.unique(want)) > 3
