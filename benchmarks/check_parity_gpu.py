"""Full-size numeric parity on a GPU: `deeplabv2_resnet101` and `fcn8s_vgg16` against
references built from plain torch.nn modules under torchvision's state-dict key names (random
weights, random BN running statistics, eval).

DeepLab-v2 reference: `Res_Deeplab` of the PyTorch UDA code, i.e. torchvision's ResNet-101 layout
(`layer3.5.conv2.weight`, `layer1.0.downsample.1.running_var`) with the stride on each first 1x1
conv (Caffe), layer3/4 dilated 2/4 in every block, a ceil-mode stem pool and the ASPP-v2 `layer5`.
FCN-8s reference: torchvision's VGG16 layout (`features.N`, `classifier.{0,3,6}`) copied into
pytorch-fcn's FCN8s (pad 100, fc6 7x7). Both are converted with `cbst_jax.models.conversion` (the
`torchvision-resnet101` / `torchvision-vgg16` converters) and compared in float32 (torch with TF32
off) at JAX's default matmul precision and at 'highest'; DeepLab-v2 in both atrous modes (dilated
convolutions, and the same convolutions undilated on space-to-batch phase grids). torchvision is
not needed; where it is installed, the plain references are also checked against torchvision's own
`resnet101` / `vgg16` loaded with the same weights (the `torchvision_check` rows). Prints one JSON
line per comparison and writes $OUT/parity_gpu.json.

  python -m benchmarks.check_parity_gpu          # ~1-2 min on an H100
  python -m benchmarks.check_parity_gpu --smoke  # CPU, tiny inputs
"""
import argparse
import json
import os
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbst_jax import models
from cbst_jax.models import conversion


def kaiming_init(module):
    """torchvision's ResNet / VGG initialisation of the convolutions (and VGG's linear layers)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return module


class Bottleneck(nn.Module):
    """Res_Deeplab's bottleneck under torchvision's names: stride on conv1 (Caffe), padding =
    dilation on conv2, projection shortcut `downsample.0` / `downsample.1`."""

    def __init__(self, inplanes, planes, stride, dilation, project):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * 4)) if project else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class DeepLabV2Reference(nn.Module):
    """Res_Deeplab (ResNet-101: blocks (3, 4, 23, 3)) with the state-dict keys of the PyTorch UDA code."""

    def __init__(self, num_classes, blocks=(3, 4, 23, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        inplanes = 64
        for s, (n, (stride, dilation)) in enumerate(zip(blocks, ((1, 1), (2, 1), (1, 2), (1, 4)))):
            layer = []
            for i in range(n):
                layer.append(Bottleneck(inplanes, 64 * 2**s, stride if i == 0 else 1, dilation, i == 0))
                inplanes = 64 * 2**s * 4
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        kaiming_init(self)
        self.layer5 = nn.Module()  # torch's default init, as the references' classifier
        self.layer5.conv2d_list = nn.ModuleList(nn.Conv2d(inplanes, num_classes, 3, padding=d, dilation=d)
                                                for d in (6, 12, 18, 24))

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return sum(c(x) for c in self.layer5.conv2d_list)


class VGG16(nn.Module):
    """torchvision's vgg16 layout: `features.N` (3x3 convs, ReLU, 2x2 max-pools), `classifier.{0,3,6}`."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for width, depth in zip((64, 128, 256, 512, 512), (2, 2, 3, 3, 3)):
            for _ in range(depth):
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
                cin = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))
        kaiming_init(self)


class FCN8sReference(nn.Module):
    """pytorch-fcn's FCN8s on a VGG16 in torchvision's layout (its classifier's fc6/fc7 folded into convolutions)."""

    def __init__(self, num_classes, vgg):
        super().__init__()
        self.features = vgg.features
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        self.features[0].padding = (100, 100)
        self.fc6, self.fc7 = nn.Conv2d(512, 4096, 7), nn.Conv2d(4096, 4096, 1)
        with torch.no_grad():
            self.fc6.weight.copy_(vgg.classifier[0].weight.view(4096, 512, 7, 7))
            self.fc6.bias.copy_(vgg.classifier[0].bias)
            self.fc7.weight.copy_(vgg.classifier[3].weight.view(4096, 4096, 1, 1))
            self.fc7.bias.copy_(vgg.classifier[3].bias)
        c = num_classes
        self.score_fr, self.score_pool3, self.score_pool4 = nn.Conv2d(4096, c, 1), nn.Conv2d(256, c, 1), nn.Conv2d(512, c, 1)
        self.upscore2 = nn.ConvTranspose2d(c, c, 4, 2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(c, c, 4, 2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(c, c, 16, 8, bias=False)

    def forward(self, x):
        h, w = x.shape[2:]
        pools = []
        for m in self.features:
            x = m(x)
            if isinstance(m, nn.MaxPool2d):
                pools.append(x)
        x = self.score_fr(F.relu(self.fc7(F.relu(self.fc6(x)))))
        x = self.upscore2(x)
        x = x + self.score_pool4(pools[3])[:, :, 5:5 + x.shape[2], 5:5 + x.shape[3]]
        x = self.upscore_pool4(x)
        x = x + self.score_pool3(pools[2])[:, :, 9:9 + x.shape[2], 9:9 + x.shape[3]]
        return self.upscore8(x)[:, :, 31:31 + h, 31:31 + w]


def torchvision_check(name, plain, x):
    """torchvision's own network loaded with the plain reference's weights: max relative
    difference of the backbone features (None where torchvision is not installed; the error's
    text where the check itself fails, so the parity rows still get written)."""
    try:
        import torchvision
    except ImportError:
        return None
    try:
        return _torchvision_difference(torchvision, name, plain, x)
    except Exception as e:  # noqa: BLE001 - a cross-check, never the reason the parity rows are lost
        return f"failed: {e!r}"[:300]


def _torchvision_difference(torchvision, name, plain, x):
    if name == "deeplabv2_resnet101":
        r = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        r.maxpool.ceil_mode = True
        for layer, dilation in ((r.layer2, 1), (r.layer3, 2), (r.layer4, 4)):
            first = layer[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)  # Caffe: stride on the 1x1
            for block in layer:
                block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
        missing, unexpected = r.load_state_dict(plain.state_dict(), strict=False)
        assert set(missing) == {"fc.weight", "fc.bias"}, missing
        assert all(k.startswith("layer5.") for k in unexpected), unexpected
        run = lambda m: m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        got, want = run(r.eval()), run(plain)
    else:
        r = torchvision.models.vgg16(weights=None)
        r.load_state_dict(plain.state_dict())
        got, want = r.eval().features(x), plain.eval().features(x)
    return float((got - want).abs().max() / want.abs().max())


def randomize_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return module.eval()


def torch_input(x):
    x = (x.astype(np.float32) / 255 - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def compare(name, modules, variables, reference, x, device):
    """``modules``: JAX modules, each compared with one torch forward of ``reference``."""
    with torch.no_grad():
        want = reference.to(device)(torch_input(x).to(device)).cpu().numpy().transpose(0, 2, 3, 1)
    results = []
    for module in modules:
        for precision in ("default", "highest"):
            with jax.default_matmul_precision(precision):
                t = time.perf_counter()
                got = np.asarray(jax.jit(module.apply)(variables, x))
                seconds = time.perf_counter() - t
            err = got.astype(np.float64) - want
            results.append(dict(model=name, atrous=getattr(module, "atrous", "-"),
                                bn_folded=getattr(module, "fold_bn", None), precision=precision, shape=list(got.shape),
                                rel_err_l2=float(np.linalg.norm(err) / np.linalg.norm(want)),
                                rel_err_max=float(np.abs(err).max() / np.abs(want).max()),
                                argmax_agreement=float((got.argmax(-1) == want.argmax(-1)).mean()),
                                seconds_incl_compile=seconds, device=jax.devices()[0].device_kind))
            print(json.dumps(results[-1]), flush=True)
    return results


def write(results):
    with open(os.path.join(os.environ.get("OUT", "."), "parity_gpu.json"), "w") as f:
        json.dump(results, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, 1 image of 65x97 (DeepLab) / 64x64 (FCN)")
    args = parser.parse_args()
    jax.devices()  # fail at once where the backend asked for (JAX_PLATFORMS) is missing
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    rng = np.random.RandomState(0)
    results = []

    torch.manual_seed(0)
    ref = randomize_bn(DeepLabV2Reference(19))
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    variables, _ = conversion.convert("torchvision-resnet101", state, 19)
    # float32 (the references' numerics), both atrous modes with BN folded, and BN applied unfolded
    variants = (("dilated", True), ("space_to_batch", True), ("dilated", False))
    modules = [models.get_model("deeplabv2_resnet101", 19, normalization="imagenet", dtype="float32", atrous=a,
                                fold_bn=f) for a, f in variants]
    hw = (65, 97) if args.smoke else (512, 1024)
    x = rng.randint(0, 256, (1, *hw, 3)).astype(np.uint8)
    results += compare("deeplabv2_resnet101", modules, variables, ref, x, device)
    with torch.no_grad():
        results.append(dict(model="deeplabv2_resnet101", torchvision_check=torchvision_check(
            "deeplabv2_resnet101", ref.cpu(), torch_input(x[:, :64, :64]))))
    print(json.dumps(results[-1]), flush=True)
    write(results)
    del ref, state, variables

    torch.manual_seed(1)
    vgg = VGG16()
    with torch.no_grad():  # before FCN8sReference pads and ceil-pools its features in place
        check = dict(model="fcn8s_vgg16",
                     torchvision_check=torchvision_check("vgg16", vgg, torch_input(x[:, :64, :64])))
    ref = FCN8sReference(19, vgg).eval()
    state = {k: v.numpy() for k, v in vgg.state_dict().items()}
    variables, _ = conversion.convert("torchvision-vgg16", state, 19)
    params = variables["params"]
    head_rng = np.random.RandomState(1)  # random heads (the fresh ones are zero / bilinear)
    with torch.no_grad():
        for name in models.FCN8s.head_names:
            for leaf in params[name]:
                params[name][leaf] = 0.01 * head_rng.randn(*params[name][leaf].shape).astype(np.float32)
            getattr(ref, name).weight.copy_(torch.from_numpy(params[name]["kernel"].transpose(3, 2, 0, 1).copy()))
            if "bias" in params[name]:
                getattr(ref, name).bias.copy_(torch.from_numpy(params[name]["bias"]))
    hw = (64, 64) if args.smoke else (500, 500)
    results += compare("fcn8s_vgg16", [models.get_model("fcn8s_vgg16", 19, dtype="float32")], variables, ref,
                       rng.randint(0, 256, (1, *hw, 3)).astype(np.uint8), device)
    results.append(check)
    print(json.dumps(check), flush=True)
    write(results)


if __name__ == "__main__":
    main()
