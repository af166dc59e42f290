"""Weight import: MXNet reader on a real-MXNet fixture, and numeric parity of every model
family with small PyTorch reference networks that use the checkpoints' key names."""
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from cbst_jax import models
from cbst_jax.cli import convert_weights
from cbst_jax.models import conversion
from cbst_jax.models import importers
from cbst_jax.models.mxnet_params import load_mxnet_params, save_mxnet_params

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------- torch references
class TorchBottleneck(nn.Module):
    """Res_Deeplab's Bottleneck: stride on conv1 (Caffe), padding = dilation on conv2."""

    def __init__(self, inplanes, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes * 4)) if downsample else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchClassifier(nn.Module):

    def __init__(self, cin, num_classes, rates=(6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(nn.Conv2d(cin, num_classes, 3, padding=r, dilation=r) for r in rates)

    def forward(self, x):
        return sum(c(x) for c in self.conv2d_list)


class TorchResDeeplab(nn.Module):
    """The AdaptSegNet/ADVENT/CRST `Res_Deeplab` layout (keys `layer3.5.conv2.weight`, ...)."""

    def __init__(self, num_classes, layers=(3, 4, 23, 3), width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        inplanes = width
        for s, (n, (stride, dilation)) in enumerate(zip(layers, ((1, 1), (2, 1), (1, 2), (1, 4)))):
            blocks = []
            for i in range(n):
                blocks.append(TorchBottleneck(inplanes, width * 2**s, stride if i == 0 else 1, dilation, i == 0))
                inplanes = width * 2**s * 4
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.layer5 = TorchClassifier(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for s in range(1, 6):
            x = getattr(self, f"layer{s}")(x)
        return x


class TorchResNet38(nn.Module):
    """CBST's MXNet fcrna_model_a1 with the MXNet symbol names as module names."""

    def __init__(self, num_classes, widths, blocks, head_width):
        super().__init__()
        self.num_classes, self.ops = num_classes, []
        self.cin = 3
        self.add("conv1a", nn.Conv2d(3, widths[0], 3, 1, 1, bias=False))
        self.cin = widths[0]
        for level, n in zip((2, 3, 4), blocks[:3]):
            self.block(f"{level}a", (widths[level - 1],) * 2, (3, 3), stride=2, project=True)
            for i in range(1, n):
                self.block(f"{level}b{i}", (widths[level - 1],) * 2, (3, 3))
        self.block("5a", widths[4], (3, 3), dilation=2, first_dilation=1, project=True)
        for i in range(1, blocks[3]):
            self.block(f"5b{i}", widths[4], (3, 3), dilation=2)
        self.block("6a", widths[5], (1, 3, 1), dilation=4, project=True)
        self.block("7a", widths[6], (1, 3, 1), dilation=4, project=True)
        self.add("bn7", nn.BatchNorm2d(self.cin, eps=1.001e-5))
        self.add("conv6a", nn.Conv2d(self.cin, head_width, 3, padding=12, dilation=12))
        self.add(f"linear{num_classes}", nn.Conv2d(head_width, num_classes, 3, padding=12, dilation=12))

    def add(self, name, module):
        self.add_module(name, module)

    def block(self, name, filters, kernels, stride=1, dilation=1, first_dilation=None, project=False):
        cin = self.cin
        d0 = dilation if first_dilation is None else first_dilation
        self.add(f"bn{name}_branch2a", nn.BatchNorm2d(cin, eps=1.001e-5))
        self.add(f"res{name}_branch2a", nn.Conv2d(cin, filters[0], kernels[0], stride,
                                                  padding=d0 * (kernels[0] // 2), dilation=d0, bias=False))
        for i in range(1, len(filters)):
            self.add(f"bn{name}_branch2b{i}", nn.BatchNorm2d(filters[i - 1], eps=1.001e-5))
            self.add(f"res{name}_branch2b{i}", nn.Conv2d(filters[i - 1], filters[i], kernels[i],
                                                         padding=dilation * (kernels[i] // 2), dilation=dilation,
                                                         bias=False))
        if project:
            self.add(f"res{name}_branch1", nn.Conv2d(cin, filters[-1], 1, stride, bias=False))
        self.ops.append((name, len(filters), project))
        self.cin = filters[-1]

    def forward(self, x):
        m = lambda name: getattr(self, name)
        x = m("conv1a")(x)
        for name, n, project in self.ops:
            pre = F.relu(m(f"bn{name}_branch2a")(x))
            y = m(f"res{name}_branch2a")(pre)
            for i in range(1, n):
                y = m(f"res{name}_branch2b{i}")(F.relu(m(f"bn{name}_branch2b{i}")(y)))
            x = (m(f"res{name}_branch1")(pre) if project else x) + y
        x = F.relu(m("bn7")(x))
        return m(f"linear{self.num_classes}")(F.relu(m("conv6a")(x)))

    def mxnet_arrays(self):
        """The state dict under MXNet `.params` names."""
        out = {}
        for key, v in self.state_dict().items():
            module, leaf = key.rsplit(".", 1)
            if leaf == "num_batches_tracked":
                continue
            if isinstance(getattr(self, module), nn.BatchNorm2d):
                leaf = dict(weight="arg:{}_gamma", bias="arg:{}_beta", running_mean="aux:{}_moving_mean",
                            running_var="aux:{}_moving_var")[leaf]
            else:
                leaf = "arg:{}_" + leaf
            out[leaf.format(module)] = v.numpy()
        return out


def vgg_features(widths, depths):
    layers, cin = [], 3
    for width, depth in zip(widths, depths):
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
            cin = width
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class TorchVGG(nn.Module):
    """torchvision's VGG key layout (`features.N`, `classifier.{0,3,6}`)."""

    def __init__(self, widths, depths, fc_width, fc_kernel):
        super().__init__()
        self.features = vgg_features(widths, depths)
        self.classifier = nn.Sequential(nn.Linear(widths[-1] * fc_kernel**2, fc_width), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(fc_width, fc_width), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(fc_width, 1000))


class TorchFCN8s(nn.Module):
    """pytorch-fcn's FCN8s (reference padding) or the 'same'-padding small variant."""

    def __init__(self, num_classes, widths, depths, fc_width, fc_kernel, reference_padding):
        super().__init__()
        self.ref, self.depths = reference_padding, depths
        cin = 3
        for s, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                pad = 100 if reference_padding and s == 0 and i == 0 else 1
                setattr(self, f"conv{s + 1}_{i + 1}", nn.Conv2d(cin, width, 3, padding=pad))
                cin = width
        self.fc6 = nn.Conv2d(cin, fc_width, fc_kernel, padding=0 if reference_padding else fc_kernel // 2)
        self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
        c = num_classes
        self.score_fr = nn.Conv2d(fc_width, c, 1)
        self.score_pool3 = nn.Conv2d(widths[2], c, 1)
        self.score_pool4 = nn.Conv2d(widths[3], c, 1)
        p = (lambda f: 0) if reference_padding else (lambda f: f // 2)
        self.upscore2 = nn.ConvTranspose2d(c, c, 4, 2, padding=p(2), bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(c, c, 4, 2, padding=p(2), bias=False)
        self.upscore8 = nn.ConvTranspose2d(c, c, 16, 8, padding=p(8), bias=False)

    def forward(self, x):
        h, w = x.shape[2:]
        pools = []
        for s, depth in enumerate(self.depths):
            for i in range(depth):
                x = F.relu(getattr(self, f"conv{s + 1}_{i + 1}")(x))
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            pools.append(x)
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        o4, o3, o8 = (5, 9, 31) if self.ref else (0, 0, 0)
        x = self.upscore2(self.score_fr(x))
        x = x[:, :, :pools[3].shape[2], :pools[3].shape[3]]
        x = x + self.score_pool4(pools[3])[:, :, o4:o4 + x.shape[2], o4:o4 + x.shape[3]]
        x = self.upscore_pool4(x)
        x = x[:, :, :pools[2].shape[2], :pools[2].shape[3]]
        x = x + self.score_pool3(pools[2])[:, :, o3:o3 + x.shape[2], o3:o3 + x.shape[3]]
        return self.upscore8(x)[:, :, o8:o8 + h, o8:o8 + w]


# ----------------------------------------------------------------------------- helpers
def randomize(module, seed=0):
    """Random weights and BN running statistics (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.ndim == 1:
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel() if t.ndim > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 / fan_in) ** 0.5)
    return module.eval()


def state_numpy(module):
    return {k: v.numpy() for k, v in module.state_dict().items()}


def images(n, h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


def torch_input(x, normalization):
    x = x.astype(np.float64)
    if normalization == "caffe":
        x = x[..., ::-1] - np.asarray(CAFFE_MEAN_BGR)
    elif normalization == "imagenet":
        x = (x / 255 - np.asarray(IMAGENET[0])) / np.asarray(IMAGENET[1])
    else:
        x = x / 255
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32))


def assert_parity(module, variables, torch_module, x, normalization):
    with torch.no_grad():
        want = torch_module(torch_input(x, normalization)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(module.apply(variables, x))
    assert got.shape == want.shape
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel


def count(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- MXNet reader
def test_mxnet_reader_reproduces_real_mxnet_fixture():
    arrays = load_mxnet_params(os.path.join(FIXTURES, "mxnet_small.params"))
    expected = np.load(os.path.join(FIXTURES, "mxnet_small_expected.npz"))
    assert sorted(arrays) == sorted(k.replace("__", ":") for k in expected.files)
    for name, value in arrays.items():
        want = expected[name.replace(":", "__")]
        assert value.dtype == want.dtype and value.shape == want.shape, name
        np.testing.assert_array_equal(value, want)
    assert arrays["arg:half"].dtype == np.float16 and arrays["arg:scalar"].shape == (1,)


def test_mxnet_writer_is_byte_identical_to_mxnet(tmp_path):
    src = os.path.join(FIXTURES, "mxnet_small.params")
    save_mxnet_params(tmp_path / "copy.params", load_mxnet_params(src))
    assert (tmp_path / "copy.params").read_bytes() == open(src, "rb").read()


def test_mxnet_reader_rejects_other_files(tmp_path):
    (tmp_path / "bad.params").write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="not an MXNet"):
        load_mxnet_params(tmp_path / "bad.params")


# ----------------------------------------------------------------------------- parity
def test_transposed_conv_matches_torch():
    from cbst_jax.models.layers import ConvTranspose
    for k, s, p, hw in ((4, 2, 0, (5, 7)), (4, 2, 1, (6, 3)), (16, 8, 0, (3, 4)), (16, 8, 4, (2, 5)), (3, 2, 1, (4, 4))):
        t = randomize(nn.ConvTranspose2d(3, 2, k, s, padding=p, bias=False))
        x = np.random.RandomState(k).randn(2, *hw, 3).astype(np.float32)
        with torch.no_grad():
            want = t(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        kernel = t.weight.detach().numpy().transpose(2, 3, 1, 0)
        got = ConvTranspose(2, k, s, p).apply({"params": {"kernel": kernel}}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix,source_classes", [("Scale.", 5), ("Scale.", 7), ("", 5)])
def test_deeplabv2_parity_and_head_handling(prefix, source_classes):
    ref = randomize(TorchResDeeplab(source_classes, layers=(1, 1, 1, 1), width=8))
    state = {prefix + k: v for k, v in state_numpy(ref).items()}
    variables, meta = conversion.convert("deeplab-init", state, 5, model="deeplabv2_resnet_small")
    module = models.get_model("deeplabv2_resnet_small", 5, normalization="caffe")
    x = images(1, 33, 40)
    if source_classes == 5:
        assert meta["fresh_heads"] == [] and meta["num_classes"] == 5
        assert_parity(module, variables, ref, x, "caffe")
    else:  # COCO-style head of another class count: skipped, freshly initialised
        assert meta["fresh_heads"] == ["layer5"] and meta["num_classes"] is None  # backbone-only init
        assert variables["params"]["layer5"]["conv2d_list_0"]["kernel"].shape[-1] == 5
        np.testing.assert_array_equal(variables["params"]["layer4_0"]["conv2"]["kernel"],
                                      state[prefix + "layer4.0.conv2.weight"].transpose(2, 3, 1, 0))


def test_torchvision_resnet_keys_load_backbone_and_report_mismatches():
    ref = randomize(TorchResDeeplab(3, layers=(1, 1, 1, 1), width=8))
    state = {k: v for k, v in state_numpy(ref).items() if not k.startswith("layer5")}
    state["fc.weight"], state["fc.bias"] = np.zeros((1000, 256), np.float32), np.zeros(1000, np.float32)
    variables, meta = conversion.convert("torchvision-resnet101", state, 3, model="deeplabv2_resnet_small")
    assert meta["fresh_heads"] == ["layer5"] and meta["normalization"] == "imagenet"
    assert meta["architecture"] == "deeplabv2_resnet_small" and meta["num_classes"] is None
    assert int(meta["dropped"]) > 2  # fc + num_batches_tracked
    broken = dict(state)
    del broken["layer2.0.bn1.running_var"]
    broken["layer9.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    broken["layer1.0.conv2.weight"] = np.zeros((8, 8, 5, 5), np.float32)
    with pytest.raises(models.WeightMismatchError) as err:
        conversion.convert("torchvision-resnet101", broken, 3, model="deeplabv2_resnet_small")
    msg = str(err.value)
    assert "batch_stats/layer2_0/bn1/var" in msg and "params/layer9_0/conv1/kernel" in msg
    assert "params/layer1_0/conv2/kernel: checkpoint (5, 5, 8, 8) vs model (3, 3, 8, 8)" in msg


@pytest.mark.parametrize("source_classes", [4, 1000])
def test_resnet38_parity_with_mxnet_layout(source_classes):
    small = models.get_model("resnet38_small", 4)
    ref = randomize(TorchResNet38(4, small.widths, small.blocks, small.head_width))
    arrays = ref.mxnet_arrays()
    if source_classes == 1000:  # ImageNet file: no FCN head, a linear1000 classifier
        arrays = {k: v for k, v in arrays.items() if "conv6a" not in k and "linear4" not in k}
        arrays["arg:linear1000_weight"] = np.zeros((1000, 512), np.float32)
        arrays["arg:linear1000_bias"] = np.zeros(1000, np.float32)
    variables, meta = conversion.convert("mxnet-resnet38", arrays, 4, model="resnet38_small")
    if source_classes == 4:
        assert meta["fresh_heads"] == [] and meta["num_classes"] == 4
        assert_parity(small.clone(normalization="imagenet"), variables, ref, images(1, 33, 40), "imagenet")
    else:
        assert meta["fresh_heads"] == ["conv6a", "linear"] and meta["num_classes"] is None


def test_fcn8s_reference_padding_parity_from_torchvision_vgg():
    widths, depths, fc, k = (4, 8, 8, 16, 16), (2, 2, 3, 3, 3), 32, 7
    vgg = randomize(TorchVGG(widths, depths, fc, k))
    module = models.FCN8s(3, widths=widths, depths=depths, fc_width=fc, fc_kernel=k)
    source = state_numpy(vgg)
    flat, dropped, bad = importers.torchvision_vgg_to_flat(source, depths)
    assert not bad and dropped == ["classifier.6.weight", "classifier.6.bias"]
    template = jax.eval_shape(module.init, jax.random.key(0), images(1, 64, 64))["params"]
    assert set(template) - set(module.head_names) == {k[1] for k in flat}
    rng = np.random.RandomState(1)  # random heads instead of the zero / bilinear init
    params = jax.tree_util.tree_map(lambda a: rng.randn(*a.shape).astype(np.float32) * 0.3, template)
    for (_, name, leaf), value in flat.items():
        params[name][leaf] = value
    ref = TorchFCN8s(3, widths, depths, fc, k, reference_padding=True).eval()
    with torch.no_grad():
        for name, leaves in params.items():
            target = getattr(ref, name)
            target.weight.copy_(torch.from_numpy(np.ascontiguousarray(leaves["kernel"].transpose(3, 2, 0, 1))))
            if "bias" in leaves:
                target.bias.copy_(torch.from_numpy(leaves["bias"]))
        np.testing.assert_array_equal(ref.fc6.weight.numpy(), source["classifier.0.weight"].reshape(fc, 16, k, k))
    assert_parity(module, {"params": params}, ref, images(1, 33, 40), "imagenet")


def test_fcn8s_small_parity_and_output_size():
    module = models.get_model("fcn8s_vgg16_small", 5)
    ref = randomize(TorchFCN8s(5, module.widths, module.depths, module.fc_width, module.fc_kernel, False))
    flat, dropped, bad = importers.torch_to_flat(state_numpy(ref))
    assert not dropped and not bad
    variables = traverse_util.unflatten_dict(flat)
    assert_parity(module, variables, ref, images(1, 64, 96), "unit")
    assert_parity(module, variables, ref, images(1, 50, 75), "unit")  # not a multiple of 32


def test_param_counts_match_torch_references():
    def jax_count(name, classes):
        v = jax.eval_shape(models.get_model(name, classes).init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 64, 64, 3), np.uint8))
        return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(v["params"]))

    small38 = models.get_model("resnet38_small", 19)
    fcn_small = models.get_model("fcn8s_vgg16_small", 19)
    with torch.device("meta"):
        torch_counts = {
            "deeplabv2_resnet101": count(TorchResDeeplab(19)),
            "deeplabv2_resnet_small": count(TorchResDeeplab(19, (1, 1, 1, 1), 8)),
            "resnet38": count(TorchResNet38(19, models.ResNet38.widths, models.ResNet38.blocks, 512)),
            "resnet38_small": count(TorchResNet38(19, small38.widths, small38.blocks, small38.head_width)),
            "fcn8s_vgg16": count(TorchFCN8s(19, (64, 128, 256, 512, 512), (2, 2, 3, 3, 3), 4096, 7, True)),
            "fcn8s_vgg16_small": count(TorchFCN8s(19, fcn_small.widths, fcn_small.depths, fcn_small.fc_width,
                                                  fcn_small.fc_kernel, False)),
        }
    assert torch_counts["deeplabv2_resnet101"] == 43_901_068
    assert torch_counts["resnet38"] == 124_033_363
    assert torch_counts["fcn8s_vgg16"] == 134_456_985
    for name, n in torch_counts.items():
        assert jax_count(name, 19) == n, name


# ----------------------------------------------------------------------------- command line
def test_convert_weights_command_torch_and_mxnet(tmp_path):
    ref = randomize(TorchResDeeplab(19, layers=(1, 1, 1, 1), width=8))
    torch.save({"state_dict": {"Scale." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "init.pth")
    assert convert_weights.main(["deeplab-init", str(tmp_path / "init.pth"), str(tmp_path / "dl.npz"),
                                 "--model", "deeplabv2_resnet_small"]) == 0
    variables = models.load_variables(tmp_path / "dl.npz")
    meta = models.read_metadata(tmp_path / "dl.npz")
    assert (meta["architecture"], meta["num_classes"], meta["normalization"]) == ("deeplabv2_resnet_small", 19, "caffe")
    assert meta["class_names"][0] == "road" and meta["palette"][18] == [119, 11, 32] and meta["source"] == "init.pth"
    normalization = models.resolve_normalization("auto", meta, "deeplabv2_resnet_small")
    assert_parity(models.get_model("deeplabv2_resnet_small", 19, normalization=normalization), variables, ref,
                  images(1, 33, 40), "caffe")

    small = models.get_model("resnet38_small", 3)
    ref38 = randomize(TorchResNet38(3, small.widths, small.blocks, small.head_width))
    save_mxnet_params(tmp_path / "src.params", ref38.mxnet_arrays())
    convert_weights.main(["mxnet-resnet38", str(tmp_path / "src.params"), str(tmp_path / "r38.npz"),
                          "--num-classes", "3", "--model", "resnet38_small"])
    meta38 = models.read_metadata(tmp_path / "r38.npz")
    assert (meta38["num_classes"], meta38["normalization"], meta38["class_names"]) == (3, "imagenet", None)
    assert_parity(small.clone(normalization="imagenet"), models.load_variables(tmp_path / "r38.npz"), ref38,
                  images(1, 33, 40), "imagenet")


def test_torchvision_resnet101_file_records_imagenet_normalisation_and_no_classes(tmp_path):
    ref = randomize(TorchResDeeplab(3, layers=(1, 1, 1, 1), width=8))
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("layer5")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet101.pth")
    convert_weights.main(["torchvision-resnet101", str(tmp_path / "resnet101.pth"), str(tmp_path / "r.npz"),
                          "--model", "deeplabv2_resnet_small"])
    meta = models.read_metadata(tmp_path / "r.npz")
    assert (meta["normalization"], meta["num_classes"], meta["fresh_heads"]) == ("imagenet", None, ["layer5"])
    assert models.resolve_normalization("auto", meta, "deeplabv2_resnet_small") == "imagenet"
    with pytest.raises(models.WeightFileError, match="weights expect normalization 'imagenet'"):
        models.resolve_normalization("caffe", meta, "deeplabv2_resnet_small")


def _cli(*args, block_torch=False):
    """Runs the converter in a fresh interpreter: (exit status, stderr lines)."""
    import subprocess
    import sys

    code = ("import sys\n" + ("sys.modules['torch'] = None\n" if block_torch else "")
            + "from cbst_jax.cli import convert_weights\nsys.exit(convert_weights.main(sys.argv[1:]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    return res.returncode, res.stderr.strip().splitlines()


def test_bad_inputs_are_one_line_errors_with_exit_2(tmp_path, capsys):
    ref = randomize(TorchResDeeplab(19, layers=(1, 1, 1, 1), width=8))
    torch.save(ref.state_dict(), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.pth").write_bytes(os.urandom(2000))
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save(ref, tmp_path / "module.pth")  # a pickled nn.Module, not a state dict
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pth")
    save_mxnet_params(tmp_path / "ok.params", {"arg:a_weight": np.zeros((2, 2), np.float32)})
    (tmp_path / "truncated.params").write_bytes((tmp_path / "ok.params").read_bytes()[:40])
    out = tmp_path / "out.npz"
    cases = [
        (("deeplab-init", tmp_path / "missing.pth", out), "missing.pth: file not found"),
        (("deeplab-init", tmp_path / "truncated.pth", out), "truncated.pth: not a readable PyTorch checkpoint"),
        (("deeplab-init", tmp_path / "garbage.pth", out), "garbage.pth: not a"),
        (("deeplab-init", tmp_path / "notes.txt", out), "notes.txt: not a"),
        (("deeplab-init", tmp_path / "module.pth", out), "module.pth: refused: torch.load(weights_only=True)"),
        (("deeplab-init", tmp_path / "no_tensors.pth", out), "no_tensors.pth: the checkpoint holds no tensors"),
        (("mxnet-resnet38", tmp_path / "truncated.params", out), "truncated.params: not a readable MXNet"),
        (("mxnet-resnet38", tmp_path / "notes.txt", out), "notes.txt: not a readable MXNet .params file"),
        (("deeplab-init", tmp_path / "ok.pth", tmp_path / "nowhere" / "out.npz"), "does not exist"),
        (("deeplab-init", tmp_path / "ok.pth", out, "--model", "unet"), "--model 'unet', expected one of"),
        (("torchvision-resnet101", tmp_path / "ok.pth", out, "--model", "resnet38_small"),
         "checkpoint does not match the model: missing"),
    ]
    for args, message in cases:
        status = convert_weights.main(list(map(str, args)))
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(lines) == 1, (args, lines)
        assert lines[0].startswith("error: ") and message in lines[0], (args, lines)
    assert not out.exists()
    status, lines = _cli("deeplab-init", tmp_path / "ok.pth", out, block_torch=True)
    assert status == 2 and len(lines) == 1 and "needs torch, which is not installed" in lines[0], lines
    assert "pip install torch, or install cbst_jax with its [convert] extra" in lines[0]
    # the MXNet kind needs no torch
    status, lines = _cli("mxnet-resnet38", tmp_path / "ok.params", out, "--model", "resnet38_small", block_torch=True)
    assert status == 2 and len(lines) == 1, lines
    assert "checkpoint does not match the model: missing" in lines[0] and "arg:a_weight (2, 2)" in lines[0]
